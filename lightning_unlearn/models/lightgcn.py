"""LightGCN: MF embeddings smoothed over the symmetric-normalised user-item graph."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor

from lightning_unlearn.data.interactions import Interactions
from lightning_unlearn.models.mf import MF

__all__ = ["LightGCN", "normalized_adjacency"]


def normalized_adjacency(interactions: Interactions) -> Tensor:
    """``D^-1/2 A D^-1/2`` of the bipartite graph (users first, then items), as sparse CSR.

    Example:
        >>> adj = normalized_adjacency(Interactions.from_raw([0, 0, 1], [0, 1, 0]))
        >>> [round(v, 4) for v in adj.to_dense()[0, 2:].tolist()]  # 1/sqrt(2*2), 1/sqrt(2*1)
        [0.5, 0.7071]
    """
    n_u, n = interactions.num_users, interactions.num_users + interactions.num_items
    pairs = torch.unique(interactions.keys)  # one edge per (user, item), however often it occurs
    u, i = pairs // interactions.num_items, pairs % interactions.num_items + n_u
    rows, cols = torch.cat([u, i]), torch.cat([i, u])
    deg = torch.bincount(rows, minlength=n).float()
    inv_sqrt = deg.clamp_min(1).rsqrt()
    values = inv_sqrt[rows] * inv_sqrt[cols]
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, n), check_invariants=True).coalesce()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR matmul is the fast path on CPU
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return coo.to_sparse_csr()


class _Propagate(torch.autograd.Function):
    """``A @ x`` for a symmetric sparse ``A``, whose backward is ``A @ grad`` again.

    Autograd's own backward of a CSR product transposes ``A`` on every call (a sort and a
    conversion of all its entries), which cost ten times the product itself on MovieLens-1M.
    The normalised adjacency is symmetric, so its transpose is itself. The backward is built
    from this function too, so double backward (Hessian-vector products) works.
    """

    @staticmethod
    def forward(ctx, adjacency: Tensor, x: Tensor) -> Tensor:
        ctx.adjacency = adjacency
        return adjacency @ x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:
        return None, _Propagate.apply(ctx.adjacency, grad)


class LightGCN(MF):
    """LightGCN (He et al., SIGIR 2020): ``mean_l A^l E`` over ``num_layers`` propagation steps.

    The graph is the training positives; the trainer gives it to the model in ``setup`` from
    the datamodule's ``train`` table, or call :meth:`set_graph` yourself.

    Args:
        num_users: number of users.
        num_items: number of items.
        embedding_dim: size of the base embeddings.
        num_layers: propagation steps.
        init_std: standard deviation of the normal initialisation.
        **kwargs: :class:`~lightning_unlearn.models.base.Recommender` options.

    Raises:
        RuntimeError: when scoring before a graph was set.

    Example:
        >>> model = LightGCN(num_users=2, num_items=2, embedding_dim=4, num_layers=2)
        >>> model.set_graph(Interactions.from_raw([0, 1], [0, 1]))
        >>> model.full_scores(torch.tensor([0, 1])).shape
        torch.Size([2, 2])
    """

    def __init__(self, num_users: int, num_items: int, embedding_dim: int = 64, num_layers: int = 3, init_std: float = 0.1, **kwargs):
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 0:
            raise ValueError(f"LightGCN(num_layers=...) must be an integer >= 0, got {num_layers!r}.")
        super().__init__(num_users, num_items, embedding_dim=embedding_dim, init_std=init_std, **kwargs)
        self.num_layers = num_layers
        self.register_buffer("adjacency", None, persistent=False)
        # Every process builds the graph from its own datamodule, and DDP cannot broadcast a
        # sparse CSR tensor: tell DistributedDataParallel to leave this buffer alone.
        self._ddp_params_and_buffers_to_ignore = ["adjacency"]

    def __deepcopy__(self, memo: dict) -> LightGCN:
        # The graph is replaced, never modified in place, so copies share it (and sparse CSR
        # tensors cannot be deep-copied anyway).
        if self.adjacency is not None:
            memo[id(self.adjacency)] = self.adjacency
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__dict__, memo))
        return clone

    def set_graph(self, interactions: Interactions) -> None:
        if (interactions.num_users, interactions.num_items) != (self.num_users, self.num_items):
            raise ValueError(
                f"LightGCN has {self.num_users} users x {self.num_items} items, but the graph has "
                f"{interactions.num_users} x {interactions.num_items}."
            )
        self.adjacency = normalized_adjacency(interactions).to(device=self.device, dtype=self.user_embedding.weight.dtype)

    def representations(self) -> tuple[Tensor, Tensor]:
        if self.adjacency is None:
            raise RuntimeError("LightGCN has no graph: call set_graph(train_interactions), or fit with a RecDataModule. The graph "
                               "of an unlearned model is of the retained rows only: `restore_checkpoint(path, model, datamodule)` "
                               "(lightning_unlearn.unlearning.record) applies the checkpoint's removals and sets it; a graph of "
                               "the data as loaded would hold the deleted rows again.")
        layer = torch.cat([self.user_embedding.weight, self.item_embedding.weight])
        total = layer
        for _ in range(self.num_layers):
            layer = _Propagate.apply(self.adjacency, layer)
            total = total + layer
        final = total / (self.num_layers + 1)
        return final[: self.num_users], final[self.num_users :]
