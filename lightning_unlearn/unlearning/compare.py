"""The comparison harness: every method from the same trained model, judged against ``Retrain``."""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import hmac
import inspect
import io
import json
import platform
import secrets
import shutil
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from pytorch_lightning.loggers import Logger

from lightning_unlearn.data.batches import TrainRows
from lightning_unlearn.data.datamodule import RecDataModule
from lightning_unlearn.files import write_whole
from lightning_unlearn.metrics.completeness import completeness_report
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.models.functional import model_digest
from lightning_unlearn.unlearning.deletion import DeletionSpec
from lightning_unlearn.unlearning.memory import PeakMemory
from lightning_unlearn.unlearning.methods.base import Unlearner, UnlearningContext, UnlearningReport
from lightning_unlearn.unlearning.methods.curvature import CurvatureCache
from lightning_unlearn.unlearning.methods.retrain import Retrain
from lightning_unlearn.unlearning.methods.second_order import SecondOrderUnlearner
from lightning_unlearn.unlearning.recipe import FitRecipe
from lightning_unlearn.unlearning.reporting import ids_kept_out_of, is_measured, log_config, log_method_result
from lightning_unlearn.unlearning.stationarity import objective_gradient_norm

__all__ = ["check_arguments", "compare", "format_table", "progress_detail"]

UTILITY = ("recall@20", "ndcg@20", "hit@20", "auc")


