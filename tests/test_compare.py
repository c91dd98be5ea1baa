"""`compare` and `unlearn` end to end through the CLI, on a small slice of MovieLens-100K."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from pytorch_lightning.loggers import CSVLogger

from lightning_unlearn.cli import main
from lightning_unlearn.data import Interactions, RecDataModule, Synthetic
from lightning_unlearn.models import MF
from lightning_unlearn.unlearning import IFRU, AltEraser, DeletionSpec, FineTune, Retrain
from lightning_unlearn.unlearning.compare import PartialResultsMismatch, _utility, compare, format_table, write_outputs
from lightning_unlearn.unlearning.methods.base import Unlearner
from lightning_unlearn.unlearning.recipe import FitRecipe
from lightning_unlearn.unlearning.reporting import comparison_columns, comparison_rows, log_comparison, plot_comparison
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("cli_run")

SCHEMA = {
    "top": {"dataset": str, "model": str, "loss": str, "hardware": dict, "deletion": dict, "original": dict, "methods": list},
    "hardware": {"cpu": str, "threads": int, "device": str},
    "deletion": {"kind": str, "rows": int, "users": int, "items": int},
    "original": {"fit_seconds": float, "grad_norm": float, "utility": dict, "deleted": dict},
    "method": {"name": str, "seconds": float, "precompute_seconds": float, "peak_mb": float, "speedup_vs_retrain": float,
               "utility": dict, "deleted": dict, "completeness": dict, "diagnostics": dict},
    "utility": ["recall@20", "ndcg@20", "hit@20", "auc"],
    "deleted": ["rank_pct", "score", "in_top20", "mia_auc"],
    "completeness": ["gap_closed_rank", "gap_closed_score", "gap_closed_top20", "gap_closed_mia", "overlap@20",
                     "overlap@20_affected", "score_distance_rel", "param_distance_rel"],
}


@pytest.fixture
def ml100k_slice(data_dir, tmp_path) -> Path:
    """The rows of the first 120 users of MovieLens-100K, as a headerless TSV."""
    lines = [line for line in (data_dir / "ml-100k" / "u.data").read_text().splitlines() if int(line.split("\t")[0]) <= 120]
    path = tmp_path / "slice.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def recipe(path: Path, data_file: Path, body: str) -> Path:
    path.write_text(
        "seed_everything: 0\n"
        "trainer: {max_epochs: 4, logger: false, enable_progress_bar: false, enable_model_summary: false, deterministic: true,\n"
        "  callbacks: [{class_path: pytorch_lightning.callbacks.ModelCheckpoint, init_args: {monitor: val/ndcg@20, mode: max, dirpath: ckpt, filename: best}}]}\n"
        "model: {class_path: lightning_unlearn.models.MF, init_args: {embedding_dim: 16, l2: 0.05, lr: 0.01}}\n"
        f"data: {{source: {{class_path: lightning_unlearn.data.CSVSource, init_args: {{path: {data_file}, sep: \"\\t\", header: false}}}},"
        " num_negatives: 4, batch_size: 256}\n" + body
    )
    return path


def check_schema(result: dict) -> None:
    for key, kind in SCHEMA["top"].items():
        assert isinstance(result[key], kind), key
    for section in ("hardware", "deletion", "original"):
        for key, kind in SCHEMA[section].items():
            assert isinstance(result[section][key], kind), (section, key)
    for method in result["methods"]:
        for key, kind in SCHEMA["method"].items():
            assert isinstance(method[key], kind), (method["name"], key)
        for section in ("utility", "deleted", "completeness"):
            for key in SCHEMA[section]:
                assert isinstance(method[section][key], float), (method["name"], section, key)


def test_compare_end_to_end_writes_the_documented_json(ml100k_slice, tmp_path, capsys):
    body = (
        "methods: [{class_path: lightning_unlearn.unlearning.Retrain}, "
        "{class_path: lightning_unlearn.unlearning.Retrain, init_args: {seed: 1}}, "
        "{class_path: lightning_unlearn.unlearning.FineTune, init_args: {epochs: 1}}]\n"
        "deletion: {kind: interactions, fraction: 0.02, seed: 0}\n"
        "out: out\n"
    )
    main(["compare", "-c", str(recipe(tmp_path / "compare.yaml", ml100k_slice, body))])
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    check_schema(result)
    assert [m["name"] for m in result["methods"]] == ["Retrain", "Retrain(seed=1)", "FineTune(epochs=1)"]
    reference = result["methods"][0]
    assert reference["completeness"]["gap_closed_rank"] == 1.0 and reference["completeness"]["overlap@20"] == 1.0
    assert result["deletion"]["kind"] == "interactions" and result["deletion"]["rows"] > 0
    assert math.isfinite(result["original"]["grad_norm"]) and result["original"]["fit_seconds"] > 0
    csv_lines = (tmp_path / "out" / "compare.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 3 and csv_lines[0].startswith("method,seconds")
    out = capsys.readouterr().out
    assert "FineTune(epochs=1)" in out and "seed noise" in out


def test_unlearn_command_applies_a_requests_file(ml100k_slice, tmp_path, capsys):
    main(["fit", "-c", str(recipe(tmp_path / "fit.yaml", ml100k_slice, ""))])
    checkpoint = next((tmp_path / "ckpt").glob("best*.ckpt"))
    (tmp_path / "requests.csv").write_text("user\n7\n")
    fit_recipe = recipe(tmp_path / "unlearn.yaml", ml100k_slice, "")
    main(["unlearn", "-c", str(fit_recipe), "--ckpt_path", str(checkpoint), "--requests", "requests.csv",
          "--method", "FineTune", "--method.epochs", "1", "--out", "unlearned"])
    assert "[unlearn] FineTune(epochs=1):" in capsys.readouterr().out
    entries = [json.loads(line) for line in (tmp_path / "unlearned" / "journal.jsonl").read_text().splitlines()]
    assert [e["status"] for e in entries] == ["pending", "applied"] and entries[1]["num_users"] == 1
    unlearned_path = str(tmp_path / "unlearned" / entries[1]["checkpoint"])
    unlearned = torch.load(unlearned_path, weights_only=True)
    original = torch.load(checkpoint, weights_only=True)
    assert not torch.equal(unlearned["state_dict"]["user_embedding.weight"], original["state_dict"]["user_embedding.weight"])
    assert len(unlearned["datamodule_state"]["users"]) == 1

    # Running it again from the unlearned checkpoint does not apply the request a second time,
    # neither in its own folder nor in a new branch (which carries the folder's key along).
    for out in (["--out", "unlearned"], ["--out", "again", "--branch", "true"]):
        main(["unlearn", "-c", str(fit_recipe), "--ckpt_path", unlearned_path, "--requests", "requests.csv",
              "--method", "FineTune", *out])
        assert "rows removed" not in capsys.readouterr().out
    assert not (tmp_path / "again" / "journal.jsonl").exists()
    assert len((tmp_path / "unlearned" / "journal.jsonl").read_text().splitlines()) == 2


def test_unlearn_command_help_lists_its_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    out = capsys.readouterr().out
    for argument in ("--ckpt_path", "--requests", "--method", "--out", "--missing"):
        assert argument in out


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"kind": "rows"}, "kind"), ({"fraction": 0.0}, "fraction"), ({"count": 0}, "count"),
     ({"kind": "interactions", "selection": "most_active"}, "selection"),
     ({"seed": 99999999999999999999999}, r"seed=\.\.\.\) must be an integer from -2\*\*63"), ({"seed": 1.5}, "seed")],
)
def test_deletion_spec_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeletionSpec(**kwargs)


def test_a_requests_file_is_the_deletion_and_names_the_options_it_leaves_unused():
    """With a requests file, the options that draw a deletion (a recipe's kind, say) go unused: named, not refused (a
    selection was refused for interactions, the wrong reason)."""
    spec = DeletionSpec(kind="interactions", selection="most_active", count=5, requests_file="forget.csv")
    assert spec.unused() == {"selection": "most_active", "count": 5} and DeletionSpec(kind="users").unused() == {}


def test_deletion_spec_takes_a_numpy_integer_seed():
    import numpy as np

    from lightning_unlearn.data import Synthetic

    train = Synthetic(num_users=10, num_items=8).load()[0]
    assert DeletionSpec(count=2, seed=np.int64(5)).build(train) == DeletionSpec(count=2, seed=5).build(train)


def test_deletion_spec_choices():
    data = Interactions.from_raw([1, 1, 1, 2, 2, 3], [7, 8, 9, 7, 8, 9])
    assert DeletionSpec(kind="users", count=1, selection="most_active").build(data).users == (1,)
    assert DeletionSpec(kind="users", count=1, selection="least_active").build(data).users == (3,)
    assert DeletionSpec(kind="items", count=2, selection="most_active").build(data).items == (7, 8)
    picked = DeletionSpec(kind="interactions", count=3, seed=5).build(data)
    assert len(picked.pairs) == 3 and picked == DeletionSpec(kind="interactions", count=3, seed=5).build(data)
    with pytest.raises(ValueError, match="rounds to 0"):
        DeletionSpec(kind="users", fraction=0.01).build(data)
    assert torch.equal(picked.resolve(data).rows, picked.resolve(data).rows)


def test_second_retrain_seed_closes_the_rank_gap_on_movielens_100k(data_dir, monkeypatch, tmp_path):
    """The noise floor: a Retrain from another seed forgets like the reference (gap closed ~1),
    while two epochs of fine-tuning close little of it; 1% random interactions, the real recipe."""
    monkeypatch.setenv("LIGHTNING_UNLEARN_DATA", str(data_dir))
    recipe_path = Path(__file__).resolve().parents[1] / "recipes" / "ml100k" / "compare_mf.yaml"
    main(["compare", "-c", str(recipe_path), "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--out", "out"])
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    check_schema(result)
    by_name = {m["name"]: m for m in result["methods"]}
    noise = by_name["Retrain(seed=1)"]["completeness"]
    assert abs(noise["gap_closed_rank"] - 1.0) < 0.15
    assert abs(noise["gap_closed_top20"] - 1.0) < 0.5
    assert by_name["FineTune(epochs=2)"]["completeness"]["gap_closed_rank"] < 0.5
    assert result["deletion"]["rows"] == round(0.01 * 71981)
    assert result["original"]["utility"]["recall@20"] > 0.29
    # IFRU moves the model closer to Retrain than the original is, on every completeness figure.
    original = result["original"]["completeness"]
    for name in ("IFRU(k_hop=0)", "IFRU(k_hop=1)"):
        figures = by_name[name]["completeness"]
        for gap in ("gap_closed_rank", "gap_closed_score", "gap_closed_top20", "gap_closed_mia"):
            assert 0.7 < figures[gap] < 1.3, (name, gap, figures[gap])
        assert figures["overlap@20"] > original["overlap@20"] and figures["overlap@20_affected"] > original["overlap@20_affected"]
        assert figures["score_distance_rel"] < 1 and figures["param_distance_rel"] < 1
        assert by_name[name]["diagnostics"]["solver"] == "block" and by_name[name]["precompute_seconds"] > 0


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_compare_recipe_lists_methods_with_distinct_names(recipe):
    """compare refuses two methods of one name: a default that changes under a recipe (AltEraser's
    objective did) must not make two of its entries the same method."""
    methods = yaml.safe_load(recipe.read_text()).get("methods") or []
    names = []
    for spec in methods:
        module, _, name = spec["class_path"].rpartition(".")
        names.append(getattr(importlib.import_module(module), name)(**spec.get("init_args", {})).name)
    assert len(names) == len(set(names)), names


# ---------------------------------------------------------------------- partial results and --resume
class Nudge(Unlearner):
    """A cheap method that counts its runs and raises ``fail`` when given one."""

    def __init__(self, tag: str, runs: list, fail: BaseException | None = None):
        self.tag, self._runs, self._fail = tag, runs, fail  # private: the injected fault is not one of its settings

    @property
    def name(self) -> str:
        return f"Nudge({self.tag})"

    def update(self, model, retained, deleted, context):
        self._runs.append(self.tag)
        if self._fail is not None:
            raise self._fail
        with torch.no_grad():
            model.user_embedding.weight.mul_(0.99)
        return {"steps": 1}


@pytest.fixture
def small_compare():
    """``run(methods, out, resume)``: compare on fresh synthetic data from one trained MF."""
    recipe = FitRecipe(max_epochs=1, monitor=None)
    make = lambda **batches: RecDataModule(Synthetic(num_users=30, num_items=20, density=0.25, seed=1), num_negatives=2,  # noqa: E731
                                           **{"batch_size": 64, **batches})
    dm = make()
    dm.setup()
    torch.manual_seed(0)
    model = MF(dm.num_users, dm.num_items, embedding_dim=4, lr=0.05)
    recipe(model, dm)

    def run(methods, out, resume=False, lines=None, repeats=1, deletion=DeletionSpec(fraction=0.05), refit=recipe, batches=None, k=20):
        fresh = make(**(batches or {}))
        fresh.setup()
        return compare(model, fresh, methods, deletion, refit, out=out, resume=resume,
                       progress=(lines.append if lines is not None else lambda _: None), repeats=repeats, k=k)

    return run


def test_compare_reports_a_failed_method_and_runs_the_others(small_compare, tmp_path):
    runs: list = []
    methods = [Retrain(), Nudge("x", runs, fail=RuntimeError("solver diverged")), Nudge("y", runs)]
    result = small_compare(methods, tmp_path)
    by_name = {m["name"]: m for m in result["methods"]}
    assert runs == ["x", "y"]
    assert by_name["Nudge(x)"] == {"name": "Nudge(x)", "status": "failed", "error": by_name["Nudge(x)"]["error"]}
    assert "solver diverged" in by_name["Nudge(x)"]["error"]
    assert by_name["Nudge(y)"]["status"] == "ok" and by_name["Retrain"]["completeness"]["gap_closed_rank"] == 1.0
    assert "FAILED" in format_table(result)
    write_outputs(result, tmp_path)
    rows = (tmp_path / "compare.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[2].startswith("Nudge(x),failed,")
    assert json.loads((tmp_path / "compare.json").read_text())["methods"][1]["status"] == "failed"
    mask = os.umask(0)
    os.umask(mask)
    assert {(tmp_path / name).stat().st_mode & 0o777 for name in ("compare.json", "compare.csv")} == {0o666 & ~mask}  # as open() gives
    assert (tmp_path / "compare.partial" / "key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "compare.partial.json").exists()  # kept for --resume: only the failed method runs again
    document = json.loads((tmp_path / "compare.json").read_text())  # the reporting functions read the failed entry too
    assert [row[0] for row in comparison_rows(document)] == ["Retrain", "Nudge(y)"]
    log_comparison([CSVLogger(tmp_path / "logs")], document)
    if importlib.util.find_spec("matplotlib") is not None:
        plot_comparison(document, tmp_path / "chart.png")


def test_the_original_is_scored_on_the_splits_the_methods_are_scored_on():
    """Deleting whole users drops their test rows: the original's utility is taken after that, as every method's."""
    dm = RecDataModule(Synthetic(num_users=30, num_items=20, density=0.3, seed=1), num_negatives=2, batch_size=64)
    dm.setup()
    torch.manual_seed(0)
    model = MF(dm.num_users, dm.num_items, embedding_dim=4, lr=0.05)
    recipe = FitRecipe(max_epochs=2, monitor=None)
    recipe(model, dm)
    before = len(dm.test)
    result = compare(model, dm, [Retrain()], DeletionSpec(kind="users", count=5, selection="most_active"), recipe,
                     progress=lambda _: None)
    assert len(dm.test) < before  # the datamodule keeps the deletion
    assert result["original"]["utility"] == _utility(model, dm)


def test_an_interrupted_compare_keeps_its_results_and_resume_skips_them(small_compare, tmp_path):
    runs: list = []
    killed = [Retrain(), Nudge("a", runs), Nudge("b", runs, fail=KeyboardInterrupt()), Nudge("c", runs)]
    with pytest.raises(KeyboardInterrupt):
        small_compare(killed, tmp_path)
    partial = json.loads((tmp_path / "compare.partial.json").read_text())
    assert partial["complete"] is False and partial["running"] == "Nudge(b)"
    assert [(m["name"], m["status"]) for m in partial["methods"]] == [("Retrain", "ok"), ("Nudge(a)", "ok")]
    assert runs == ["a", "b"] and not list(tmp_path.glob(".*.tmp"))

    runs.clear()
    lines: list = []
    again = [Retrain(), Nudge("a", runs), Nudge("b", runs), Nudge("c", runs)]
    result = small_compare(again, tmp_path, resume=True, lines=lines)
    assert runs == ["b", "c"]  # neither the reference nor Nudge(a) ran again
    assert sum("resumed from compare.partial.json" in line for line in lines) == 2
    assert any("Nudge(b) was running" in line for line in lines)
    assert [m["status"] for m in result["methods"]] == ["ok"] * 4
    assert result["methods"][0]["completeness"]["gap_closed_rank"] == 1.0  # the reloaded reference is the reference
    assert result["methods"][1]["seconds"] == partial["methods"][1]["seconds"]
    write_outputs(result, tmp_path)
    assert not (tmp_path / "compare.partial.json").exists() and not (tmp_path / "compare.partial").exists()
    lines.clear()
    small_compare(again, tmp_path, resume=True, lines=lines)  # a finished comparison: said, not resumed silently
    assert any("nothing to resume" in line and "finished comparison" in line for line in lines)


def test_resume_refuses_partial_results_of_another_configuration(small_compare, tmp_path):
    runs: list = []
    with pytest.raises(KeyboardInterrupt):
        small_compare([Retrain(), Nudge("a", runs, fail=KeyboardInterrupt())], tmp_path)
    with pytest.raises(ValueError, match="another configuration"):
        small_compare([Retrain(), Nudge("other", runs)], tmp_path, resume=True)
    result = small_compare([Retrain(), Nudge("other", runs)], tmp_path)  # without --resume: a fresh run replaces them
    assert [m["status"] for m in result["methods"]] == ["ok", "ok"]


def test_resume_refuses_results_of_other_rows_recipe_or_method_settings(small_compare, tmp_path):
    """The same counts from another seed, another refit recipe, a method option its name does not show, or other batches
    of the datamodule: each would mix figures measured on different deletions or settings into one table."""
    with pytest.raises(KeyboardInterrupt):
        small_compare([Retrain(), FineTune(epochs=1, lr=1e-3), Nudge("k", [], fail=KeyboardInterrupt())], tmp_path)
    others = [(dict(deletion=DeletionSpec(fraction=0.05, seed=7)), "rows"), (dict(refit=FitRecipe(max_epochs=2, monitor=None)), "recipe"),
              (dict(methods=[Retrain(), FineTune(epochs=1, lr=0.5), Nudge("k", [])]), "methods"), (dict(repeats=2), "repeats"),
              # the refit trains in the datamodule's batches; sampled candidates change what utility is
              (dict(batches={"batch_size": 7}), "batches"), (dict(batches={"eval_candidates": 5}), "batches")]
    for other, differs in others:
        with pytest.raises(PartialResultsMismatch, match=f"another configuration \\({differs} differs\\)"):
            small_compare(**{"methods": [Retrain(), FineTune(epochs=1, lr=1e-3), Nudge("k", [])], "out": tmp_path,
                             "resume": True, **other})
    dm = RecDataModule(Synthetic(num_users=30, num_items=20, density=0.25, seed=1))
    dm.setup()
    digest = DeletionSpec(fraction=0.05).build(dm.train).resolve(dm.train).digest  # not keyed: never at rest
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and digest.encode() in p.read_bytes()]
    lines: list = []
    small_compare([Retrain(), FineTune(epochs=1, lr=1e-3), Nudge("k", [])], tmp_path, resume=True, lines=lines)
    assert sum("resumed from" in line for line in lines) == 2


def test_the_outputs_name_the_top_k_figures_of_the_k_compared_at(small_compare, tmp_path):
    """compare --k 10 measured every method, then failed on the top-20 columns of its table and CSV (no table, no CSV)."""
    result = small_compare([Retrain(), FineTune(epochs=1, lr=1e-3)], tmp_path, k=10)
    assert result["k"] == 10 and "gap_top10" in format_table(result)
    write_outputs(result, tmp_path)
    header = (tmp_path / "compare.csv").read_text().splitlines()[0].split(",")
    assert "gap_top10" in header and "overlap@10" in header
    columns = comparison_columns(10)
    assert [dict(zip(columns, row))["overlap@10"] for row in comparison_rows(result)] == \
        [m["completeness"]["overlap@10"] for m in result["methods"]]


def test_second_order_methods_share_one_curvature_cache_and_get_the_step_they_get_alone(small_compare, tmp_path):
    """IFRU and AltEraser read the cache built by the first of them: the second builds nothing, and each model
    equals the one the method gives on its own cache."""
    methods = [Retrain(), IFRU(damping=1e-4), AltEraser(rounds=2), IFRU(damping=1e-4, k_hop=1)]
    result = small_compare(methods, tmp_path / "shared")
    alone = {}
    for index, method in enumerate([IFRU(damping=1e-4), AltEraser(rounds=2), IFRU(damping=1e-4, k_hop=1)], start=1):
        alone[method.name] = small_compare([Retrain(), method], tmp_path / f"alone{index}")["methods"][1]
    shared = {m["name"]: m for m in result["methods"][1:]}
    first, second = "IFRU(k_hop=0, damping=0.0001)", "IFRU(k_hop=1, damping=0.0001)"
    assert list(shared) == list(alone) == [first, "AltEraser(rounds=2)", second]
    assert "cache" not in shared[first]["diagnostics"]  # the first builds it
    assert shared["AltEraser(rounds=2)"]["diagnostics"]["cache"] == "shared" == shared[second]["diagnostics"]["cache"]
    assert methods[2].cache is methods[1].cache is methods[3].cache
    for name, entry in shared.items():
        for key, value in entry["utility"].items():
            assert value == pytest.approx(alone[name]["utility"][key], rel=1e-6, abs=1e-9), (name, key)
        assert entry["completeness"]["param_distance_rel"] == pytest.approx(alone[name]["completeness"]["param_distance_rel"], rel=1e-6)


def test_compare_reports_sampled_utility_under_its_marker(tmp_path):
    """With RecDataModule(eval_candidates=N) the utility is sampled, and compare.json says so in its keys."""
    recipe = FitRecipe(max_epochs=1, monitor=None)
    make = lambda: RecDataModule(Synthetic(num_users=30, num_items=20, density=0.25, seed=1), num_negatives=2, batch_size=64,  # noqa: E731
                                 eval_candidates=5)
    dm = make()
    dm.setup()
    torch.manual_seed(0)
    model = MF(dm.num_users, dm.num_items, embedding_dim=4, lr=0.05)
    recipe(model, dm)
    fresh = make()
    fresh.setup()
    result = compare(model, fresh, [Retrain()], DeletionSpec(fraction=0.05), recipe, progress=lambda _: None)
    for utility in (result["original"]["utility"], result["methods"][0]["utility"]):
        assert set(utility) == {"sampled/recall@20", "sampled/ndcg@20", "sampled/hit@20", "sampled/auc", "sampled/candidates"}
        assert utility["sampled/candidates"] == 5 and 0 <= utility["sampled/recall@20"] <= 1


def test_repeated_requests_report_the_median_and_the_first_runs_figures(small_compare, tmp_path):
    """With repeats=3 every method but the retrains runs three times from its prepared state: the shared cache and a
    method's own cache (another budget) are rolled back between runs, so each method's model, and the next
    method's, equal those of a single run."""
    methods = [Retrain(), IFRU(damping=1e-4), AltEraser(), IFRU(damping=1e-4, cache_budget_gb=1e-6), Nudge("n", [])]
    lines: list = []
    repeated = small_compare(methods, tmp_path / "repeated", repeats=3, lines=lines)
    once = small_compare([Retrain(), IFRU(damping=1e-4), AltEraser(), IFRU(damping=1e-4, cache_budget_gb=1e-6), Nudge("m", [])],
                         tmp_path / "once")
    assert "seconds_runs" not in repeated["methods"][0]["diagnostics"]  # the reference retrain runs once
    for entry, single in zip(repeated["methods"][1:], once["methods"][1:]):
        seconds = entry["diagnostics"]["seconds_runs"]
        assert len(seconds) == 3 and entry["seconds"] == sorted(seconds)[1], entry["name"]
        assert "seconds_runs" not in single["diagnostics"]
        for key in ("utility", "completeness"):
            for metric, value in entry[key].items():
                assert value == pytest.approx(single[key][metric], rel=1e-6, abs=1e-9, nan_ok=True), (entry["name"], metric)
    assert sum("(median of " in line for line in lines) == 4
    with pytest.raises(ValueError, match="repeats"):
        small_compare([Retrain()], tmp_path / "bad", repeats=0)


