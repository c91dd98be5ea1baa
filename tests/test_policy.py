"""UnlearningCallback's retrain policy: Retrain serves a request every N requests or past a drift bound."""

from __future__ import annotations

import copy
import json
import math

import pytest
import pytorch_lightning as pl
import torch

from lightning_unlearn.data import RecDataModule, Synthetic
from lightning_unlearn.models import MF
from lightning_unlearn.unlearning import IFRU, FineTune, Unlearner, UnlearningCallback, UnlearningContext, UnlearningError
from lightning_unlearn.unlearning.methods.alteraser import AltEraser
from lightning_unlearn.unlearning.recipe import FitRecipe
from lightning_unlearn.unlearning.request import DeletionRequest
from lightning_unlearn.unlearning.stationarity import objective_gradient_norm

RECIPE = FitRecipe(max_epochs=3, monitor=None)


def datamodule() -> RecDataModule:
    dm = RecDataModule(Synthetic(num_users=40, num_items=30, density=0.25, seed=1), batch_size=64, num_negatives=2, seed=0)
    dm.setup()
    return dm


def fitted(dm: RecDataModule) -> MF:
    """MF fitted with the recipe from seed 0: what Retrain gives on ``dm``'s current rows."""
    pl.seed_everything(0, verbose=False)
    model = MF(dm.num_users, dm.num_items, embedding_dim=8, lr=0.05)
    RECIPE(model, dm)
    return model


def pair(dm: RecDataModule, row: int) -> DeletionRequest:
    """A request for one training row (by raw ids)."""
    return DeletionRequest(pairs=[(int(dm.train.user_ids[dm.train.users[row]]), int(dm.train.item_ids[dm.train.items[row]]))])