def compare(
    model: Recommender,
    datamodule: RecDataModule,
    methods: Sequence[Unlearner],
    deletion: DeletionSpec,
    recipe: FitRecipe,
    seed: int = 0,
    fit_seconds: float = float("nan"),
    device: torch.device | None = None,
    k: int = 20,
    progress: Callable[[str], None] = print,
    loggers: Sequence[Logger] = (),
    out: str | Path | None = None,
    resume: bool = False,
    repeats: int = 1,
) -> dict[str, Any]:
    """Delete once, then run every method on a copy of the same trained model.

    ``Retrain()`` from the original's seed is the reference and runs first (it is added when
    ``methods`` lacks it); a ``Retrain(seed=...)`` with another seed gives the seed noise.
    The datamodule keeps the deletion afterwards.

    As soon as the deletion is resolved its counts (never its ids nor an unkeyed digest) are added to the
    loggers' hyperparameters as ``deletion_applied``; each method's seconds and utility are
    logged as ``compare/<method>/<metric>`` when it finishes (in W&B's run summary; at the
    method's position as step for other loggers), so a crash keeps what was done.

    Args:
        model: the trained original (left unchanged).
        datamodule: its datamodule, set up.
        methods: the methods to compare.
        deletion: what to delete.
        recipe: how the original was fitted (``Retrain`` refits with it).
        seed: the original's seed.
        fit_seconds: how long fitting the original took (reported).
        device: where methods run (default: the model's device).
        k: top-K cut-off of the completeness figures.
        progress: called with one line per step (method, rows, seconds, solver iterations).
        loggers: Lightning loggers that receive the deletion summary and per-method results.
        out: a folder for the partial results (``None``: none are kept). Before each method
            ``<out>/compare.partial.json`` is written naming it as ``running``; after it, the file
            holds every method measured so far (seconds, utility, diagnostics; failed ones with
            ``status: "failed"`` and the error) and ``<out>/compare.partial/<n>.pt`` the
            measured model's weights (the completeness figures, computed at the end, compare
            each model with the ``Retrain`` reference). Each file is written whole (a temporary
            file in the folder, then :func:`os.replace`), so a run killed at any point leaves
            the last complete state. :func:`write_outputs` removes them once ``compare.json`` holds
            every method measured.
        resume: reuse what ``<out>/compare.partial.json`` holds when it was measured from the same
            configuration (the data's fingerprint, the deletion's counts and rows, the original's
            parameter fingerprint, the seed, the recipe, the methods and their settings, ``repeats``,
            ``k`` and the device): those methods
            are not run again (their seconds are the measured ones, their weights are loaded for
            the completeness figures); failed or unfinished methods run again.
        repeats: time each method's request this many times, each from the same prepared state
            (a copy of the original, and of the method sharing its curvature cache, which is rolled
            back after each), and report the median as ``seconds`` (every run in ``seconds_runs``).
            The figures are those of the first run. ``Retrain`` and its other seeds run once: a
            retrain takes minutes, and its seconds vary less than a short request's on a shared machine.

    Returns:
        The ``compare.json`` document (see the ``compare`` command); a failed method's entry is
        ``{"name", "status": "failed", "error"}``, a measured one has ``status: "ok"``.

    Raises:
        ValueError: two methods share a name, or ``repeats`` is not an integer >= 1.
        PartialResultsMismatch: ``resume`` finds partial results of another configuration (the
            message names what differs; remove them or choose another ``out``).
        InvalidDeletionRequest: the deletion selects nothing that is in the training split.
        UnlearningError: the ``Retrain`` reference failed (a failure of any other method is
            reported in its entry and compare goes on with the next one).
    """
    check_arguments(methods, k, repeats)
    device = device or model.device
    datamodule.setup()
    original = copy.deepcopy(model).eval()
    with ids_kept_out_of(loggers):  # a W&B run of the loggers may record the console
        request = deletion.build(datamodule.train)
        resolved = request.resolve(datamodule.train, removed=datamodule.removed_keys)
    log_config(loggers, {"deletion_applied": resolved.summary()})
    deleted_table = datamodule.train.select(resolved.rows)
    nonmembers = datamodule.test
    deleted = datamodule.remove(resolved.rows, resolved.users, resolved.items)
    original_utility = _utility(original, datamodule)  # on the splits the methods are scored on (its own graph still)
    retained = datamodule.train_rows()
    original.set_graph(datamodule.train)
    grad_norm = objective_gradient_norm(original, retained)
    whole_users = resolved.kind == "users"

    ordered = _with_reference_first(methods)
    context = UnlearningContext(device=device, seed=seed, fit=lambda fresh: recipe(fresh, datamodule), progress=recipe.progress)
    measured_with = _measured_with(original, datamodule, resolved.summary(), ordered, seed, recipe, repeats, k, device)
    partial = _Partial(out, measured_with, resolved.digest) if out is not None else None
    done = partial.load(resume, progress) if partial is not None else {}
    models: dict[str, Recommender] = {}
    entries: list[dict[str, Any]] = []
    curvature = _SharedCurvature()
    deleted_here = deleted.to(device)  # what a request's rollback copy is taken of, on the cache's device
    for index, method in enumerate(ordered, start=1):
        step = f"[compare] {index}/{len(ordered)} {method.name}"
        if method.name in done:
            entry, state = done[method.name]
            unlearned = copy.deepcopy(original)
            unlearned.load_state_dict(state)
            models[method.name] = unlearned.eval()
            entries.append(entry)
            progress(f"{step}: resumed from {partial.path.name} ({entry['seconds']:.2f} s when measured)")
            log_method_result(loggers, {"name": method.name, "seconds": entry["seconds"],
                                        "precompute_seconds": entry["precompute_seconds"], "utility": entry["utility"]}, step=index)
            continue
        if partial is not None:
            partial.write(entries, running=method.name)
        progress(f"{step}: unlearning {resolved.num_rows} rows ({resolved.kind}) ...")
        unlearned = copy.deepcopy(original).train()
        try:
            with PeakMemory(device) as peak:
                every_row = retained.concat(deleted).to(device)
                shared = curvature.take(method, unlearned, every_row)  # not timed, as prepare
                precompute = method.prepare(unlearned, every_row, context)  # once per trained model, not timed
                curvature.offer(method, unlearned)
                runs = 1 if isinstance(method, Retrain) else repeats
                report, seconds = _requests(method, original, unlearned, retained, deleted_here, context, runs)
        except Exception as err:  # a failed method is reported; KeyboardInterrupt and the like still stop compare
            curvature.release(method)
            entries.append({"name": method.name, "status": "failed", "error": f"{type(err).__name__}: {err}"})
            progress(f"{step}: FAILED: {entries[-1]['error']}")
            if partial is not None:
                partial.write(entries)
            if index == 1:  # the reference: nothing can be judged without it
                raise
            continue
        curvature.release(method)
        unlearned.eval()
        models[method.name] = unlearned
        entries.append({"name": method.name, "status": "ok", "seconds": statistics.median(seconds),
                        "precompute_seconds": report.precompute_seconds + precompute + (shared or 0.0), **peak.as_dict(),
                        "diagnostics": {**report.diagnostics, **({"cache": "shared"} if shared is not None else {}),
                                        **({"seconds_runs": seconds} if len(seconds) > 1 else {})},
                        "utility": _utility(unlearned, datamodule)})
        if partial is not None:
            partial.save_model(method.name, unlearned)
            partial.write(entries)
        detail = progress_detail(report.diagnostics)
        spread = f" (median of {', '.join(f'{t:.2f}' for t in seconds)})" if len(seconds) > 1 else ""
        progress(f"{step}: done in {entries[-1]['seconds']:.2f} s{spread}{f' ({detail})' if detail else ''}, "
                 f"recall@20 {entries[-1]['utility'].get('recall@20', float('nan')):.4f}")
        log_method_result(loggers, {"name": method.name, "seconds": entries[-1]["seconds"],
                                    "precompute_seconds": entries[-1]["precompute_seconds"], "utility": entries[-1]["utility"]},
                          step=index)

    reference = models["Retrain"]
    noise = next((models[m.name] for m in ordered
                  if isinstance(m, Retrain) and m.seed is not None and m.seed != seed and m.name in models), None)
    cache: dict = {}
    retained_table = datamodule.train
    results = []
    for entry in entries:
        if entry["status"] != "ok":
            results.append(entry)
            continue
        figures = completeness_report(
            original, models[entry["name"]], reference, deleted_table, retained_table, nonmembers, k=k,
            noise=noise, seed=seed, whole_users=whole_users, cache=cache,
        )
        results.append({
            "name": entry["name"],
            "status": "ok",
            "seconds": entry["seconds"],
            "precompute_seconds": entry["precompute_seconds"],
            **{key: entry[key] for key in ("peak_mb", "cuda_peak_mb") if key in entry},
            "speedup_vs_retrain": entries[0]["seconds"] / max(entry["seconds"], 1e-12),
            "utility": entry["utility"],
            "deleted": figures["deleted"],
            "completeness": figures["completeness"],
            "noise": figures.get("noise", {}),
            "diagnostics": entry["diagnostics"],
        })
    # the original's own figures, the same in every report (the reference's entry is always there: it runs first or stops the comparison)
    original_deleted, original_overlap = figures["original"], figures["baseline"]
    return {
        "dataset": type(datamodule.source).__name__,
        "model": type(model).__name__,
        "loss": model.loss_name,
        "hardware": _hardware(device),
        "deletion": {**resolved.summary(), "rows": resolved.num_rows, "users": resolved.num_users, "items": resolved.num_items},
        "k": k,
        "original": {"fit_seconds": fit_seconds, "grad_norm": grad_norm, "utility": original_utility, "deleted": original_deleted,
                     "completeness": original_overlap},
        "methods": results,
    }


