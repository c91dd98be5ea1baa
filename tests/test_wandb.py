"""W&B reporting, read back from the files of offline runs: config at init, the comparison table and
charts, summary metrics, the per-request time series, artifacts, and no raw id of deleted data.

wandb 0.31 writes an offline run as ``offline-run-*/run-<id>.wandb`` (a LevelDB-style log of
protobuf records: run, config, metric, history, summary, artifact, ...) plus ``files/`` (tables
under ``files/media/table``, ``output.log``); there is no ``wandb-summary.json`` or
``config.yaml`` until ``wandb sync``. :func:`read_records` decodes the log.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import struct
import subprocess
import sys
import time
import urllib.error
from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_lightning.loggers import CSVLogger
from wandb.proto import wandb_internal_pb2

from lightning_unlearn.cli import main
from lightning_unlearn.models import MF
from lightning_unlearn.unlearning.reporting import COMPARISON_COLUMNS, comparison_rows, log_comparison
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("cli_run")

DELETED_USERS = (7, 42)  # MovieLens-100K users whose every row the tests delete


# ---------------------------------------------------------------------- reading an offline run
def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Every record of a ``.wandb`` transaction log (LevelDB log format: 32 KiB blocks of
    ``crc32c(4) length(2) type(1) data`` chunks; type 1 = full, 2/3/4 = first/middle/last)."""
    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(raw):
        room = block - position % block
        if room < 7:  # a block's tail too short for a chunk header is zero padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", raw[position:position + 7])
        if kind == 0:
            position += room
            continue
        data, position = raw[position + 7:position + 7 + length], position + 7 + length
        if kind in (1, 2):
            pending = data
        else:
            pending += data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _apply(target: dict, updates: Any) -> dict:
    """Apply ``key``/``nested_key`` + ``value_json`` updates (config, summary, history items) to a nested dict."""
    for update in updates:
        *parents, leaf = [update.key] if update.key else list(update.nested_key)
        node = target
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = json.loads(update.value_json)
    return target


def run_config(records: list) -> dict:
    """The run's config: the run record's, then every config update in order."""
    config: dict = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        _apply(config, record.run.config.update if kind == "run" else record.config.update if kind == "config" else ())
    return config


def run_summary(records: list) -> dict:
    summary: dict = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            _apply(summary, record.summary.update)
    return summary


def run_history(records: list) -> list[dict]:
    return [_apply({}, r.history.item) for r in records if r.WhichOneof("record_type") == "history"]


def finished_records(path: Path, seconds: float = 120.0) -> list:
    """The records of a finished run's ``.wandb`` file, once W&B's service has written all of it
    (``finish()`` can return while the last blocks are still being written)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            records = read_records(path)
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                return records
        except Exception:  # a block still being written
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} has no exit record after {seconds:.0f} s: the run did not finish")
        time.sleep(0.2)


def first_index(records: list, kind: str, predicate=lambda r: True) -> int:
    return next(i for i, r in enumerate(records) if r.WhichOneof("record_type") == kind and predicate(r))


def offline_runs(save_dir: Path) -> dict[str, Path]:
    """``job_type -> run folder`` of the offline runs under a WandbLogger's ``save_dir``."""
    runs = {}
    for folder in sorted((save_dir / "wandb").glob("offline-run-*")):
        records = finished_records(next(folder.glob("run-*.wandb")))
        runs[records[first_index(records, "run")].run.job_type] = folder
    return runs


def settled(folder: Path, until, timeout: float = 60.0) -> None:
    """Wait until ``until()`` holds and no file under ``folder`` has changed size for a second (W&B's service process
    may still be writing when the process that logged exits)."""
    deadline, sizes = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        now = {}
        for path in folder.rglob("*"):
            with contextlib.suppress(FileNotFoundError):  # a temporary file gone since it was listed
                if path.is_file():
                    now[path] = path.stat().st_size
        if until() and now == sizes:
            return
        sizes = now
        time.sleep(1.0)
    raise TimeoutError(f"the files under {folder} were still changing, or not there, after {timeout:.0f} s")


def files_containing(folders: list[Path], needles: list[str]) -> dict[str, list[str]]:
    """``needle -> files`` for every needle found in any file under ``folders`` (bytes, as written)."""
    found: dict[str, list[str]] = {}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                for needle in needles:
                    if needle.encode() in data:
                        found.setdefault(needle, []).append(str(path))
    return found


def comparison_panels(config: dict) -> dict[str, dict]:
    """``key -> panel config`` of the run's custom charts (``_wandb.visualize``), with the Vega-Lite
    spec each carries (``customPanelDef.spec``, a JSON string) parsed."""
    panels = {}
    for key, value in config["_wandb"]["visualize"].items():
        assert value["panel_type"] == "Vega2"
        panel = dict(value["panel_config"])
        if "customPanelDef" in panel:
            panel["spec"] = json.loads(panel["customPanelDef"]["spec"])
        panels[key] = panel
    return panels


