"""The :class:`Recommender` contract every model fulfils and every unlearning method relies on."""

from __future__ import annotations

import math
import warnings
from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_unlearn.data.interactions import Interactions
from lightning_unlearn.losses import data_loss, item_slots
from lightning_unlearn.models.functional import call_with, gather_rows
from lightning_unlearn.ranking import FullRankingMetrics, candidate_layout, metric_prefix

__all__ = ["CONTRACT_RULES", "GROUPS", "LOSSES", "OPTIMIZERS", "ContractError", "Recommender"]

LOSSES = ("bpr", "bce")
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
#: The groups :meth:`Recommender.parameter_groups` returns, every parameter in exactly one.
GROUPS = ("user_embedding", "item_embedding", "dense")

#: The rules of the contract, by the name an error cites: the section title in
#: ``docs/own_model.rst`` (whose label is ``contract-<name>``).
CONTRACT_RULES = {
    "methods": "The four methods",
    "rebuild": "Rebuildable from its hyper-parameters",
    "groups": "Every parameter in one group",
    "penalty": "The embedding penalty",
    "representations": "Vectors from the embedding tables",
}
_RECOMMENDER_ARGS = ("num_users", "num_items", "loss", "l2", "lr", "optimizer", "top_k", "eval_auc")
_CANDIDATE_CELLS = 1 << 24  # gathered item-vector entries scored at once in sampled evaluation (64 MB of float32)


class ContractError(TypeError):
    """A :class:`Recommender` subclass breaks a rule of the contract in ``docs/own_model.rst``.

    The message names the class, the rule (its section in the guide) and what to change.
    """


def _broken(cls: type, rule: str, problem: str) -> ContractError:
    return ContractError(
        f'{cls.__name__} breaks rule "{CONTRACT_RULES[rule]}" of the Recommender contract '
        f"(docs/own_model.rst#contract-{rule}): {problem}"
    )


def _abstract_names(cls: type) -> frozenset[str]:
    """The abstract methods ``cls`` still leaves unimplemented (what ``ABCMeta`` computes)."""
    names = {name for name, value in vars(cls).items() if getattr(value, "__isabstractmethod__", False)}
    for base in cls.__bases__:
        names.update(getattr(base, "_abstract_methods", ()))
    return frozenset(name for name in names if getattr(getattr(cls, name, None), "__isabstractmethod__", False))


def check_sizes(owner: str, **sizes: Any) -> None:
    """Refuse sizes (embedding widths, layer counts) that are not integers ``>= 1``, naming each.

    Example:
        >>> check_sizes("MF", embedding_dim=0)
        Traceback (most recent call last):
        ...
        ValueError: MF(embedding_dim=...) must be an integer >= 1, got 0.
    """
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}({name}=...) must be an integer >= 1, got {value!r}.")