def test_table_cells_keep_a_space_between_columns_for_any_number():
    """A value of 10^7 or more ran into the next column (``-6.00003268376.6660``)."""
    from lightning_unlearn.unlearning.compare import _cell

    for value in (-6.00003268376666e9, 12345678.1234, 123456.12345, 0.5, -1.0, float("nan"), None, "failed"):
        cell = _cell(value)
        assert len(cell) == 12 and cell[0] == " ", (value, cell)
    assert float(_cell(-6.00003268376666e9)) == pytest.approx(-6.0e9) and _cell(0.5).strip() == "0.5000"


def test_whole_users_add_the_item_rank_gap_to_the_table_and_the_csv(small_compare, tmp_path):
    """For whole users the figure to read is gap_item: printed, and written to compare.csv alike."""
    result = small_compare([Retrain(), FineTune(epochs=1, lr=1e-3)], tmp_path, deletion=DeletionSpec(kind="users", count=2))
    assert "gap_item" in format_table(result).splitlines()[0]
    write_outputs(result, tmp_path)
    rows = list(csv.DictReader((tmp_path / "compare.csv").open()))
    assert [float(row["gap_item"]) for row in rows] == \
        pytest.approx([m["completeness"]["gap_closed_item_rank"] for m in result["methods"]], rel=1e-6)