def check_comparison_charts(panels: dict[str, dict], files: Path, records: list) -> None:
    """The comparison's charts: a point per method, coloured and labelled by its name, seconds and
    speed-ups on a log axis; the specs are also the run's files ``charts/*.vl.json``."""
    assert set(panels) == {"compare/chart/gap_closed_vs_speedup", "compare/chart/recall_vs_seconds",
                           "compare/chart/seconds", "compare/chart/completeness"}
    fields = {key: panel["fieldSettings"] for key, panel in panels.items()}
    assert fields["compare/chart/gap_closed_vs_speedup"] == {"x": "speedup_vs_retrain", "y": "completeness", "label": "method"}
    assert fields["compare/chart/recall_vs_seconds"] == {"x": "seconds", "y": "recall@20", "label": "method"}
    assert fields["compare/chart/seconds"] == {"label": "method", "value": "seconds"}
    assert fields["compare/chart/completeness"] == {"label": "method", "value": "completeness"}
    for key in ("compare/chart/gap_closed_vs_speedup", "compare/chart/recall_vs_seconds"):
        panel, spec = panels[key], panels[key]["spec"]
        assert panel["panelDefId"] == "wandb/scatter/v0"  # W&B's preset with the same fields, were the spec ignored
        assert spec["data"] == {"name": "wandb"} and spec["title"] == "${string:title}"
        assert spec["encoding"]["x"]["field"] == "${field:x}" and spec["encoding"]["x"]["scale"] == {"type": "log"}
        assert spec["encoding"]["y"]["field"] == "${field:y}"
        assert spec["encoding"]["color"] == {"field": "${field:label}", "type": "nominal", "title": "method"}
        assert [layer["mark"]["type"] for layer in spec["layer"]] == ["point", "text"]
        assert spec["layer"][1]["encoding"]["text"]["field"] == "${field:label}"  # each point says which method it is
        assert "log scale" in panel["stringSettings"]["x-axis-title"]
        assert json.loads((files / "charts" / "log_x_scatter.vl.json").read_text()) == spec
    dots = panels["compare/chart/seconds"]
    assert dots["panelDefId"] == "wandb/bar/v0" and dots["spec"]["encoding"]["x"]["scale"] == {"type": "log"}
    assert dots["spec"]["encoding"]["y"]["field"] == dots["spec"]["encoding"]["color"]["field"] == "${field:label}"
    assert json.loads((files / "charts" / "log_x_dots.vl.json").read_text()) == dots["spec"]
    assert panels["compare/chart/completeness"]["panelDefId"] == "wandb/bar/v0"  # 0..1: W&B's own bars
    assert "customPanelDef" not in panels["compare/chart/completeness"]
    saved = {f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files}
    assert {"charts/log_x_scatter.vl.json", "charts/log_x_dots.vl.json"} <= saved  # `wandb sync` uploads them


def method_keys(keys) -> set[str]:
    """The ``compare/<method>/<metric>`` keys among ``keys`` (not the table, its charts, the original)."""
    return {k for k in keys if k.startswith("compare/") and not k.startswith(("compare/table", "compare/chart/", "compare/original/"))
            and k != "compare/headline_completeness"}


# ---------------------------------------------------------------------- data with distinctive ids
def member(user: int) -> str:
    return f"member-{user:04d}-qx7z"


def title(item: int) -> str:
    return f"title-{item:04d}-vk3w"


@pytest.fixture
def distinctive_slice(data_dir, tmp_path) -> tuple[Path, list[str]]:
    """The first 120 users of MovieLens-100K with ids rewritten to strings that cannot occur by
    chance (``member-0007-qx7z``, ``title-0242-vk3w``), and the raw ids of the deleted rows:
    the users in :data:`DELETED_USERS` and every item they rated."""
    lines, deleted = [], set()
    for line in (data_dir / "ml-100k" / "u.data").read_text().splitlines():
        user, item, rating, stamp = (int(v) for v in line.split("\t"))
        if user <= 120:
            lines.append(f"{member(user)}\t{title(item)}\t{rating}\t{stamp}")
            if user in DELETED_USERS:
                deleted |= {member(user), title(item)}
    path = tmp_path / "slice.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path, sorted(deleted)