class Recommender(pl.LightningModule):
    """Base ``LightningModule`` for recommenders trained on rows with fixed negatives.

    The training objective is the finite sum over training rows ``r = (u, i, negatives)``::

        L(theta) = 1/n * sum_r loss_r(theta) + dense_penalty(theta)
        loss_r   = data term (BPR or BCE) + l2/2 * ||embedding rows that r touches||^2

    so deleting rows removes well-defined terms. A subclass implements
    :meth:`representations` (all user and item vectors), :meth:`interact` (scores of
    aligned user/item vectors), :meth:`embedding_penalty` and :meth:`parameter_groups`;
    it may override :meth:`full_scores` and :meth:`dense_penalty`, and graph models
    :meth:`set_graph`.

    A subclass that leaves one of the four unimplemented fails at construction; the other
    rules of ``docs/own_model.rst`` are checked by :meth:`check_contract`, which ``setup``
    runs before fitting (and validating, testing, predicting).

    Args:
        num_users: number of users (linked from the datamodule in the CLI).
        num_items: number of items.
        loss: ``"bpr"`` (pairwise, one term per negative) or ``"bce"`` (pointwise).
        l2: L2 weight on the embedding rows a row touches.
        lr: learning rate.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        top_k: cut-offs of the logged ranking metrics.
        eval_auc: also log per-user AUC.

    Raises:
        ContractError: (a ``TypeError``) when the subclass leaves a method of the contract unimplemented.
        ValueError: on an unknown loss or optimizer, non-positive sizes or negative ``l2``.
    """

    _abstract_methods: frozenset[str]  # set by __init_subclass__ (and for Recommender below the class)

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        cls._abstract_methods = _abstract_names(cls)

    def __init__(
        self,
        num_users: int,
        num_items: int,
        loss: Literal["bpr", "bce"] = "bpr",
        l2: float = 1e-4,
        lr: float = 1e-3,
        optimizer: Literal["adam", "adamw", "sgd"] = "adam",
        top_k: Sequence[int] = (10, 20),
        eval_auc: bool = True,
    ):
        if type(self)._abstract_methods:
            missing = sorted(type(self)._abstract_methods)
            raise _broken(type(self), "methods", (
                f"it does not implement {', '.join(missing)}, so it cannot be instantiated. Define "
                f"{'it' if len(missing) == 1 else 'them'} in {type(self).__name__} (see the WeightedMF example in the guide)."
            ))
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"{type(self).__name__}(loss=...) must be one of {LOSSES}, got {loss!r}.")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"{type(self).__name__}(optimizer=...) must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}.")
        if num_users < 1 or num_items < 1:
            raise ValueError(f"{type(self).__name__} needs num_users >= 1 and num_items >= 1, got {num_users}, {num_items}.")
        if not (math.isfinite(l2) and l2 >= 0 and math.isfinite(lr) and lr > 0):  # NaN fails every comparison
            raise ValueError(f"{type(self).__name__} needs a finite l2 >= 0 and a finite lr > 0, got l2={l2}, lr={lr}.")
        self.save_hyperparameters()
        self.num_users, self.num_items = num_users, num_items
        self.loss_name, self.l2, self.top_k = loss, l2, tuple(top_k)
        self.val_metrics = FullRankingMetrics(self.top_k, auc=eval_auc)
        self.test_metrics = FullRankingMetrics(self.top_k, auc=eval_auc)
        self._eval_repr: tuple[Tensor, Tensor] | None = None
        self._eval_candidates: dict[str, int | None] = {}  # per stage: candidates per user (None: full ranking)
        self.weights_loaded = False  # load_state_dict sets it: the weights are not the ones initialised here

    # ------------------------------------------------------------------ the contract
    @abstractmethod
    def representations(self) -> tuple[Tensor, Tensor]:
        """``(num_users, D)`` user and ``(num_items, D)`` item vectors fed to :meth:`interact`."""

    @abstractmethod
    def interact(self, user_vectors: Tensor, item_vectors: Tensor) -> Tensor:
        """Scores of aligned (broadcastable) ``(..., D)`` user and item vectors -> ``(...)``."""

    @abstractmethod
    def embedding_penalty(self, users: Tensor, items: Tensor) -> Tensor:
        """Per row, the squared norm of the embedding rows of its user ``(B,)`` and items ``(B, m)``."""

    @abstractmethod
    def parameter_groups(self) -> dict[str, list[Tensor]]:
        """Named parameters: ``user_embedding``, ``item_embedding`` (rows indexed by id), ``dense``."""

    def interact_jacobians(self, user_vectors: Tensor, item_vectors: Tensor) -> tuple[Tensor, Tensor]:
        """Gradients of each score w.r.t. its own user vector and item vector.

        Args:
            user_vectors: ``(P, Du)`` aligned pairs.
            item_vectors: ``(P, Di)``.

        Returns:
            ``(P, Du)`` and ``(P, Di)``. The default uses ``torch.func``; models with a closed
            form (a dot product) override it.
        """
        grads = torch.func.vmap(torch.func.grad(lambda u, v: self.interact(u, v), argnums=(0, 1)))
        return grads(user_vectors, item_vectors)

    def dense_penalty(self) -> Tensor:
        """Regularisation of the dense (non-embedding) weights; a constant per objective."""
        return torch.zeros((), device=self.device)

    def set_graph(self, interactions: Interactions) -> None:
        """Give a graph model the training graph; a no-op for models without one."""

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """:meth:`torch.nn.Module.load_state_dict`, remembering that the weights came from elsewhere (``weights_loaded``).

        Every way of loading weights goes through it (``load_from_checkpoint``, a Trainer's ``ckpt_path``,
        :func:`~lightning_unlearn.unlearning.record.restore_checkpoint`, by hand). An
        :class:`~lightning_unlearn.unlearning.callback.UnlearningCallback` that starts a line of deletions in a fit of such
        a model notes the line as started from those weights too, as it would from a checkpoint given as ``ckpt_path``:
        weights it initialised itself are no trained model's.
        """
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.weights_loaded = True
        return result

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint given to a Trainer as ``ckpt_path`` that must not be loaded, before its weights are.

        An unlearned checkpoint: Lightning would load its weights but neither the removals it
        records (the deleted rows would be trained on, or evaluated, again) nor its callback
        state, and ``fit`` would look for optimizer and loop state it does not hold. Then each of
        the Trainer's callbacks that has a ``check_checkpoint(trainer, checkpoint)`` (an
        :class:`~lightning_unlearn.unlearning.callback.UnlearningCallback`: an older state of its
        record) may refuse it: Lightning calls the callbacks' own hooks only after the weights
        are loaded. ``load_from_checkpoint`` (no Trainer) reads any checkpoint as usual.

        Raises:
            ValueError: ``checkpoint`` is an unlearned one (``datamodule_state`` and ``unlearning``,
                no loop state) and the model is attached to a Trainer.
            StaleCheckpoint: a callback's ``check_checkpoint`` refused it (an older state of its record).
        """
        if self._trainer is None:
            return
        try:
            self._refuse_checkpoint(checkpoint)
        except Exception:
            # Lightning keeps a checkpoint it failed to restore, and would load it at the trainer's next call
            connector = getattr(self._trainer, "_checkpoint_connector", None)
            if connector is not None and hasattr(connector, "_loaded_checkpoint"):
                connector._loaded_checkpoint = {}
            raise

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Each of the Trainer's callbacks that has a ``note_saved_checkpoint(model, checkpoint)`` (an
        :class:`~lightning_unlearn.unlearning.callback.UnlearningCallback`) notes a ``save_weights_only`` checkpoint:
        Lightning calls the callbacks' own ``on_save_checkpoint`` only for full checkpoints (those with callback state),
        where they note it themselves. A subclass that overrides it calls ``super().on_save_checkpoint(checkpoint)``."""
        if self._trainer is None or "callbacks" in checkpoint:  # a full checkpoint: noted by the callbacks' own hook
            return
        for callback in self._trainer.callbacks:
            note = getattr(callback, "note_saved_checkpoint", None)
            if callable(note):
                note(self, checkpoint)

    def _refuse_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "datamodule_state" in checkpoint and "unlearning" in checkpoint and "loops" not in checkpoint:
            raise ValueError(
                f"Trainer.{self._trainer.state.fn.value}(ckpt_path=...) was given an unlearned checkpoint (written by `unlearn` "
                f"or the UnlearningCallback). Lightning would load its weights but not the removals it records, so the "
                f"deleted rows would be back in the data, and it holds no optimizer or loop state. Restore it first and "
                f"give no ckpt_path: `state = restore_checkpoint(path, model, datamodule)` "
                f"(lightning_unlearn.unlearning.record), then, in a fit with an UnlearningCallback, "
                f"`callback.load_state_dict(state['unlearning'])`. On the command line, `--ckpt_path` does this."
            )
        for callback in self._trainer.callbacks:
            check = getattr(callback, "check_checkpoint", None)
            if callable(check):
                check(self._trainer, checkpoint)

    def fresh(self) -> Recommender:
        """A new model with the same hyper-parameters, initialised from the current RNG state."""
        return type(self)(**self._rebuild_kwargs())

    def _rebuild_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.hparams.items() if not k.startswith("_")}  # e.g. the CLI's _class_path

    # ------------------------------------------------------------------ the contract check
    def check_contract(self) -> None:
        """Check the rules of ``docs/own_model.rst`` that a subclass could break; ``setup`` runs it.

        In order: the model can be rebuilt from its hyper-parameters (on the ``meta`` device:
        nothing is allocated), :meth:`parameter_groups` lists every parameter once, in the three
        groups, with tables of ``num_users`` and ``num_items`` rows, :meth:`embedding_penalty`
        is the squared norm of the touched rows (on two hand-picked rows), and the vectors of
        :meth:`representations` depend on those tables and, for a model without ``adjacency``,
        are their rows. That costs milliseconds, plus one forward and one backward pass of
        :meth:`representations` (for a graph model about one training step). It leaves the
        parameters, their gradients and the random number generators as they were. A graph
        model needs its graph (:meth:`set_graph`) first; ``setup`` gives it before checking.

        Raises:
            ContractError: (a ``TypeError``) naming the class, the first rule it breaks (its
                section in ``docs/own_model.rst``) and what to change.

        Example:
            >>> from lightning_unlearn.models import MF
            >>> MF(num_users=3, num_items=4, embedding_dim=2).check_contract()
        """
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self._check_rebuild()
            tables = self._check_groups()
            self._check_computations(tables)

    def _check_rebuild(self) -> None:
        cls, kwargs = type(self), self._rebuild_kwargs()
        missing = [k for k in _RECOMMENDER_ARGS if k not in kwargs]
        if missing:
            raise _broken(cls, "rebuild", (
                f"its hyper-parameters lack {', '.join(missing)}, which Recommender.__init__ saves. Do not "
                "replace them afterwards (self.save_hyperparameters(...) in the subclass, or ignore=[...])."
            ))
        used = {"num_users": self.num_users, "num_items": self.num_items, "loss": self.loss_name, "l2": self.l2, "top_k": self.top_k}
        for key, value in used.items():
            saved = kwargs[key]
            if (tuple(saved) if key == "top_k" and isinstance(saved, Iterable) else saved) != value:
                raise _broken(cls, "rebuild", (
                    f"{cls.__name__}.__init__ was given {key}={saved!r}, but Recommender.__init__ got {key}={value!r}. "
                    "Pass **kwargs on to it unchanged: super().__init__(num_users, num_items, **kwargs)."
                ))
        try:
            rebuilt = self._build(kwargs)
        except Exception as exc:
            raise _broken(cls, "rebuild", (
                f"{cls.__name__}(**model.hparams) fails ({type(exc).__name__}: {exc}), so fresh() and Retrain cannot "
                "rebuild it. Accept **kwargs in __init__ and pass them on to Recommender.__init__, which saves every "
                "argument as a hyper-parameter."
            )) from exc
        own, new = ({n: tuple(p.shape) for n, p in m.named_parameters()} for m in (self, rebuilt))
        differ = sorted(set(own) ^ set(new)) or [n for n in own if own[n] != new[n]]
        if differ:
            name = differ[0]
            raise _broken(cls, "rebuild", (
                f"{cls.__name__}(**model.hparams) builds a different model (parameter {name!r}: "
                f"{new.get(name, 'absent')} instead of {own.get(name, 'absent')}). Every constructor argument must "
                "stay a hyper-parameter as given: no save_hyperparameters(ignore=[...]), no changing an argument "
                "before super().__init__."
            ))

    def _build(self, kwargs: dict[str, Any]) -> Recommender:
        """``type(self)(**kwargs)``, on the ``meta`` device when the constructor allows it, with its warnings muted."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with torch.device("meta"):
                    return type(self)(**kwargs)
            except Exception:  # noqa: BLE001  a constructor that needs real tensors; the caller restores the RNG
                return type(self)(**kwargs)

    def _check_groups(self) -> dict[str, list[tuple[str, Tensor]]]:
        """The named tables of the two embedding groups, after checking every group."""
        cls = type(self)
        try:
            groups = self.parameter_groups()
        except Exception as exc:
            raise _broken(cls, "groups", f"parameter_groups() raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(groups, Mapping):
            raise _broken(cls, "groups", f"parameter_groups() returned a {type(groups).__name__}, not a dict of the groups {GROUPS}.")
        missing, unknown = [g for g in GROUPS if g not in groups], [g for g in groups if g not in GROUPS]
        if missing or unknown:
            raise _broken(cls, "groups", (
                f"parameter_groups() has the groups {sorted(groups)}, not {list(GROUPS)}"
                + (f" (missing: {', '.join(missing)})" if missing else "")
                + (f" (unknown: {', '.join(map(str, unknown))}: put those tensors in 'dense')" if unknown else "")
                + ". Return all three, each a list of parameters (an empty list if there are none)."
            ))
        for group in GROUPS:
            if isinstance(groups[group], Tensor) or not isinstance(groups[group], Iterable):
                raise _broken(cls, "groups", f"parameter_groups()[{group!r}] is a {type(groups[group]).__name__}, not a list of parameters.")
        groups = {group: list(groups[group]) for group in GROUPS}
        names = {id(p): n for n, p in self.named_parameters()}
        seen: dict[int, str] = {}
        for group, tensors in groups.items():
            for tensor in tensors:
                if id(tensor) not in names:
                    shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
                    raise _broken(cls, "groups", (
                        f"parameter_groups()[{group!r}] holds {shape}, which is not a parameter of the model. List "
                        "the parameters themselves (e.g. self.user_embedding.weight), not copies, slices or detached tensors."
                    ))
                if id(tensor) in seen:
                    raise _broken(cls, "groups", f"parameter {names[id(tensor)]!r} is listed in {seen[id(tensor)]!r} and in {group!r}; list it once.")
                seen[id(tensor)] = group
        uncovered = [n for i, n in names.items() if i not in seen]
        if uncovered:
            raise _broken(cls, "groups", (
                f"the parameters {', '.join(map(repr, uncovered))} are in no group: tables indexed by user or item id "
                "go in 'user_embedding' or 'item_embedding', everything else in 'dense'."
            ))
        tables = {}
        for group, rows, label in (("user_embedding", self.num_users, "num_users"), ("item_embedding", self.num_items, "num_items")):
            if not groups[group]:
                raise _broken(cls, "groups", f"parameter_groups()[{group!r}] is empty: list the embedding tables of that side.")
            for tensor in groups[group]:
                if tensor.dim() != 2 or tensor.shape[0] != rows:
                    raise _broken(cls, "groups", (
                        f"parameter {names[id(tensor)]!r} in {group!r} has shape {tuple(tensor.shape)}: a table of that "
                        f"group is ({label}={rows}, width), one row per id."
                    ))
            tables[group] = [(names[id(t)], t) for t in groups[group]]
        return tables

    def _check_computations(self, tables: dict[str, list[tuple[str, Tensor]]]) -> None:
        """The penalty and representations rules, on copies of the tables (leaves that take gradients).

        In ``setup`` the model is still where it was built while ``self.device`` already names the
        trainer's device (and so does the graph a graph model was given there): tensors elsewhere
        are evaluated as copies on ``self.device``.
        """
        device = self.device
        leaves = {name: t.detach().to(device).requires_grad_() for side in tables.values() for name, t in side}
        replaced = dict(leaves)
        for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
            if name not in leaves and tensor.device != device:
                replaced[name] = tensor.detach().to(device)
        user_tables = [leaves[name] for name, _ in tables["user_embedding"]]
        item_tables = [leaves[name] for name, _ in tables["item_embedding"]]

        def check() -> None:
            self._check_penalty(user_tables, item_tables)
            self._check_representations(tables, user_tables, item_tables)

        with torch.inference_mode(False), torch.enable_grad():
            call_with(self, replaced, check)

    def _check_penalty(self, user_tables: list[Tensor], item_tables: list[Tensor]) -> None:
        cls, device = type(self), user_tables[0].device
        users = torch.tensor([0, self.num_users - 1], device=device)
        items = torch.tensor([[0, self.num_items - 1], [self.num_items // 2, 0]], device=device)
        with torch.no_grad():
            try:
                value = self.embedding_penalty(users, items)
            except Exception as exc:
                raise _broken(cls, "penalty", (
                    f"embedding_penalty(users, items) raised {type(exc).__name__}: {exc} (users of shape (2,), items of "
                    "shape (2, 2): each row's positive and negatives)."
                )) from exc
            if not isinstance(value, Tensor) or value.shape != (2,):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise _broken(cls, "penalty", (
                    f"embedding_penalty(users (2,), items (2, 2)) returned {shape}, not (2,): one value per row, its "
                    "items' squared norms summed over their slots."
                ))
            expected = sum(t[users].square().sum(-1) for t in user_tables) + sum(t[items].square().sum((-1, -2)) for t in item_tables)
            if not torch.allclose(value.double(), expected.double(), rtol=1e-3, atol=1e-8):
                raise _broken(cls, "penalty", (
                    f"embedding_penalty gives {[round(v, 6) for v in value.tolist()]} for users {users.tolist()} with items "
                    f"{items.tolist()}, but the squared norms of those rows of the user_embedding and item_embedding tables "
                    f"sum to {[round(v, 6) for v in expected.tolist()]}. Return ||user row||^2 + the sum over the row's "
                    "items of ||item row||^2 (every table of the group), which the methods' curvature assumes."
                ))

    def _check_representations(self, tables: dict[str, list[tuple[str, Tensor]]], user_tables: list[Tensor], item_tables: list[Tensor]) -> None:
        cls = type(self)
        try:
            vectors = self.representations()
        except Exception as exc:
            raise _broken(cls, "representations", f"representations() raised {type(exc).__name__}: {exc}") from exc
        if not (isinstance(vectors, (tuple, list)) and len(vectors) == 2 and all(isinstance(v, Tensor) for v in vectors)):
            raise _broken(cls, "representations", "representations() must return a (user_vectors, item_vectors) pair of tensors.")
        sides = (("user", "user_embedding", self.num_users), ("item", "item_embedding", self.num_items))
        for (label, _, rows), side_vectors in zip(sides, vectors):
            if side_vectors.dim() != 2 or side_vectors.shape[0] != rows:
                raise _broken(cls, "representations", f"its {label} vectors have shape {tuple(side_vectors.shape)}, not ({rows}, D).")
        # One backward pass: every table must receive a gradient from the vectors.
        leaves = [*user_tables, *item_tables]
        total = sum(v.sum() for v in vectors if v.requires_grad)
        grads = torch.autograd.grad(total, leaves, allow_unused=True) if isinstance(total, Tensor) else [None] * len(leaves)
        for (name, _), grad in zip([*tables["user_embedding"], *tables["item_embedding"]], grads):
            if grad is None or not bool(grad.any()):
                group = "user_embedding" if any(name == n for n, _ in tables["user_embedding"]) else "item_embedding"
                raise _broken(cls, "representations", (
                    f"its vectors do not depend on {name!r} (parameter_groups()[{group!r}]), so training and "
                    "unlearning cannot move them. Compute them from the tables inside representations(): no "
                    "detach(), torch.no_grad() or cached copies."
                ))
        if getattr(self, "adjacency", None) is not None:
            return  # a graph model: the vectors are propagated rows
        for (label, group, _), side_vectors, side_tables in zip(sides, vectors, (user_tables, item_tables)):
            rows_of_tables = torch.cat(side_tables, dim=1)
            if side_vectors.shape != rows_of_tables.shape or not torch.equal(side_vectors.detach(), rows_of_tables.detach()):
                names = ", ".join(name for name, _ in tables[group])
                raise _broken(cls, "representations", (
                    f"its {label} vectors are not the rows of parameter_groups()[{group!r}] ({names}) concatenated in "
                    "that order, which the methods' curvature blocks rely on. Return the tables (torch.cat of them) "
                    "or, for a model that computes the vectors through a graph, set self.adjacency."
                ))

    # ------------------------------------------------------------------ scoring
    def score(self, users: Tensor, items: Tensor) -> Tensor:
        """Scores of ``(user, item)`` pairs (broadcastable index tensors)."""
        user_vectors, item_vectors = self.representations()
        return self.interact(user_vectors[users], item_vectors[items])

    def full_scores(self, users: Tensor, representations: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``(len(users), num_items)`` scores of every item for ``users``."""
        user_vectors, item_vectors = representations or self.representations()
        return self.interact(user_vectors[users].unsqueeze(1), item_vectors.unsqueeze(0))

    def row_scores(self, batch: dict[str, Tensor], representations: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``(R, 1 + k)`` scores of each row's positive, then its negatives (the input of :func:`~lightning_unlearn.losses.data_loss`).

        Args:
            batch: ``users`` (R,), ``items`` (R,) and ``negatives`` (R, k) index tensors.
            representations: ``self.representations()``, when computed once for many batches.

        Example:
            >>> from lightning_unlearn.models import MF
            >>> model = MF(3, 4, embedding_dim=2)
            >>> batch = {"users": torch.tensor([0, 2]), "items": torch.tensor([1, 3]), "negatives": torch.tensor([[2], [0]])}
            >>> torch.allclose(model.row_scores(batch)[:, 0], model.score(batch["users"], batch["items"]))
            True
        """
        user_vectors, item_vectors = representations or self.representations()
        return self.interact(gather_rows(user_vectors, batch["users"]).unsqueeze(1), gather_rows(item_vectors, item_slots(batch)))

    def loss(self, batch: dict[str, Tensor], reduction: Literal["mean", "sum", "none"] = "mean",
             representations: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Per-row training loss (data term + L2 on the touched rows) of a batch of rows.

        Args:
            batch: ``users`` (B,), ``items`` (B,) and ``negatives`` (B, k) index tensors.
            reduction: ``"mean"``, ``"sum"`` or ``"none"`` (a ``(B,)`` tensor).
            representations: ``self.representations()``, when computed once for many batches.
        """
        data = data_loss(self.row_scores(batch, representations), self.loss_name)
        per_row = data + 0.5 * self.l2 * self.embedding_penalty(batch["users"], item_slots(batch))
        if reduction == "none":
            return per_row
        return per_row.sum() if reduction == "sum" else per_row.mean()

    @torch.no_grad()
    def evaluate(self, loader: Iterable[dict[str, Tensor]], prefix: str = "test") -> dict[str, float]:
        """Ranking metrics over ranking batches (e.g. ``datamodule.test_dataloader()``), outside a Trainer.

        The loader covers every user it is given, so the metric is not synchronised across
        processes (one process may evaluate while the others wait, e.g. rank zero under DDP).
        Batches with sampled candidates (``RecDataModule(eval_candidates=N)``) are ranked
        against those only, and reported under ``<prefix>/sampled/``.

        Returns:
            ``{"<prefix>/recall@K": ..., ...}`` as floats; for sampled candidates
            ``{"<prefix>/sampled/recall@K": ..., ..., "<prefix>/sampled/candidates": N}``; ``{}``
            when the loader has no batch (a split without users, e.g. no validation split): no
            figure, rather than zeros.
        """
        metric = FullRankingMetrics(self.top_k, auc=self.hparams.eval_auc, sync_on_compute=False).to(self.device)
        candidates = getattr(getattr(loader, "dataset", None), "candidates", None)
        representations = self.representations()
        seen = False
        for batch in loader:
            used = self._ranking_update({k: v.to(self.device) for k, v in batch.items()}, metric, representations)
            candidates, seen = used if used is not None else candidates, True
        return self._ranking_results(prefix, metric.compute(), candidates) if seen else {}

    def candidate_scores(self, users: Tensor, items: Tensor, representations: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``(B, W)`` scores of a few items per user: ``users`` (B,), ``items`` (B, W) (sampled evaluation).

        :meth:`interact` on the gathered vectors, a block of users at a time (about 16M gathered
        vector entries, 64 MB of float32, each); never the full catalog.

        Example:
            >>> from lightning_unlearn.models import MF
            >>> model = MF(3, 4, embedding_dim=2)
            >>> users, items = torch.tensor([0, 2]), torch.tensor([[1, 3], [0, 0]])
            >>> torch.allclose(model.candidate_scores(users, items), model.full_scores(users).gather(1, items))
            True
        """
        user_vectors, item_vectors = representations or self.representations()
        rows, width = items.shape
        step = max(1, _CANDIDATE_CELLS // max(width * item_vectors.shape[1], 1))
        parts = []
        for s in range(0, rows, step):
            block = items[s:s + step]  # index_select of the flat indices gathers about twice as fast as vectors[block]
            gathered = item_vectors.index_select(0, block.reshape(-1)).view(*block.shape, -1)
            parts.append(self._score_candidates(user_vectors[users[s:s + step]], gathered))
        return torch.cat(parts) if parts else item_vectors.new_zeros(0, width)

    def _score_candidates(self, user_vectors: Tensor, item_vectors: Tensor) -> Tensor:
        """``(b, W)`` scores of ``user_vectors`` (b, Du) with their own ``item_vectors`` (b, W, Di): :meth:`interact`."""
        return self.interact(user_vectors.unsqueeze(1), item_vectors)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        train = getattr(datamodule, "train", None)
        if isinstance(train, Interactions):
            self.set_graph(train)
        self.check_contract()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch) + self.dense_penalty()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["users"]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return OPTIMIZERS[self.hparams.optimizer](self.parameters(), lr=self.hparams.lr)

    def _ranking_step(self, batch: dict[str, Tensor], metric: FullRankingMetrics, stage: str) -> None:
        if self._eval_repr is None:
            self._eval_repr = self.representations()
        used = self._ranking_update(batch, metric, self._eval_repr)
        if used is not None:
            self._eval_candidates[stage] = used

    def _ranking_update(self, batch: dict[str, Tensor], metric: FullRankingMetrics,
                        representations: tuple[Tensor, Tensor]) -> int | None:
        """Add a ranking batch to ``metric``; returns its candidates per user (``None``: full ranking)."""
        if "candidate_items" not in batch:
            scores = self.full_scores(batch["users"], representations)
            metric.update(scores, target_rows=batch["target_rows"], target_items=batch["target_items"],
                          exclude_rows=batch["exclude_rows"], exclude_items=batch["exclude_items"], overwrite=True,
                          blocked_items=batch.get("blocked_items"))
            return None
        # Sampled: score the targets and candidates only, as one compact matrix with its own coordinates.
        layout = candidate_layout(batch["target_rows"], batch["target_items"], batch["candidate_items"], batch["num_candidates"],
                                  batch["exclude_rows"], batch["exclude_items"])
        scores = self.candidate_scores(batch["users"], layout.items.clamp_min(0), representations)
        metric.update(scores, target_rows=layout.target_rows, target_items=layout.target_cols,
                      exclude_rows=layout.exclude_rows, exclude_items=layout.exclude_cols, overwrite=True)
        return batch["candidate_items"].shape[1]

    def _ranking_results(self, prefix: str, values: dict[str, Tensor], candidates: int | None) -> dict[str, float]:
        """Metric values under their logged names: ``<prefix>/<metric>``, or ``<prefix>/sampled/<metric>`` with ``candidates``."""
        name = metric_prefix(prefix, candidates)
        out = {f"{name}/{k}": v.item() for k, v in values.items()}
        if candidates is not None:
            out[f"{name}/candidates"] = float(candidates)
        return out

    def _log_ranking(self, prefix: str, metric: FullRankingMetrics) -> None:
        self._eval_repr = None
        candidates = self._eval_candidates.get(prefix)
        name = metric_prefix(prefix, candidates)
        self.log_dict({f"{name}/{k}": v for k, v in metric.compute().items()}, prog_bar=prefix == "val")
        if candidates is not None:
            self.log(f"{name}/candidates", float(candidates))
        metric.reset()

    def _start_ranking(self, stage: str) -> None:
        """Before an evaluation epoch: the datamodule's ``eval_candidates`` (batches may say otherwise)."""
        self._eval_repr = None
        hparams = getattr(getattr(self._trainer, "datamodule", None), "hparams", None) if self._trainer is not None else None
        self._eval_candidates[stage] = getattr(hparams, "eval_candidates", None)

    def on_validation_epoch_start(self) -> None:
        self._start_ranking("val")

    def on_test_epoch_start(self) -> None:
        self._start_ranking("test")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._ranking_step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_ranking("val", self.val_metrics)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._ranking_step(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self._log_ranking("test", self.test_metrics)


Recommender._abstract_methods = _abstract_names(Recommender)