_COUNTS = ("iterations", "rounds", "epochs", "steps")  # also as a suffix: dense_cg_iterations
_BLOCKS = ("num_blocks", "solved_blocks")
_FAILURES = ("failed_blocks", "rejected_blocks")  # shown only when non-zero


def progress_detail(diagnostics: dict[str, Any]) -> str:
    """A short account of a method's work from its diagnostics: solver, iteration counts, convergence.

    Picks the integer entries whose last name part is or ends in ``iterations``, ``rounds``,
    ``epochs`` or ``steps``, or is ``num_blocks``/``solved_blocks`` (IFRU's ``solver/iterations``
    with CG or ``solver/num_blocks`` with the block solver; AltEraser's ``rounds``,
    ``solved_blocks`` and ``dense_cg_iterations``), plus ``solver``, ``converged``,
    ``relative_residual``, and ``failed_blocks``/``rejected_blocks`` when not zero.

    Example:
        >>> progress_detail({"solver": "cg", "solver/iterations": 12, "solver/converged": True, "seed": 0})
        'solver=cg, iterations=12, converged'
        >>> progress_detail({"rounds": 2, "solved_blocks": 90, "rejected_blocks": 0, "dense_cg_iterations": 0})
        'rounds=2, solved_blocks=90, dense_cg_iterations=0'
        >>> progress_detail({"seed": 1})
        ''
    """
    parts = []
    if isinstance(diagnostics.get("solver"), str):
        parts.append(f"solver={diagnostics['solver']}")
    for key, value in diagnostics.items():
        name = key.rsplit("/", 1)[-1]
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if name in _BLOCKS or any(name == c or name.endswith("_" + c) for c in _COUNTS):
            parts.append(f"{name.removeprefix('num_')}={value}")
        elif name in _FAILURES and value > 0:
            parts.append(f"{name.upper()}={value}")
    converged = next((v for k, v in diagnostics.items() if k.rsplit("/", 1)[-1] == "converged" and isinstance(v, bool)), None)
    if converged is not None:
        parts.append("converged" if converged else "NOT converged")
    residual = next((v for k, v in diagnostics.items() if k.rsplit("/", 1)[-1] == "relative_residual"), None)
    if isinstance(residual, float):
        parts.append(f"relative_residual={residual:.2g}")
    return ", ".join(parts)