def write_recipe(path: Path, data_file: Path, save_dir: Path, body: str = "", logger_args: str = "") -> Path:
    path.write_text(
        "seed_everything: 0\n"
        "trainer:\n"
        "  max_epochs: 3\n  enable_progress_bar: false\n  enable_model_summary: false\n  deterministic: true\n"
        "  logger: {class_path: pytorch_lightning.loggers.WandbLogger,\n"
        f"           init_args: {{project: lightning-unlearn-tests, offline: true, save_dir: {save_dir}{logger_args}}}}}\n"
        "  callbacks: [{class_path: pytorch_lightning.callbacks.ModelCheckpoint,\n"
        "               init_args: {monitor: val/ndcg@20, mode: max, dirpath: ckpt, filename: best}}]\n"
        "model: {class_path: lightning_unlearn.models.MF, init_args: {embedding_dim: 16, l2: 0.05, lr: 0.01}}\n"
        f"data: {{source: {{class_path: lightning_unlearn.data.CSVSource, init_args: {{path: {data_file}, sep: \"\\t\", header: false}}}},"
        " num_negatives: 4, batch_size: 256}\n" + body
    )
    return path


@pytest.fixture
def staging(tmp_path, monkeypatch) -> Path:
    """W&B stages artifact files under WANDB_DATA_DIR: keep them in the test's folder, to scan them."""
    folder = tmp_path / "wandb-data"
    monkeypatch.setenv("WANDB_DATA_DIR", str(folder))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    return folder


# ---------------------------------------------------------------------- compare
def test_compare_offline_run_holds_config_table_charts_and_summary_but_no_deleted_id(distinctive_slice, tmp_path, staging):
    """Runs the command as a user does (a separate process), so W&B also captures its console output."""
    data_file, deleted_ids = distinctive_slice
    (tmp_path / "forget.csv").write_text("user\n" + "\n".join(member(u) for u in DELETED_USERS) + "\n")
    body = (
        "methods: [{class_path: lightning_unlearn.unlearning.Retrain},\n"
        "          {class_path: lightning_unlearn.unlearning.Retrain, init_args: {seed: 1}},\n"
        "          {class_path: lightning_unlearn.unlearning.FineTune, init_args: {epochs: 1}},\n"
        "          {class_path: lightning_unlearn.unlearning.IFRU, init_args: {solver: cg, k_hop: 0}},\n"
        "          {class_path: lightning_unlearn.unlearning.AltEraser, init_args: {rounds: 2}}]\n"
        "deletion: {kind: users, requests_file: forget.csv}\n"
        "out: out\n"
    )
    recipe = write_recipe(tmp_path / "compare_demo.yaml", data_file, tmp_path / "runs", body)
    command = [sys.executable, "-m", "lightning_unlearn.cli", "compare", "-c", str(recipe)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    names = [m["name"] for m in result["methods"]]
    assert names == ["Retrain", "Retrain(seed=1)", "FineTune(epochs=1)", "IFRU(k_hop=0, solver=cg)", "AltEraser(rounds=2)"]

    # Progress: one line per method before and after, with the solver's iterations from the diagnostics.
    done = {line.split(":")[0]: line for line in out.splitlines() if line.startswith("[compare] ") and ": done in " in line}
    assert list(done) == [f"[compare] {i}/5 {name}" for i, name in enumerate(names, start=1)]
    assert "[compare] 1/5 Retrain: unlearning" in out
    ifru, alteraser = result["methods"][3]["diagnostics"], result["methods"][4]["diagnostics"]
    assert ifru["solver/iterations"] > 0 and f"iterations={ifru['solver/iterations']}" in done["[compare] 4/5 IFRU(k_hop=0, solver=cg)"]
    assert f"rounds={alteraser['rounds']}, solved_blocks={alteraser['solved_blocks']}" in done["[compare] 5/5 AltEraser(rounds=2)"]

    runs = offline_runs(tmp_path / "runs")
    assert list(runs) == ["compare"]  # one run per comparison; Retrain's refits log nowhere
    folder = runs["compare"]
    assert f"wandb sync {folder.relative_to(tmp_path)}" in out  # where it is and how to upload it
    sync = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", str(folder.relative_to(tmp_path))],
                          cwd=tmp_path, capture_output=True, text=True)
    assert "Would sync 1 run(s)" in sync.stdout + sync.stderr  # the printed command takes that folder
    records = finished_records(next(folder.glob("run-*.wandb")))
    run = records[first_index(records, "run")].run
    assert run.run_group == f"{tmp_path.name}/compare_demo" and run.job_type == "compare"

    # The fully resolved config, recorded before anything was trained or logged.
    config = run_config(records)
    assert config["model"]["init_args"]["embedding_dim"] == 16 and config["model"]["init_args"]["num_users"] == 120
    assert config["deletion"]["requests_file"] == "forget.csv"
    assert [m["class_path"].rsplit(".", 1)[1] for m in config["methods"]] == ["Retrain", "Retrain", "FineTune", "IFRU", "AltEraser"]
    assert config["trainer"]["max_epochs"] == 3 and config["seed_everything"] == 0
    applied = config["deletion_applied"]
    assert applied == {"kind": "users", "num_rows": result["deletion"]["rows"], "num_pairs": 0, "num_users": 2,
                       "num_items": 0, "num_ignored": 0}
    config_at = first_index(records, "config", lambda r: any(u.key == "trainer" for u in r.config.update))
    assert config_at < first_index(records, "history")
    # Each hyper-parameter once: the model's and the datamodule's arguments are under `model` and
    # `data`, not again at the top level from Lightning's save_hyperparameters.
    assert not ((set(config["model"]["init_args"]) | set(config["data"])) - {"optimizer"}) & set(config)
    assert config["optimizer"] is None and "_instantiator" not in config  # the CLI's own optimizer entry, intact

    # Figures per method in the run summary, equal to compare.json; none in the history, where each
    # key would be a single-point line panel.
    summary = run_summary(records)
    assert not method_keys({key for row in run_history(records) for key in row})
    assert len(method_keys(summary)) >= 5 * 15
    for method in result["methods"]:
        assert summary[f"compare/{method['name']}/seconds"] == pytest.approx(method["seconds"])
        assert summary[f"compare/{method['name']}/speedup_vs_retrain"] == pytest.approx(method["speedup_vs_retrain"])
        assert summary[f"compare/{method['name']}/recall@20"] == pytest.approx(method["utility"]["recall@20"])
        assert summary[f"compare/{method['name']}/gap_closed_item_rank"] == pytest.approx(
            method["completeness"]["gap_closed_item_rank"])
    assert summary["compare/Retrain/gap_closed_item_rank"] == pytest.approx(1.0)
    assert summary["compare/headline_completeness"] == "gap_closed_item_rank"
    assert summary["compare/table"]["_type"] == "table-file" and summary["compare/table"]["nrows"] == 5

    # The table, one row per method, and the charts built from it.
    table = json.loads(next((folder / "files" / "media" / "table" / "compare").glob("table_*.table.json")).read_text())
    assert table["columns"] == list(COMPARISON_COLUMNS)
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert list(rows) == names
    for method in result["methods"]:
        assert rows[method["name"]]["seconds"] == pytest.approx(method["seconds"])
        assert rows[method["name"]]["completeness"] == pytest.approx(method["completeness"]["gap_closed_item_rank"])
    panels = comparison_panels(config)
    check_comparison_charts(panels, folder / "files", records)
    assert panels["compare/chart/gap_closed_vs_speedup"]["stringSettings"]["y-axis-title"] == "gap_closed_item_rank (1 = Retrain)"
    tables = {key: value for key, value in summary.items() if key.startswith("compare/chart/") and key.endswith("_table")}
    assert {value["path"] for value in tables.values()} == {summary["compare/table"]["path"]}  # each chart draws that table

    # No raw id of a deleted row anywhere in the run; the scan does see what is written in the
    # clear (a method name in the transaction log and the table). The console is not captured.
    seen = files_containing([folder, staging], [*deleted_ids, "IFRU(k_hop=0, solver=cg)"])
    assert not {needle: paths for needle, paths in seen.items() if needle in deleted_ids}
    assert any(p.endswith(".wandb") for p in seen["IFRU(k_hop=0, solver=cg)"])
    assert any(p.endswith(".table.json") for p in seen["IFRU(k_hop=0, solver=cg)"])
    assert not list(folder.rglob("output.log"))


