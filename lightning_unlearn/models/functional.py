"""Evaluate any closure over a model with some of its tensors replaced (for autograd and torch.func)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["call_with"]


class _Closure(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, closure: Callable[[], Any]) -> Any:
        return closure()


def call_with(model: nn.Module, replaced: dict[str, Tensor], closure: Callable[[], Any]) -> Any:
    """``closure()`` evaluated while ``model``'s named tensors are replaced by ``replaced``.

    Gradients flow into the replacement tensors; the model's own parameters are untouched.

    Example:
        >>> layer = nn.Linear(1, 1, bias=False)
        >>> call_with(layer, {"weight": torch.full((1, 1), 3.0)}, lambda: layer(torch.ones(1, 1))).item()
        3.0
    """
    return torch.func.functional_call(_Closure(model), {f"model.{k}": v for k, v in replaced.items()}, (closure,), strict=False)