PARTIAL = "compare.partial.json"


def _measured_with(original: Recommender, datamodule: RecDataModule, deletion: dict[str, Any], methods: Sequence[Unlearner],
                   seed: int, recipe: FitRecipe, repeats: int, k: int, device: torch.device) -> dict[str, Any]:
    """What the measured figures depend on, but which rows were deleted (their digest is keyed, see :class:`_Partial`):
    the data as loaded (its fingerprint), the datamodule's batches (the refit trains in them; sampled candidates change
    what utility is), the deletion's kind and counts, the original's parameter fingerprint, the seed, the refit's recipe,
    every method's class and settings in order, ``repeats``, ``k`` and the device."""
    recipe_settings = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe) if f.name != "progress"}
    return {
        "data": datamodule.data_fingerprint,
        "batches": {name: datamodule.hparams.get(name) for name in ("batch_size", "eval_batch_size", "eval_candidates")},
        "deletion": deletion,
        "model": type(original).__name__,
        "parameters": model_digest(original),
        "seed": seed,
        "recipe": recipe_settings,
        "methods": [_settings(m) for m in methods],
        "repeats": repeats,
        "k": k,
        "device": str(device),
    }


def _settings(method: Unlearner) -> dict[str, str]:
    """A method's class and every argument of its constructor as it holds it (``repr``)."""
    names = [n for n in inspect.signature(type(method).__init__).parameters if n != "self" and hasattr(method, n)]
    return {"class": f"{type(method).__module__}.{type(method).__qualname__}", **{n: repr(getattr(method, n)) for n in names}}


class PartialResultsMismatch(ValueError):
    """``compare --resume`` found partial results measured from another configuration (the message names what differs)."""