# ---------------------------------------------------------------------- unlearn
def test_unlearn_logs_a_request_time_series_and_artifacts_without_deleted_ids(distinctive_slice, tmp_path, staging, capsys):
    data_file, deleted_ids = distinctive_slice
    recipe = write_recipe(tmp_path / "forget.yaml", data_file, tmp_path / "runs")
    main(["fit", "-c", str(recipe)])
    checkpoint = next((tmp_path / "ckpt").glob("best*.ckpt"))
    (tmp_path / "requests.csv").write_text("user\n" + "\n".join(member(u) for u in DELETED_USERS) + "\n")
    main(["unlearn", "-c", str(recipe), "--ckpt_path", str(checkpoint), "--requests", "requests.csv",
          "--method", "FineTune", "--method.epochs", "1", "--out", "unlearned", "--log_artifacts", "true"])
    out = capsys.readouterr().out
    assert "[unlearn] W&B artifacts: unlearned-model-" in out
    journal = [json.loads(line) for line in (tmp_path / "unlearned" / "journal.jsonl").read_text().splitlines()]
    applied = journal[-1]
    assert applied["status"] == "applied"

    runs = offline_runs(tmp_path / "runs")
    assert set(runs) == {"fit", "unlearn"}
    records = finished_records(next(runs["unlearn"].glob("run-*.wandb")))

    # Per-request metrics are plotted against the request index.
    axes = {r.metric.glob_name or r.metric.name: r.metric.step_metric for r in records if r.WhichOneof("record_type") == "metric"}
    assert axes["unlearn/*"] == "unlearn/request" and "unlearn/request" in axes
    rows = [row for row in run_history(records) if "unlearn/request" in row]
    assert [row["unlearn/request"] for row in rows] == [0] and rows[0]["unlearn/rows_removed"] == applied["num_rows"]
    assert rows[0]["unlearn/seconds"] > 0 and "unlearn/test/recall@20" in rows[0]

    config = run_config(records)
    assert config["deletion_applied"]["digest"] == applied["digest"] and config["deletion_applied"]["num_users"] == 2
    assert config["requests"] == "requests.csv" and config["method"]["class_path"].endswith("FineTune")

    # The unlearned checkpoint and the journal, as artifacts (staged copies, uploaded by `wandb sync`).
    artifacts = {r.artifact.type: r.artifact for r in records if r.WhichOneof("record_type") == "artifact"}
    model, record = artifacts["unlearned-model"], artifacts["unlearning-journal"]
    assert [c.path for c in model.manifest.contents] == [Path(applied["checkpoint"]).name]
    assert [c.path for c in record.manifest.contents] == ["journal.jsonl"]
    assert json.loads(model.metadata)["requests"][0]["digest"] == applied["digest"]
    staged = [Path(c.local_path) for a in (model, record) for c in a.manifest.contents]
    assert all(p.is_file() and p.is_relative_to(staging) for p in staged)
    uploaded = torch.load(staged[0], weights_only=True)  # weights and hyperparameters: no removals, no callback state
    assert set(uploaded) == {"pytorch-lightning_version", "state_dict", "hyper_parameters"}
    kept = MF.load_from_checkpoint(tmp_path / "unlearned" / Path(applied["checkpoint"]).name)
    assert all(torch.equal(a, b) for a, b in zip(MF.load_from_checkpoint(staged[0]).state_dict().values(), kept.state_dict().values()))

    seen = files_containing([runs["unlearn"], runs["fit"], staging], [*deleted_ids, applied["digest"]])
    assert not {needle: paths for needle, paths in seen.items() if needle in deleted_ids}
    assert seen[applied["digest"]]  # the scan reads what is there: the digest is, in the clear