def apply(callback: UnlearningCallback, model: MF, dm: RecDataModule, count: int, rows_each: int = 1):
    """Queue ``count`` requests of ``rows_each`` current training rows (spread over the table) and apply them one at a time."""
    reports = []
    for _ in range(count):
        step = max(len(dm.train) // rows_each, 1)
        pairs = [pair(dm, i * step).pairs[0] for i in range(rows_each)]
        callback.request(DeletionRequest(pairs=pairs))
        reports += callback.apply_pending(model, dm, recipe=RECIPE, seed=0)
    return reports


def applied(folder) -> list[dict]:
    entries = [json.loads(line) for line in (folder / "journal.jsonl").read_text().splitlines()]
    return [e for e in entries if e["status"] == "applied"]


def same_parameters(a: MF, b: MF) -> bool:
    return all(torch.equal(a.state_dict()[name], value) for name, value in b.state_dict().items())


def test_retrain_every_serves_every_nth_request_with_a_real_retrain(tmp_path):
    dm = datamodule()
    model = fitted(dm)
    callback = UnlearningCallback(IFRU(), dirpath=tmp_path, evaluate=False, seed=0, retrain_every=3, max_deleted_fraction=None)
    reports = apply(callback, model, dm, 3)
    assert [r.method for r in reports] == ["IFRU(k_hop=0)", "IFRU(k_hop=0)", "Retrain"]
    # the third request was served by Retrain: the model is a fresh fit on the rows that remain
    expected_dm = datamodule()
    expected_dm.load_state_dict(dm.state_dict())
    assert torch.equal(expected_dm.train.keys, dm.train.keys) and len(dm.train) == len(datamodule().train) - 3
    assert same_parameters(model, fitted(expected_dm))
    assert callback.drift == 0.0

    reports = apply(callback, model, dm, 4)
    assert [r.method for r in reports] == ["IFRU(k_hop=0)", "IFRU(k_hop=0)", "Retrain", "IFRU(k_hop=0)"]
    entries = applied(tmp_path)
    assert [e["method"] for e in entries] == ["IFRU(k_hop=0)", "IFRU(k_hop=0)", "Retrain"] * 2 + ["IFRU(k_hop=0)"]
    assert [e.get("policy") for e in entries] == [None, None, "retrain_every"] * 2 + [None]
    assert [e["drift"] > 0 for e in entries] == [True, True, False] * 2 + [True]


def test_max_deleted_fraction_fires_once_the_drift_estimate_has_passed_it(tmp_path):
    dm = datamodule()
    model = fitted(dm)
    n = len(dm.train)
    callback = UnlearningCallback(FineTune(epochs=1), dirpath=tmp_path, evaluate=False, seed=0, max_deleted_fraction=4.5 / n)
    assert callback.drift == 0.0
    reports = apply(callback, model, dm, 3, rows_each=2)  # the drift before each: 0, 2/n, 4/n: not past 4.5/n
    assert [r.method for r in reports] == ["FineTune(epochs=1)"] * 3 and callback.drift == pytest.approx(6 / n)
    reports = apply(callback, model, dm, 1, rows_each=2)  # 6/n has passed 4.5/n: Retrain serves the next request
    assert [r.method for r in reports] == ["Retrain"] and callback.drift == 0.0
    expected_dm = datamodule()
    expected_dm.load_state_dict(dm.state_dict())
    assert len(dm.train) == n - 8 and same_parameters(model, fitted(expected_dm))
    # the estimate restarts from the rows the retrained model was fitted on
    reports = apply(callback, model, dm, 2, rows_each=2)
    assert [r.method for r in reports] == ["FineTune(epochs=1)"] * 2 and callback.drift == pytest.approx(4 / (n - 8))
    entries = applied(tmp_path)
    assert [e.get("policy") for e in entries] == [None, None, None, "max_deleted_fraction", None, None]
    assert [e["drift"] for e in entries] == pytest.approx([2 / n, 4 / n, 6 / n, 0.0, 2 / (n - 8), 4 / (n - 8)])


def test_the_first_request_after_a_fit_is_the_methods_however_large(tmp_path):
    """One deletion is what ``compare`` judges a method on; the bound is on what adds up after it."""
    dm = datamodule()
    model = fitted(dm)
    callback = UnlearningCallback(FineTune(epochs=1), dirpath=tmp_path, evaluate=False, seed=0, max_deleted_fraction=1 / len(dm.train))
    reports = apply(callback, model, dm, 2, rows_each=3)
    assert [r.method for r in reports] == ["FineTune(epochs=1)", "Retrain"]


def test_auto_bounds_the_methods_whose_drift_was_measured():
    from lightning_unlearn.unlearning import Retrain
    from lightning_unlearn.unlearning.callback import MAX_DELETED_FRACTION

    assert MAX_DELETED_FRACTION == 0.03
    for method in (IFRU(), IFRU(k_hop=1), AltEraser(rounds=2)):
        assert UnlearningCallback(method).max_deleted_fraction == MAX_DELETED_FRACTION
        assert UnlearningCallback(method, max_deleted_fraction="auto").max_deleted_fraction == MAX_DELETED_FRACTION
    for method in (FineTune(), Retrain()):
        assert UnlearningCallback(method).max_deleted_fraction is None
    assert UnlearningCallback(FineTune(), max_deleted_fraction=0.2).max_deleted_fraction == 0.2
    assert UnlearningCallback(IFRU(), max_deleted_fraction=None).max_deleted_fraction is None


def test_auto_reads_the_methods_measured_bound():
    """"auto" is the method's safe_deleted_fraction: the callback names no method class."""

    class Measured(FineTune):
        safe_deleted_fraction = 0.1

    assert UnlearningCallback(Measured()).max_deleted_fraction == 0.1
    assert IFRU.safe_deleted_fraction == AltEraser.safe_deleted_fraction == 0.03 and FineTune.safe_deleted_fraction is None


def test_the_policy_decides_from_plain_state():
    from lightning_unlearn.unlearning.policy import RetrainPolicy, RetrainReason

    assert [r.value for r in RetrainReason] == ["retrain_every", "max_deleted_fraction", "max_grad_ratio"]
    policy = RetrainPolicy(retrain_every=3, max_deleted_fraction=0.1, max_grad_ratio=2.0)
    policy.start(100, grad_norm=0.5)
    policy.start(90, grad_norm=0.7)  # counted once, at the first request
    assert policy.state_dict() == {"fitted_rows": 100, "fitted_grad_norm": 0.5, "requests": 0, "rows": 0}
    assert policy.reason() is None
    policy.served(11)
    assert policy.drift == pytest.approx(0.11) and policy.reason() is RetrainReason.MAX_DELETED_FRACTION
    policy.served(0)
    assert policy.reason() is RetrainReason.RETRAIN_EVERY  # the third request since the fit
    assert policy.grad_ratio(1.5) == pytest.approx(3.0) and policy.astray(3.0) is RetrainReason.MAX_GRAD_RATIO
    assert policy.astray(0.6) is None and policy.astray(0.4) is RetrainReason.MAX_GRAD_RATIO
    resumed = RetrainPolicy(retrain_every=3)
    resumed.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert resumed.state_dict() == policy.state_dict()
    resumed.load_state_dict({"fitted_rows": 7})  # a partial (older) state: the rest starts afresh
    assert resumed.state_dict() == {"fitted_rows": 7, "fitted_grad_norm": None, "requests": 0, "rows": 0}
    policy.refitted(89, grad_norm=0.4)
    assert policy.state_dict() == {"fitted_rows": 89, "fitted_grad_norm": 0.4, "requests": 0, "rows": 0} and policy.drift == 0


def test_the_policy_validates_its_arguments():
    from lightning_unlearn.unlearning.policy import RetrainPolicy

    with pytest.raises(ValueError, match=r"^RetrainPolicy\(retrain_every=\.\.\.\) must be None or an integer >= 1, got 0"):
        RetrainPolicy(retrain_every=0)
    assert RetrainPolicy(max_deleted_fraction="auto").max_deleted_fraction is None
    assert RetrainPolicy(max_deleted_fraction="auto", auto=0.03).max_deleted_fraction == 0.03
    with pytest.raises(ValueError, match=r"^UnlearningCallback\(max_grad_ratio=\.\.\.\)"):
        RetrainPolicy(max_grad_ratio=1.0, owner="UnlearningCallback")


@pytest.mark.parametrize("method", [IFRU(), AltEraser()], ids=["IFRU", "AltEraser"])
def test_after_a_retrain_the_method_builds_its_curvature_afresh(tmp_path, method):
    """IFRU and AltEraser cache curvature per trained model; after a retrain, the next request
    must not reuse the blocks of the model before it: it gives what a new method instance gives."""
    dm = datamodule()
    model = fitted(dm)
    callback = UnlearningCallback(method, dirpath=tmp_path, evaluate=False, seed=0, retrain_every=2, max_deleted_fraction=None)
    first, second = apply(callback, model, dm, 2)
    assert first.precompute_seconds > 0 and second.method == "Retrain"
    assert not method.cache.holds(model)  # the retrained parameters are not those the cache was built for

    retrained, dm_before = copy.deepcopy(model), copy.deepcopy(dm)
    (third,) = apply(callback, model, dm, 1)
    assert third.method == method.name and third.precompute_seconds > 0  # rebuilt for the retrained model
    expected_request = pair(dm_before, 0)
    deleted = dm_before.remove(expected_request.resolve(dm_before.train).rows)
    fresh = type(method)()
    fresh.unlearn(retrained, dm_before.train_rows(), deleted, UnlearningContext(seed=0))
    assert same_parameters(model, retrained)


def test_the_drift_counter_survives_a_checkpoint(tmp_path):
    dm = datamodule()
    model = fitted(dm)
    callback = UnlearningCallback(FineTune(epochs=1), dirpath=tmp_path, evaluate=False, seed=0, retrain_every=2, max_deleted_fraction=None)
    apply(callback, model, dm, 1)
    state = json.loads(json.dumps(callback.state_dict()))  # plain values only
    assert state["drift"] == {"fitted_rows": len(dm.train) + 1, "fitted_grad_norm": None, "requests": 1, "rows": 1}
    checkpoint = torch.load(tmp_path / applied(tmp_path)[0]["checkpoint"], weights_only=True)
    assert checkpoint["unlearning"]["drift"] == state["drift"]

    resumed = UnlearningCallback(FineTune(epochs=1), dirpath=tmp_path, evaluate=False, seed=0, retrain_every=2,
                                 max_deleted_fraction=None)
    resumed.load_state_dict(state)
    assert resumed.drift == pytest.approx(1 / (len(dm.train) + 1))
    assert [r.method for r in apply(resumed, model, dm, 1)] == ["Retrain"]  # the second since the fit, as before the restart


def test_a_failed_request_leaves_the_drift_counter_as_it_was(tmp_path):
    dm = datamodule()
    model = fitted(dm)
    callback = UnlearningCallback(FineTune(epochs=1), dirpath=tmp_path, evaluate=False, seed=0, retrain_every=2, max_deleted_fraction=None)
    apply(callback, model, dm, 1)
    before = callback.state_dict()["drift"]

    class BrokenFit(FitRecipe):
        def __call__(self, *args, **kwargs):
            raise RuntimeError("no fit today")

    callback.request(pair(dm, 0))
    with pytest.raises(UnlearningError, match="Retrain failed"):
        callback.apply_pending(model, dm, recipe=BrokenFit(), seed=0)
    assert callback.state_dict()["drift"] == before
    entries = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert entries[-1]["status"] == "failed" and entries[-1]["method"] == "Retrain" and entries[-1]["policy"] == "retrain_every"
    assert [r.method for r in callback.apply_pending(model, dm, recipe=RECIPE, seed=0)] == ["Retrain"]


def test_logs_the_drift_and_whether_a_retrain_ran(tmp_path):
    records = []

    class Recording(pl.loggers.Logger):
        name, version = "recording", 0

        def log_hyperparams(self, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            records.append(dict(metrics))

    dm = datamodule()
    model = fitted(dm)
    callback = UnlearningCallback(FineTune(epochs=1), dirpath=tmp_path, evaluate=False, seed=0, retrain_every=2, max_deleted_fraction=None)
    for request in (pair(dm, 0), pair(dm, 5)):
        callback.request(request)
    callback.apply_pending(model, dm, loggers=[Recording()], recipe=RECIPE, seed=0)
    assert [r["unlearn/retrained"] for r in records] == [0, 1]
    assert records[0]["unlearn/drift"] > 0 and records[1]["unlearn/drift"] == 0


class GoesAstray(Unlearner):
    """A method that leaves the model far from a stationary point (as a stale curvature block can)."""

    def update(self, model, retained, deleted, context):
        with torch.no_grad():
            model.user_embedding.weight.mul_(30.0)
        return {}


def test_max_grad_ratio_replaces_a_method_that_went_astray_by_a_retrain(tmp_path):
    dm = datamodule()
    model = fitted(dm)
    fitted_norm = objective_gradient_norm(model, dm.train_rows())
    callback = UnlearningCallback(GoesAstray(), dirpath=tmp_path, evaluate=False, seed=0, max_deleted_fraction=None,
                                  max_grad_ratio=2.0)
    (report,) = apply(callback, model, dm, 1)
    assert report.method == "Retrain"
    expected_dm = datamodule()
    expected_dm.load_state_dict(dm.state_dict())
    assert same_parameters(model, fitted(expected_dm))
    (entry,) = applied(tmp_path)
    assert entry["policy"] == "max_grad_ratio" and entry["replaced"] == "GoesAstray" and entry["method"] == "Retrain"
    assert not 0.5 <= entry["grad_ratio"] <= 2.0
    # the reference is now the retrained model's own gradient norm on the rows that remain
    state = callback.state_dict()["drift"]
    assert state["fitted_grad_norm"] == pytest.approx(objective_gradient_norm(model, dm.train_rows()))
    assert state["fitted_grad_norm"] != pytest.approx(fitted_norm) and state["fitted_rows"] == len(dm.train)


def test_max_grad_ratio_keeps_a_method_that_stays_near_the_fit(tmp_path):
    dm = datamodule()
    model = fitted(dm)
    fitted_norm = objective_gradient_norm(model, dm.train_rows())
    callback = UnlearningCallback(FineTune(epochs=1), dirpath=tmp_path, evaluate=False, seed=0, max_deleted_fraction=None,
                                  max_grad_ratio=10.0)
    reports = apply(callback, model, dm, 2)
    assert [r.method for r in reports] == ["FineTune(epochs=1)"] * 2
    entries = applied(tmp_path)
    assert "policy" not in entries[1]
    assert entries[1]["grad_ratio"] == pytest.approx(objective_gradient_norm(model, dm.train_rows()) / fitted_norm)
    assert callback.state_dict()["drift"]["fitted_grad_norm"] == pytest.approx(fitted_norm)  # measured once, at the first request


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"retrain_every": 0}, r"retrain_every=\.\.\.\) must be None or an integer >= 1, got 0"),
        ({"retrain_every": -2}, r"retrain_every.*got -2"),
        ({"retrain_every": 2.5}, r"retrain_every.*got 2\.5"),
        ({"retrain_every": True}, r"retrain_every.*got True"),
        ({"retrain_every": "10"}, r"retrain_every.*got '10'"),
        ({"max_deleted_fraction": 0}, r"max_deleted_fraction=\.\.\.\) must be None, 'auto' or a number in \(0, 1\], got 0"),
        ({"max_deleted_fraction": "Auto"}, r"max_deleted_fraction.*got 'Auto'"),
        ({"max_deleted_fraction": 1.5}, r"max_deleted_fraction.*got 1\.5"),
        ({"max_deleted_fraction": -0.1}, r"max_deleted_fraction.*got -0\.1"),
        ({"max_deleted_fraction": math.nan}, r"max_deleted_fraction.*got nan"),
        ({"max_deleted_fraction": "0.05"}, r"max_deleted_fraction.*got '0\.05'"),
        ({"max_grad_ratio": 1.0}, r"max_grad_ratio=\.\.\.\) must be None or a finite number > 1, got 1\.0"),
        ({"max_grad_ratio": 0.5}, r"max_grad_ratio.*got 0\.5"),
        ({"max_grad_ratio": math.inf}, r"max_grad_ratio.*got inf"),
        ({"max_grad_ratio": True}, r"max_grad_ratio.*got True"),
        ({"max_grad_ratio": "2"}, r"max_grad_ratio.*got '2'"),
    ],
)
def test_bad_policy_arguments(kwargs, match):
    with pytest.raises(ValueError, match="^UnlearningCallback\\(" + match):
        UnlearningCallback(FineTune(), **kwargs)


def test_policy_can_be_switched_off(tmp_path):
    dm = datamodule()
    model = fitted(dm)
    callback = UnlearningCallback(FineTune(epochs=1), dirpath=tmp_path, evaluate=False, seed=0, retrain_every=None,
                                  max_deleted_fraction=None)
    reports = apply(callback, model, dm, 3, rows_each=10)
    assert [r.method for r in reports] == ["FineTune(epochs=1)"] * 3
    assert callback.drift == pytest.approx(30 / (len(dm.train) + 30))