def _digest_of(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class _Partial:
    """``<out>/compare.partial.json`` and the measured models' weights in ``<out>/compare.partial/``."""

    def __init__(self, out: str | Path, measured_with: dict[str, Any], digest: str):
        self.folder = Path(out)
        self.path, self.models = self.folder / PARTIAL, self.folder / "compare.partial"
        self._measured_with, self._digest = measured_with, digest
        self.key = ""
        self._parts: dict[str, str] = {}  # a digest of each part of the configuration, to name what differs

    def _make_key(self) -> str:
        """SHA-256 of what the figures were measured with and of the deleted rows' digest, keyed with this folder's secret.

        The secret (``compare.partial/key``, owner-readable, removed with the partial results)
        keeps the digest of a requests file's deletion from being matched by hashing known ids.
        """
        secret = self.models / "key"
        if not secret.exists():
            self.models.mkdir(parents=True, exist_ok=True)
            write_whole(secret, secrets.token_hex(32), private=True)
        keyed = hmac.new(bytes.fromhex(secret.read_text()), self._digest.encode(), hashlib.sha256).hexdigest()
        self._parts = {name: _digest_of(value) for name, value in {**self._measured_with, "rows": keyed}.items()}
        return _digest_of(self._parts)

    def load(self, resume: bool, progress: Callable[[str], None]) -> dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]]:
        """The measured entries and their weights by method name (none unless ``resume``)."""
        fresh = not (resume and self.path.exists())
        if fresh:
            if self.path.exists():
                progress(f"[compare] {self.path} (from an earlier run) is replaced; --resume true would reuse it")
            elif resume:
                finished = (self.folder / "compare.json").exists()
                progress(f"[compare] --resume true: nothing to resume in {self.folder} (no {PARTIAL}"
                         f"{'; its compare.json is of a finished comparison, measured again now and replaced' if finished else ''})")
            shutil.rmtree(self.models, ignore_errors=True)  # with its secret: a fresh run makes a new one
        self.key = self._make_key()
        if fresh:
            return {}
        saved = json.loads(self.path.read_text())
        if saved.get("key") != self.key:
            differ = [name for name, value in self._parts.items() if saved.get("parts", {}).get(name) != value] \
                if "parts" in saved else ["the file is from an older lightning-unlearn, which wrote no parts; it"]
            raise PartialResultsMismatch(
                f"compare --resume: {self.path} was measured from another configuration ({', '.join(differ) or 'unknown'} "
                f"differ{'s' if len(differ) == 1 else ''}); remove it (and {self.models.name}/) or choose another out folder."
            )
        if saved.get("running"):
            progress(f"[compare] {saved['running']} was running when the earlier run stopped (killed?); it runs again")
        done = {}
        for entry in saved["methods"]:
            weights = self.models / entry.get("weights", "")
            if entry.get("status") == "ok" and weights.is_file():
                done[entry["name"]] = (entry, torch.load(weights, map_location="cpu", weights_only=True))
        return done

    def save_model(self, name: str, model: Recommender) -> None:
        self.models.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        write_whole(self.models / self._file(name), buffer.getvalue())

    def write(self, entries: list[dict[str, Any]], running: str | None = None) -> None:
        methods = [{**e, "weights": self._file(e["name"])} if e["status"] == "ok" else e for e in entries]
        document = {"complete": False, "key": self.key, "parts": self._parts, "running": running, "methods": methods}
        self.folder.mkdir(parents=True, exist_ok=True)
        write_whole(self.path, json.dumps(document, indent=2, default=_plain))

    @staticmethod
    def _file(name: str) -> str:
        return hashlib.sha256(name.encode()).hexdigest()[:16] + ".pt"


class _SharedCurvature:
    """One curvature cache for every second-order method of a comparison: built by the first, rolled back after each.

    A method that reads no cache, or would hold other blocks (another budget), keeps its own,
    which is dropped once it is measured: at most two caches live at once.
    """

    def __init__(self) -> None:
        self.cache: CurvatureCache | None = None

    def take(self, method: Unlearner, model: Recommender, rows: TrainRows) -> float | None:
        """Give ``method`` the shared cache when it can read it; the seconds its own work on it took (``None``: not taken)."""
        if self.cache is None or not isinstance(method, SecondOrderUnlearner):
            return None
        return method.share(self.cache, model, rows)

    def offer(self, method: Unlearner, model: Recommender) -> None:
        """After ``method.prepare``: its cache becomes the shared one when there is none yet."""
        if self.cache is None and isinstance(method, SecondOrderUnlearner) and method.uses_cache(model) and method.cache.holds(model):
            self.cache = method.cache
            self.cache.mark()

    def release(self, method: Unlearner) -> None:
        """After ``method``'s request: undo its changes of the shared cache, or drop its own cache."""
        if not isinstance(method, SecondOrderUnlearner):
            return
        if method.cache is not self.cache:
            method.clear()
        elif self.cache.marked:
            self.cache.rollback()
        else:  # the request failed and cleared it
            self.cache = None