_SYNTHETIC = (
    "import pytorch_lightning as pl\n"
    "from pytorch_lightning.loggers import WandbLogger\n"
    "from lightning_unlearn import MF, RecDataModule\n"
    "from lightning_unlearn.data import Synthetic\n"
    "from lightning_unlearn.unlearning import DeletionRequest, FineTune, UnlearningCallback\n"
    "dm = RecDataModule(Synthetic(num_users=20, num_items=16), batch_size=64)\n"
    "model = MF(dm.num_users, dm.num_items, embedding_dim=4)\n"
)
_REFUSED_IN = {  # where a W&B run that records the console is live when a request naming an unknown id is refused
    # Lightning starts the run before the callback checks its requests
    "a Trainer": "callback = UnlearningCallback(FineTune(), requests_file='requests.csv', dirpath='forget')\n"
                 "trainer = pl.Trainer(max_epochs=1, logger=WandbLogger(save_dir='.', offline=True), callbacks=[callback],\n"
                 "                     enable_progress_bar=False, enable_checkpointing=False)\n"
                 "trainer.fit(model, dm)\n",
    # apply_pending outside a Trainer, given the logger
    "apply_pending": "pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False).fit(model, dm)\n"
                     "callback = UnlearningCallback(FineTune(), requests=[DeletionRequest(users=[918273645501])], dirpath='forget')\n"
                     "callback.apply_pending(model, dm, loggers=[WandbLogger(save_dir='.', offline=True)])\n",
    # compare in Python, given the logger
    "compare": "from lightning_unlearn.unlearning import DeletionSpec, FitRecipe\n"
               "from lightning_unlearn.unlearning.compare import compare\n"
               "pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False).fit(model, dm)\n"
               "compare(model, dm, [FineTune()], DeletionSpec(requests_file='requests.csv'), FitRecipe(max_epochs=1),\n"
               "        loggers=[WandbLogger(save_dir='.', offline=True)])\n",
}


def _wandb_defaults() -> dict[str, str]:
    """The environment with W&B's defaults (it records the console), and a service of the child's own (not this
    process's, if it started one)."""
    return {k: v for k, v in os.environ.items() if k not in ("WANDB_CONSOLE", "WANDB_SILENT", "WANDB_SERVICE")}


def _files_holding(folder: Path, needle: bytes, but: tuple[str, ...] = ()) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.name not in but and needle in p.read_bytes()]


