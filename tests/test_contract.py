"""The Recommender contract is enforced early: at construction (the four methods) and in ``setup`` (the rest).

One tiny, deliberately broken subclass per rule of docs/own_model.rst; each error must name its
rule by the section's label (``contract-<rule>``) and title.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from lightning_unlearn.data import Synthetic, planted_low_rank
from lightning_unlearn.data.datamodule import RecDataModule
from lightning_unlearn.models import MF, LightGCN, NeuMF, Recommender
from lightning_unlearn.models.base import CONTRACT_RULES, ContractError
from tests.conftest import REPO


class Tiny(Recommender):
    """A valid model with a dense parameter: s_ui = sum_d w_d p_ud q_id (the guide's WeightedMF)."""

    def __init__(self, num_users: int, num_items: int, embedding_dim: int = 4, **kwargs):
        super().__init__(num_users, num_items, **kwargs)
        self.user_embedding = nn.Embedding(num_users, embedding_dim)
        self.item_embedding = nn.Embedding(num_items, embedding_dim)
        self.weight = nn.Parameter(torch.ones(embedding_dim))

    def representations(self) -> tuple[Tensor, Tensor]:
        return self.user_embedding.weight, self.item_embedding.weight

    def interact(self, user_vectors: Tensor, item_vectors: Tensor) -> Tensor:
        return (self.weight * user_vectors * item_vectors).sum(-1)

    def embedding_penalty(self, users: Tensor, items: Tensor) -> Tensor:
        return self.user_embedding.weight[users].square().sum(-1) + self.item_embedding.weight[items].square().sum((-1, -2))

    def parameter_groups(self) -> dict[str, list[Tensor]]:
        return {"user_embedding": [self.user_embedding.weight], "item_embedding": [self.item_embedding.weight], "dense": [self.weight]}


@contextmanager
def broken(rule: str, *details: str) -> Iterator[None]:
    """Expect a ContractError that cites ``rule`` (its title and label in the guide) and says each of ``details``."""
    with pytest.raises(ContractError) as info:
        yield
    message = str(info.value)
    assert f'breaks rule "{CONTRACT_RULES[rule]}" of the Recommender contract (docs/own_model.rst#contract-{rule}): ' in message
    for detail in details:
        assert detail in message, message


def test_every_rule_an_error_cites_is_a_labelled_section_of_the_guide():
    page = (REPO / "docs" / "own_model.rst").read_text(encoding="utf-8")
    for rule, title in CONTRACT_RULES.items():
        assert f".. _contract-{rule}:\n\n{title}\n{'~' * len(title)}\n" in page


# ------------------------------------------------------------------ the four methods
def test_unimplemented_methods_fail_at_construction():
    class NoPenalty(Recommender):
        representations, interact, parameter_groups = Tiny.representations, Tiny.interact, Tiny.parameter_groups

    with broken("methods", "NoPenalty", "does not implement embedding_penalty,"):
        NoPenalty(3, 3)
    with broken("methods", "embedding_penalty, interact, parameter_groups, representations"):
        Recommender(3, 3)
    assert issubclass(ContractError, TypeError)


def test_abstract_methods_follow_the_class_hierarchy():
    class WithExtra(Tiny):  # an intermediate base may declare abstract methods of its own
        @abstractmethod
        def extra(self) -> None: ...

    class Done(WithExtra):
        def extra(self) -> None:
            return None

    with broken("methods", "does not implement extra"):
        WithExtra(3, 3)
    Done(3, 3).check_contract()  # implementing it in a subclass is enough, as with abc


# ------------------------------------------------------------------ rebuildable from its hyper-parameters
def test_init_without_kwargs_cannot_be_rebuilt():
    class FixedRate(Tiny):
        def __init__(self, num_users: int, num_items: int, embedding_dim: int = 4):
            super().__init__(num_users, num_items, embedding_dim=embedding_dim, lr=0.05)

    with broken("rebuild", "FixedRate(**model.hparams) fails", "unexpected keyword argument", "Accept **kwargs"):
        FixedRate(3, 3).check_contract()


def test_kwargs_swallowed_instead_of_passed_on():
    class Swallows(Tiny):
        def __init__(self, num_users: int, num_items: int, embedding_dim: int = 4, **kwargs):
            super().__init__(num_users, num_items, embedding_dim=embedding_dim)  # kwargs dropped

    with broken("rebuild", "Swallows.__init__ was given l2=0.5, but Recommender.__init__ got l2=0.0001", "**kwargs"):
        Swallows(3, 3, l2=0.5).check_contract()


def test_hyper_parameters_that_do_not_describe_the_model():
    class Doubles(Tiny):
        def __init__(self, num_users: int, num_items: int, embedding_dim: int = 4, **kwargs):
            embedding_dim = 2 * embedding_dim  # saved doubled: a rebuild doubles it again
            super().__init__(num_users, num_items, embedding_dim=embedding_dim, **kwargs)

    class Ignores(Tiny):
        ignored = ("embedding_dim",)

        def __init__(self, num_users: int, num_items: int, embedding_dim: int = 4, **kwargs):
            super().__init__(num_users, num_items, embedding_dim=embedding_dim, **kwargs)
            self.save_hyperparameters(ignore=list(self.ignored))  # drops them from what Recommender saved too

    with broken("rebuild", "builds a different model", "'weight': (16,) instead of (8,)"):
        Doubles(3, 3).check_contract()
    Ignores(3, 3).check_contract()  # the default size: the rebuild happens to be the same model
    with broken("rebuild", "Ignores(**model.hparams) builds a different model", "'weight': (4,) instead of (8,)"):
        Ignores(3, 3, embedding_dim=8).check_contract()
    Ignores.ignored = ("l2",)
    with broken("rebuild", "its hyper-parameters lack l2, which Recommender.__init__ saves"):
        Ignores(3, 3).check_contract()


# ------------------------------------------------------------------ every parameter in one group
def without(group):
    return lambda self: {k: v for k, v in Tiny.parameter_groups(self).items() if k != group}


@pytest.mark.parametrize(
    ("parameter_groups", "details"),
    [
        (without("dense"), ["(missing: dense)"]),
        (without("item_embedding"), ["(missing: item_embedding)"]),
        (lambda self: {**Tiny.parameter_groups(self), "bias": []}, ["(unknown: bias"]),
        (lambda self: {**Tiny.parameter_groups(self), "dense": []}, ["'weight' are in no group"]),
        (lambda self: {**Tiny.parameter_groups(self), "dense": [self.weight.detach()]}, ["['dense'] holds (4,), which is not a parameter"]),
        (lambda self: {**Tiny.parameter_groups(self), "dense": [self.weight, self.weight]}, ["'weight' is listed in 'dense' and in 'dense'"]),
        (lambda self: {**Tiny.parameter_groups(self), "dense": self.weight}, ["['dense'] is a Parameter, not a list"]),
        (lambda self: {"user_embedding": [self.item_embedding.weight], "item_embedding": [self.user_embedding.weight], "dense": [self.weight]},
         ["'item_embedding.weight' in 'user_embedding' has shape (3, 4)", "(num_users=2, width)"]),
        (lambda self: [self.weight], ["returned a list, not a dict"]),
    ],
    ids=["no-dense", "no-item", "unknown", "uncovered", "copy", "twice", "not-a-list", "wrong-rows", "not-a-dict"],
)
def test_parameter_groups(parameter_groups, details):
    cls = type("BadGroups", (Tiny,), {"parameter_groups": parameter_groups})
    with broken("groups", "BadGroups", *details):
        cls(2, 3).check_contract()


# ------------------------------------------------------------------ the embedding penalty
@pytest.mark.parametrize(
    ("embedding_penalty", "details"),
    [
        (lambda self, users, items: self.user_embedding.weight[users].square().sum(-1)
         + self.item_embedding.weight[items[:, 0]].square().sum(-1), ["the squared norms of those rows"]),  # positives only
        (lambda self, users, items: self.user_embedding.weight[users].abs().sum(-1)
         + self.item_embedding.weight[items].abs().sum((-1, -2)), ["||user row||^2"]),  # L1
        (lambda self, users, items: self.item_embedding.weight[items].square().sum(-1), ["returned (2, 2), not (2,)"]),
        (lambda self, users, items: Recommender.embedding_penalty(self, users, items), ["returned NoneType"]),
        (lambda self, users, items: (_ for _ in ()).throw(NotImplementedError("later")), ["raised NotImplementedError: later"]),
    ],
    ids=["positives-only", "l1", "per-slot", "none", "raises"],
)
def test_embedding_penalty(embedding_penalty, details):
    cls = type("BadPenalty", (Tiny,), {"embedding_penalty": embedding_penalty})
    with broken("penalty", "BadPenalty", *details):
        cls(3, 5).check_contract()


# ------------------------------------------------------------------ vectors from the embedding tables
@pytest.mark.parametrize(
    ("representations", "details"),
    [
        (lambda self: (self.user_embedding.weight.detach(), self.item_embedding.weight), ["do not depend on 'user_embedding.weight'"]),
        (lambda self: (self.user_embedding.weight, torch.zeros_like(self.item_embedding.weight)), ["do not depend on 'item_embedding.weight'"]),
        (lambda self: (torch.tanh(self.user_embedding.weight), self.item_embedding.weight),
         ["user vectors are not the rows of parameter_groups()['user_embedding']", "set self.adjacency"]),
        (lambda self: (self.user_embedding.weight, self.item_embedding.weight[:2]), ["item vectors have shape (2, 4), not (3, D)"]),
        (lambda self: self.user_embedding.weight, ["must return a (user_vectors, item_vectors) pair"]),
    ],
    ids=["detached", "constant", "transformed", "too-few-rows", "not-a-pair"],
)
def test_representations(representations, details):
    cls = type("BadVectors", (Tiny,), {"representations": representations})
    with broken("representations", "BadVectors", *details):
        cls(2, 3).check_contract()


def test_frozen_tables_are_checked_too():
    model = Tiny(2, 3)
    model.user_embedding.weight.requires_grad_(False)
    model.check_contract()  # frozen, but the vectors are its rows
    cls = type("Detached", (Tiny,), {"representations": lambda self: (self.user_embedding.weight.detach(), self.item_embedding.weight.detach())})
    with broken("representations", "do not depend on 'user_embedding.weight'"):
        cls(2, 3).check_contract()


# ------------------------------------------------------------------ the shipped models, and what the check leaves alone
def built(cls) -> Recommender:
    graph = planted_low_rank(7, 9, rank=2, density=0.3, seed=1)
    model = NeuMF(7, 9, gmf_dim=3, mlp_dim=4, mlp_layers=(6, 3)) if cls is NeuMF else cls(7, 9, embedding_dim=4)
    model.set_graph(graph)
    return model


@pytest.mark.parametrize("cls", [MF, LightGCN, NeuMF, Tiny])
def test_shipped_models_pass_and_the_check_changes_nothing(cls):
    model = built(cls)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    model.check_contract()
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert model.fresh().hparams == model.hparams


def test_lightgcn_without_its_graph_is_told_to_set_it():
    with broken("representations", "LightGCN has no graph: call set_graph"):
        LightGCN(3, 3, embedding_dim=2).check_contract()


def test_double_precision_and_no_grad_context():
    model = built(NeuMF).double()
    with torch.no_grad():
        model.check_contract()
    with torch.inference_mode():
        model.check_contract()


# ------------------------------------------------------------------ when: setup, before the first step
class Steps(pl.Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1


def fit(model: Recommender, steps: Steps) -> None:
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[steps])
    trainer.fit(model, RecDataModule(Synthetic(num_users=30, num_items=20), num_negatives=2, batch_size=32))


def test_fit_checks_in_setup_before_any_training_step(monkeypatch):
    steps, calls, check = Steps(), [], Recommender.check_contract
    monkeypatch.setattr(Recommender, "check_contract", lambda self: (calls.append((steps.batches, self.trainer.global_step)), check(self)))
    fit(Tiny(30, 20), steps)
    assert calls == [(0, 0)] and steps.batches == 2  # checked once, in setup, then trained

    cls = type("BadGroups", (Tiny,), {"parameter_groups": without("dense")})
    steps, calls = Steps(), []
    with broken("groups", "BadGroups", "(missing: dense)"):
        fit(cls(30, 20), steps)
    assert calls == [(0, 0)] and steps.batches == 0


def test_lightgcn_is_checked_after_setup_gives_it_the_graph():
    steps = Steps()
    fit(LightGCN(30, 20, embedding_dim=4, num_layers=2), steps)
    assert steps.batches == 2