def _requests(method: Unlearner, original: Recommender, model: Recommender, retained: TrainRows, deleted: TrainRows,
              context: UnlearningContext, runs: int) -> tuple[UnlearningReport, list[float]]:
    """``method``'s request on ``model`` (prepared), then ``runs - 1`` more, each from that prepared state; the first's report, every run's seconds.

    The copy of the blocks the request changes, which the rollback needs, is taken before
    each run and not timed: it is the comparison's cost. A later run takes a copy of
    ``original`` and of the method as it was prepared (one copy kept, its cache not copied but
    rolled back to the state this method prepared: with the inverses and factors it keeps for
    its damping, also on a cache another method built).
    """
    cache = method.cache if isinstance(method, SecondOrderUnlearner) and method.cache.holds(model) else None
    if cache is not None and runs > 1:
        cache.mark()  # rolled back to between runs: the method's prepared cache, not the one it was handed
    prepared = copy.deepcopy(method, {id(cache): cache}) if runs > 1 else None
    if cache is not None and cache.marked:
        cache.save(deleted)
    report = method.unlearn(model, retained, deleted, context)
    seconds = [report.seconds]
    for _ in range(runs - 1):
        if cache is not None:
            cache.rollback()
            cache.save(deleted)
        again = copy.deepcopy(prepared, {id(cache): cache})
        seconds.append(again.unlearn(copy.deepcopy(original).train(), retained, deleted, context).seconds)
    return report, seconds


def check_arguments(methods: Sequence[Unlearner], k: int, repeats: int) -> None:
    """Refuse what :func:`compare` cannot run, before anything runs.

    Args:
        methods: the methods (distinct names, besides the ``Retrain()`` reference).
        k: the top-K cut-off (an integer >= 1).
        repeats: timed runs per method (an integer >= 1).

    Raises:
        ValueError: one of them is not accepted; the message names it and what is.

    Example:
        >>> from lightning_unlearn.unlearning.methods import FineTune
        >>> check_arguments([FineTune(), FineTune()], k=20, repeats=1)
        Traceback (most recent call last):
        ...
        ValueError: compare needs distinct methods; got ['FineTune(epochs=1)', 'FineTune(epochs=1)'].
    """
    for name, value in (("k", k), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"compare({name}=...) must be an integer >= 1, got {value!r}.")
    _with_reference_first(methods)


def _with_reference_first(methods: Sequence[Unlearner]) -> list[Unlearner]:
    reference = [m for m in methods if isinstance(m, Retrain) and m.seed is None]
    others = [m for m in methods if m not in reference]
    names = [m.name for m in others]
    if len(set(names)) != len(names):
        raise ValueError(f"compare needs distinct methods; got {names}.")
    return [reference[0] if reference else Retrain(), *others]


def _utility(model: Recommender, datamodule: RecDataModule) -> dict[str, float]:
    metrics = model.evaluate(datamodule.test_dataloader(), prefix="test")
    # sampled evaluation (RecDataModule(eval_candidates=N)) keeps its marker: sampled/recall@20, sampled/candidates
    keys = [f"test/sampled/{name}" for name in (*UTILITY, "candidates")] if "test/sampled/candidates" in metrics else [f"test/{name}" for name in UTILITY]
    return {key.removeprefix("test/"): metrics[key] for key in keys if key in metrics}


def _hardware(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu or platform.machine(), "threads": torch.get_num_threads(), "device": str(device)}


# ---------------------------------------------------------------------- output
def columns(k: int = 20, kind: str | None = None) -> list[tuple[str, Callable[[dict[str, Any]], Any]]]:
    """The table's and ``compare.csv``'s columns, ``(name, figure of a method's entry)``; the top-``k`` ones at ``compare``'s ``k``.

    For whole users (``kind="users"``) ``gap_item`` comes after the utility: the figure to read for them (DESIGN.md).

    Example:
        >>> [name for name, _ in columns(10)][7:11]
        ['gap_top10', 'gap_mia', 'overlap@10', 'overlap_aff']
        >>> [name for name, _ in columns(20, "users")][4:7]
        ['ndcg@20', 'gap_item', 'gap_rank']
    """
    shown = [
        ("method", lambda m: m["name"]),
        ("seconds", lambda m: m["seconds"]),
        ("speedup", lambda m: m["speedup_vs_retrain"]),
        ("recall@20", lambda m: m["utility"].get("recall@20")),
        ("ndcg@20", lambda m: m["utility"].get("ndcg@20")),
        ("gap_rank", lambda m: m["completeness"]["gap_closed_rank"]),
        ("gap_score", lambda m: m["completeness"]["gap_closed_score"]),
        (f"gap_top{k}", lambda m: m["completeness"][f"gap_closed_top{k}"]),
        ("gap_mia", lambda m: m["completeness"]["gap_closed_mia"]),
        (f"overlap@{k}", lambda m: m["completeness"][f"overlap@{k}"]),
        ("overlap_aff", lambda m: m["completeness"][f"overlap@{k}_affected"]),
        ("score_dist", lambda m: m["completeness"]["score_distance_rel"]),
        ("param_dist", lambda m: m["completeness"]["param_distance_rel"]),
        ("peak_MB", lambda m: None if m.get("peak_mb") is None else round(m["peak_mb"])),
    ]
    if kind == "users":
        shown.insert(5, ("gap_item", lambda m: m["completeness"].get("gap_closed_item_rank")))
    return shown