@pytest.mark.parametrize("where", list(_REFUSED_IN))
def test_a_refusal_while_a_wandb_run_records_the_console_names_no_id(tmp_path, where):
    """In Python (not the command, which turns console capture off), the refusal is raised without the ids; its
    traceback would otherwise be recorded by the run."""
    (tmp_path / "requests.csv").write_text("user\n918273645501\n")
    script = tmp_path / "script.py"
    script.write_text(_SYNTHETIC + _REFUSED_IN[where])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_wandb_defaults(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0 and "A deletion request was refused" in done.stderr and "918273645501" not in done.stderr
    settled(tmp_path, until=lambda: any(tmp_path.rglob("output.log")))  # W&B's service writes on after the script exits
    assert list(tmp_path.rglob("output.log"))  # the run recorded the console
    assert not _files_holding(tmp_path, b"918273645501", but=("requests.csv", "script.py"))


@pytest.mark.parametrize("reinit", ["default", "create_new"])
def test_a_command_told_to_record_the_console_ends_the_run_before_it_prints_a_refusal(tmp_path, reinit):
    """WANDB_CONSOLE=wrap opts in to console capture; `unlearn --log_artifacts` and `compare` start their W&B run before
    the request is read, and their refusal names ids: the run ends first, and the terminal still gets the message.
    With ``reinit="create_new"`` the logger's run is not W&B's global one."""
    recipe = tmp_path / "r.yaml"
    extra = ", reinit: create_new" if reinit == "create_new" else ""
    recipe.write_text(
        "seed_everything: 0\n"
        "trainer: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false,\n"
        f"  logger: {{class_path: pytorch_lightning.loggers.WandbLogger, init_args: {{offline: true, save_dir: runs{extra}}}}},\n"
        "  callbacks: [{class_path: pytorch_lightning.callbacks.ModelCheckpoint, init_args: {dirpath: ckpt, filename: best}}]}\n"
        "model: {class_path: lightning_unlearn.models.MF, init_args: {embedding_dim: 4}}\n"
        "data: {source: {class_path: lightning_unlearn.data.Synthetic, init_args: {num_users: 20, num_items: 16}}, batch_size: 64}\n"
    )
    # ids of twelve digits: a short one is found in W&B's log timestamps (nanoseconds), not leaked
    (tmp_path / "requests.csv").write_text("user\n918273645501\n")
    (tmp_path / "headless.csv").write_text("918273645502,918273645503\n")  # no header: the error quotes the first line
    cli = [sys.executable, "-m", "lightning_unlearn.cli"]
    env = {**_wandb_defaults(), "WANDB_CONSOLE": "wrap"}

    def command(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cli, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    assert command("fit", "-c", str(recipe)).returncode == 0
    unlearn = command("unlearn", "-c", str(recipe), "--ckpt_path", "ckpt/best.ckpt", "--requests", "requests.csv",
                      "--method", "FineTune", "--out", "forget", "--log_artifacts", "true")
    compare = command("compare", "-c", str(recipe), "--ckpt_path", "ckpt/best.ckpt", "--out", "cmp",
                      "--methods+", "lightning_unlearn.unlearning.FineTune", "--deletion.kind", "users",
                      "--deletion.requests_file", "headless.csv")
    callback = json.dumps({"class_path": "lightning_unlearn.unlearning.UnlearningCallback", "init_args": {
        "method": {"class_path": "lightning_unlearn.unlearning.FineTune"}, "requests_file": "requests.csv", "dirpath": "in_fit"}})
    in_fit = command("fit", "-c", str(recipe), f"--trainer.callbacks+={callback}")
    assert unlearn.returncode == 2 and "unknown user id: '918273645501'" in unlearn.stderr
    assert compare.returncode == 2 and "'918273645502'" in compare.stderr
    assert in_fit.returncode == 2 and "unknown user id: '918273645501'" in in_fit.stderr  # redacted in the run, whole after it
    runs = lambda: list(tmp_path.glob("runs/wandb/offline-run-*/run-*.wandb"))  # noqa: E731
    settled(tmp_path, until=lambda: len(runs()) == 4)
    assert len(runs()) == 4  # fit's, unlearn's, compare's and the refused fit's
    for needle in (b"918273645501", b"918273645502"):
        assert not _files_holding(tmp_path, needle, but=("requests.csv", "headless.csv"))


def test_artifacts_need_a_wandb_logger(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "trainer: {logger: false, enable_progress_bar: false}\n"
        "model: {class_path: lightning_unlearn.models.MF, init_args: {embedding_dim: 4}}\n"
        "data: {source: {class_path: lightning_unlearn.data.Synthetic, init_args: {num_users: 10, num_items: 8}}}\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "-c", str(recipe), "--ckpt_path", "missing.ckpt", "--requests", "r.csv", "--method", "FineTune",
              "--log_artifacts", "true"])
    assert exit_info.value.code == 2
    assert re.search(r"log_artifacts=true.*trainer\.logger.*WandbLogger.*got no logger", capsys.readouterr().err)


def test_artifacts_refused_when_wandb_is_disabled(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "trainer: {enable_progress_bar: false, logger: {class_path: pytorch_lightning.loggers.WandbLogger,\n"
        f"  init_args: {{mode: disabled, save_dir: {tmp_path}}}}}}}\n"
        "model: {class_path: lightning_unlearn.models.MF, init_args: {embedding_dim: 4}}\n"
        "data: {source: {class_path: lightning_unlearn.data.Synthetic, init_args: {num_users: 10, num_items: 8}}}\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "-c", str(recipe), "--ckpt_path", "missing.ckpt", "--requests", "r.csv", "--method", "FineTune",
              "--log_artifacts", "true"])
    assert exit_info.value.code == 2
    assert re.search(r"log_artifacts=true.*disabled.*offline.*log_artifacts=false", capsys.readouterr().err)


def test_log_model_on_an_offline_run_is_refused_naming_both_options(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "trainer: {enable_progress_bar: false, logger: {class_path: pytorch_lightning.loggers.WandbLogger,\n"
        f"  init_args: {{offline: true, log_model: true, save_dir: {tmp_path}}}}}}}\n"
        "model: {class_path: lightning_unlearn.models.MF, init_args: {embedding_dim: 4}}\n"
        "data: {source: {class_path: lightning_unlearn.data.Synthetic, init_args: {num_users: 10, num_items: 8}}}\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(recipe)])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "trainer.logger.init_args.log_model=True" in err and "trainer.logger.init_args.offline=true" in err
    assert "--log_artifacts=true" in err and "wandb sync" in err
    assert not (tmp_path / "wandb").exists()  # refused before a run was started


# ---------------------------------------------------------------------- reporting, unit level
def fake_result(kind: str = "interactions") -> dict:
    def method(name, seconds, recall, gap):
        return {"name": name, "seconds": seconds, "precompute_seconds": 0.0, "speedup_vs_retrain": 2.0 / seconds,
                "utility": {"recall@20": recall, "ndcg@20": recall / 2, "auc": 0.9},
                "completeness": {"gap_closed_rank": gap, "gap_closed_item_rank": gap / 2, "overlap@20": float("nan")}}
    return {"deletion": {"kind": kind, "rows": 12, "digest": "ab" * 32},
            "original": {"fit_seconds": 3.0, "grad_norm": 0.1, "utility": {"recall@20": 0.3}},
            "methods": [method("Retrain", 2.0, 0.30, 1.0), method("IFRU(k_hop=0)", 0.1, 0.29, 0.98)]}


def test_comparison_rows_follow_the_columns_and_drop_non_finite_values():
    rows = comparison_rows(fake_result())
    assert [r[0] for r in rows] == ["Retrain", "IFRU(k_hop=0)"]
    ifru = dict(zip(COMPARISON_COLUMNS, rows[1]))
    assert ifru["seconds"] == 0.1 and ifru["speedup_vs_retrain"] == 20.0 and ifru["completeness"] == 0.98
    assert ifru["overlap@20"] is None and ifru["gap_closed_mia"] is None  # NaN and missing alike
    # Whole users: the headline is what their data did to the items.
    assert dict(zip(COMPARISON_COLUMNS, comparison_rows(fake_result("users"))[1]))["completeness"] == 0.49


def test_other_loggers_get_the_per_method_figures_at_the_method_position(tmp_path):
    logger = CSVLogger(tmp_path)
    log_comparison([logger], fake_result())  # saves: no logger.save() needed for metrics.csv
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    steps = {k: int(row["step"]) for row in rows for k, v in row.items() if v not in ("", None) and k != "step"}
    values = {k: float(v) for row in rows for k, v in row.items() if v not in ("", None) and k != "step"}
    assert values["compare/IFRU(k_hop=0)/seconds"] == 0.1 and values["compare/Retrain/recall@20"] == 0.30
    assert values["compare/IFRU(k_hop=0)/speedup_vs_retrain"] == 20.0 and values["compare/IFRU(k_hop=0)/gap_closed_rank"] == 0.98
    assert steps["compare/Retrain/seconds"] == 1 and steps["compare/IFRU(k_hop=0)/seconds"] == 2
    assert "compare/IFRU(k_hop=0)/overlap@20" not in values  # non-finite figures are left out, not logged as NaN


@pytest.mark.parametrize("fit_seconds", [3.0, None], ids=["fitted", "loaded from a checkpoint"])
def test_wandb_gets_per_method_figures_in_the_summary_and_charts_with_their_specs(fit_seconds, tmp_path):
    """log_comparison alone, on an offline run (no CLI, no data): what the W&B workspace is built from. An original loaded
    from --ckpt_path has no fit seconds: no key, not a null."""
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    wandb.finish()  # a run an earlier test left open would be reused by WandbLogger
    logger = WandbLogger(project="lightning-unlearn-tests", offline=True, save_dir=str(tmp_path))
    result = fake_result()
    result["original"]["fit_seconds"] = fit_seconds
    log_comparison([logger], result)
    folder = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    records = finished_records(next(folder.glob("run-*.wandb")))
    summary, history = run_summary(records), run_history(records)

    assert summary["compare/IFRU(k_hop=0)/seconds"] == 0.1 and summary["compare/Retrain/recall@20"] == 0.30
    assert summary["compare/IFRU(k_hop=0)/gap_closed_rank"] == 0.98 and summary["compare/IFRU(k_hop=0)/speedup_vs_retrain"] == 20.0
    assert "compare/IFRU(k_hop=0)/overlap@20" not in summary  # non-finite: left out
    assert summary["compare/headline_completeness"] == "gap_closed_rank" and summary["compare/original/recall@20"] == 0.3
    assert summary.get("compare/original/fit_seconds", "absent") == (fit_seconds or "absent")
    assert len(history) == 1 and not method_keys(history[0])  # one row: the table and the charts' tables
    assert {"compare/table", "compare/chart/recall_vs_seconds_table"} <= set(history[0])
    check_comparison_charts(comparison_panels(run_config(records)), folder / "files", records)
    table = json.loads((folder / "files" / summary["compare/table"]["path"]).read_text())
    assert table["columns"] == list(COMPARISON_COLUMNS) and [row[0] for row in table["data"]] == ["Retrain", "IFRU(k_hop=0)"]


def test_config_holds_each_hyperparameter_once(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "trainer: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false, enable_checkpointing: false,\n"
        "  logger: {class_path: pytorch_lightning.loggers.WandbLogger,\n"
        f"    init_args: {{project: lightning-unlearn-tests, offline: true, save_dir: {tmp_path / 'runs'}}}}}}}\n"
        "model: {class_path: lightning_unlearn.models.MF, init_args: {embedding_dim: 4, optimizer: sgd}}\n"
        "data: {source: {class_path: lightning_unlearn.data.Synthetic, init_args: {num_users: 12, num_items: 9}}, batch_size: 64}\n"
    )
    main(["fit", "-c", str(recipe)])
    records = finished_records(next(offline_runs(tmp_path / "runs")["fit"].glob("run-*.wandb")))
    config = run_config(records)
    config.pop("_wandb")
    model, data = config["model"]["init_args"], config["data"]
    assert model["embedding_dim"] == 4 and model["num_users"] == 12 and data["batch_size"] == 64
    assert {"seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler", "ckpt_path"} <= set(config)
    assert not ((set(model) | set(data)) - {"optimizer"}) & set(config)  # no flat copy of save_hyperparameters
    assert "_instantiator" not in config and "embedding_dim" not in config and "batch_size" not in config
    assert model["optimizer"] == "sgd" and config["optimizer"] is None  # the flat copy used to overwrite the CLI's entry


def test_plot_comparison_draws_the_w_and_b_scatters_with_log_axes(tmp_path):
    pytest.importorskip("matplotlib")
    from lightning_unlearn.unlearning.reporting import plot_comparison

    result = json.loads((REPO / "docs" / "measurements" / "ml100k_compare_mf.json").read_text())
    figure = plot_comparison(result, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    left, right = figure.axes[:2]
    assert left.get_xscale() == right.get_xscale() == "log"
    assert left.get_xlabel() == "unlearning seconds (log scale)" and right.get_ylabel() == "gap_closed_rank (1 = Retrain)"
    names = [m["name"] for m in result["methods"]]
    for axes in (left, right):
        assert sorted(t.get_text() for t in axes.texts) == sorted(names)  # every point is labelled
    assert [t.get_text() for t in figure.legends[0].get_texts()] == names
    assert (REPO / "docs" / "_static" / "compare_chart.png").is_file()  # the picture docs/wandb.rst shows


def test_the_package_does_not_import_wandb():
    code = "import sys, lightning_unlearn, lightning_unlearn.cli, lightning_unlearn.unlearning.reporting; print('wandb' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


# ---------------------------------------------------------------------- the demo without data
def test_demo_without_data_or_network_says_how_to_point_it_at_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIGHTNING_UNLEARN_DATA", str(tmp_path / "empty"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("lightning_unlearn.data.download.urllib.request.urlopen", offline)
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "-c", str(REPO / "recipes" / "ml100k" / "demo_interactions.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    expected = tmp_path / "empty" / "ml-100k" / "u.data"
    assert f"Data file not found: {expected}" in err
    assert "data.source.init_args.root" in err and "LIGHTNING_UNLEARN_DATA" in err
    assert "Downloading https://files.grouplens.org/datasets/movielens/ml-100k.zip failed" in err and "no network" in err
    assert "Traceback" not in err