def format_table(result: dict[str, Any]) -> str:
    """The comparison as a fixed-width text table (one row per method, plus the original)."""
    shown = columns(result.get("k", 20), result["deletion"]["kind"])
    width = max([18, *(len(m["name"]) + 2 for m in result["methods"])])
    header = "".join(f"{name:>12}" if i else f"{name:<{width}}" for i, (name, _) in enumerate(shown))
    lines = [header]
    for method in result["methods"]:
        if not is_measured(method):
            lines.append(f"{method['name']:<{width}}{'FAILED':>12}  {method.get('error', '')}")
            continue
        cells = [fn(method) for _, fn in shown]
        lines.append(f"{cells[0]:<{width}}" + "".join(_cell(c) for c in cells[1:]))
    o = result["original"]
    lines.append(f"{'(original)':<{width}}{_cell(o['fit_seconds'])}{'':>12}{_cell(o['utility'].get('recall@20'))}{_cell(o['utility'].get('ndcg@20'))}")
    d = result["deletion"]
    lines.append(
        f"deletion: {d['kind']}, {d['rows']} rows, {d['users']} whole users, {d['items']} whole items; "
        f"original grad norm {o['grad_norm']:.3g}; {result['hardware']['threads']} threads on {result['hardware']['device']}"
    )
    noise = next((m["noise"] for m in result["methods"] if m.get("noise")), None)
    if noise:
        lines.append("seed noise (Retrain with another seed): " + ", ".join(f"{k} {v:.3f}" for k, v in noise.items()))
    if d["kind"] == "users":
        lines.append("whole users: read gap_item (the rank gap their data left on their items, closed); "
                     "the other gaps are on the deleted users' own scores, which retraining leaves at seed noise")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    """A column 12 wide; a number too large for four decimals there (a diverged gap, say) in exponent form."""
    if value is None:
        return f"{'':>12}"
    if isinstance(value, float):
        text = f"{value:.4f}"
        return f"{text if len(text) < 12 else f'{value:.4g}':>12}"
    return f"{value!s:>12}"


def write_outputs(result: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``compare.json`` and ``compare.csv`` (one row per method) into ``out``, each whole.

    A failed method's CSV row is its name, ``failed`` as its seconds and empty figures. Once both
    are written and every method was measured, the partial results (``compare.partial.json`` and
    ``compare.partial/``) are removed; with a failed method they stay, for ``--resume``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "compare.json", out / "compare.csv"
    write_whole(json_path, json.dumps(result, indent=2, default=_plain))
    rows = io.StringIO(newline="")
    writer = csv.writer(rows)
    written = columns(result.get("k", 20), result["deletion"]["kind"])
    writer.writerow([name for name, _ in written])
    for method in result["methods"]:
        writer.writerow([fn(method) for _, fn in written] if is_measured(method)
                        else [method["name"], "failed", *([""] * (len(written) - 2))])
    write_whole(csv_path, rows.getvalue())
    if all(is_measured(m) for m in result["methods"]):
        (out / PARTIAL).unlink(missing_ok=True)
        shutil.rmtree(out / "compare.partial", ignore_errors=True)
    return json_path, csv_path


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)
