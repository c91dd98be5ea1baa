"""Reporting to the run's loggers, W&B first: the resolved config, comparisons, time series, artifacts.

Everything here goes through Lightning's ``Logger`` objects (``trainer.loggers``); what only W&B
can show (tables, native charts, metric axes, artifacts) is added when a ``WandbLogger`` is among
them. ``wandb`` is imported inside the functions that need it, never when this module loads.

Nothing logged here carries a raw id of deleted data: deletions appear as counts and a digest.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from pytorch_lightning.loggers import Logger, WandbLogger

__all__ = [
    "COMPARISON_COLUMNS",
    "check_artifact_logging",
    "comparison_rows",
    "define_request_axis",
    "headline_completeness",
    "log_comparison",
    "log_config",
    "log_method_result",
    "log_unlearning_artifacts",
    "wandb_loggers",
    "wandb_run_lines",
]

#: Columns of the comparison table logged to W&B (one row per method); ``completeness`` is the
#: headline figure of :func:`headline_completeness`.
COMPARISON_COLUMNS = (
    "method", "seconds", "precompute_seconds", "speedup_vs_retrain", "recall@20", "ndcg@20", "auc", "completeness",
    "gap_closed_rank", "gap_closed_score", "gap_closed_top20", "gap_closed_mia", "overlap@20", "overlap@20_affected",
    "param_distance_rel",
)


def wandb_loggers(loggers: Iterable[Logger]) -> list[WandbLogger]:
    """The ``WandbLogger`` instances among ``loggers``."""
    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def log_config(loggers: Iterable[Logger], config: Mapping[str, Any]) -> None:
    """Record ``config`` as the run's hyperparameters (``wandb.config`` for a ``WandbLogger``).

    Called when a command starts, so the configuration is in the run (for an offline W&B run:
    in its transaction log on disk) before any work that could crash.

    Args:
        loggers: the trainer's loggers.
        config: plain values (nested dicts allowed); never raw ids of deleted data.
    """
    for logger in loggers:
        logger.log_hyperparams(dict(config))


def define_request_axis(loggers: Iterable[Logger]) -> None:
    """Plot every ``unlearn/*`` metric against the request index ``unlearn/request`` in W&B.

    A stream of deletions then reads as a time series (drift of utility and cost per request)
    rather than against the trainer's global step. Loggers other than W&B need nothing.
    """
    for logger in wandb_loggers(loggers):
        run = logger.experiment
        run.define_metric("unlearn/request")
        run.define_metric("unlearn/*", step_metric="unlearn/request")


def headline_completeness(result: Mapping[str, Any]) -> str:
    """The completeness figure to read first for this comparison's kind of deletion.

    ``gap_closed_rank`` (the rank gap of the deleted rows closed) in general; for whole-user
    deletions ``gap_closed_item_rank``, because a deleted user's own scores are seed noise and
    what matters is what their data did to the items (see DESIGN.md).

    Example:
        >>> headline_completeness({"deletion": {"kind": "users"}})
        'gap_closed_item_rank'
    """
    return "gap_closed_item_rank" if result["deletion"]["kind"] == "users" else "gap_closed_rank"


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def comparison_rows(result: Mapping[str, Any]) -> list[list[Any]]:
    """The comparison as rows of :data:`COMPARISON_COLUMNS` (non-finite values become ``None``).

    Args:
        result: the ``compare.json`` document.
    """
    headline = headline_completeness(result)
    rows = []
    for method in result["methods"]:
        figures = {**method["utility"], **method["completeness"], "seconds": method["seconds"],
                   "precompute_seconds": method["precompute_seconds"], "speedup_vs_retrain": method["speedup_vs_retrain"],
                   "completeness": method["completeness"].get(headline)}
        rows.append([method["name"], *(_finite(figures.get(column)) for column in COMPARISON_COLUMNS[1:])])
    return rows


def method_metrics(method: Mapping[str, Any]) -> dict[str, float]:
    """Flat numeric metrics of one method's comparison entry (``seconds``, utility, completeness)."""
    values = {"seconds": method["seconds"], "precompute_seconds": method.get("precompute_seconds", 0.0),
              **method["utility"], **method.get("completeness", {})}
    if "speedup_vs_retrain" in method:
        values["speedup_vs_retrain"] = method["speedup_vs_retrain"]
    return {k: float(v) for k, v in values.items() if _finite(v) is not None}


def log_method_result(loggers: Iterable[Logger], method: Mapping[str, Any]) -> None:
    """Log one method's figures as ``compare/<method>/<metric>`` as soon as they are known.

    Args:
        loggers: the trainer's loggers.
        method: an entry of ``compare.json``'s ``methods`` (utility may come before completeness).
    """
    metrics = {f"compare/{method['name']}/{k}": v for k, v in method_metrics(method).items()}
    for logger in loggers:
        logger.log_metrics(metrics)


def log_comparison(loggers: Iterable[Logger], result: Mapping[str, Any]) -> None:
    """Log a finished comparison: per-method metrics, and in W&B a table with native charts.

    Every logger receives ``compare/<method>/<metric>`` for every method. A ``WandbLogger``
    also receives ``compare/table`` (a ``wandb.Table`` of :data:`COMPARISON_COLUMNS`), charts
    built from it (``wandb.plot.scatter`` of utility and of completeness against seconds,
    ``wandb.plot.bar`` of seconds, utility and completeness per method), and the headline figures
    in the run summary, so that the trade-off is a picture in the W&B workspace.

    Args:
        loggers: the trainer's loggers.
        result: the ``compare.json`` document.
    """
    for method in result["methods"]:
        log_method_result(loggers, method)
    targets = wandb_loggers(loggers)
    if not targets:
        return
    import wandb

    headline = headline_completeness(result)
    rows = comparison_rows(result)
    for logger in targets:
        table = wandb.Table(columns=list(COMPARISON_COLUMNS), data=rows)
        what = f"{result['deletion']['kind']} deletion, {result['deletion']['rows']} rows"
        logger.experiment.log({
            "compare/table": table,
            "compare/chart/recall_vs_seconds": wandb.plot.scatter(
                table, "seconds", "recall@20", title=f"Recall@20 vs unlearning seconds ({what})"),
            "compare/chart/completeness_vs_seconds": wandb.plot.scatter(
                table, "seconds", "completeness", title=f"Completeness ({headline}) vs unlearning seconds ({what})"),
            "compare/chart/seconds": wandb.plot.bar(table, "method", "seconds", title="Unlearning seconds per method"),
            "compare/chart/recall": wandb.plot.bar(table, "method", "recall@20", title="Recall@20 per method"),
            "compare/chart/completeness": wandb.plot.bar(
                table, "method", "completeness", title=f"Completeness ({headline}; 1 = Retrain) per method"),
        })
        original = result["original"]
        logger.experiment.summary.update({
            "compare/headline_completeness": headline,
            "compare/original/recall@20": _finite(original["utility"].get("recall@20")),
            "compare/original/grad_norm": _finite(original["grad_norm"]),
            "compare/original/fit_seconds": _finite(original["fit_seconds"]),
        })


def check_artifact_logging(loggers: Sequence[Logger], option: str = "log_artifacts") -> None:
    """Refuse artifact logging where it cannot work, naming the options to change.

    Artifacts of an offline run are staged (copied) on disk and uploaded by ``wandb sync``.

    Args:
        loggers: the trainer's loggers.
        option: the option's name, for the message.

    Raises:
        ValueError: no ``WandbLogger`` is configured, or W&B is disabled (``WANDB_MODE=disabled``
            or ``mode: disabled``), so the artifacts would be recorded nowhere.
    """
    targets = wandb_loggers(loggers)
    if not targets:
        kinds = [type(logger).__name__ for logger in loggers] or ["no logger"]
        raise ValueError(
            f"`{option}=true` logs W&B artifacts and needs `trainer.logger` to be a "
            f"pytorch_lightning.loggers.WandbLogger; got {', '.join(kinds)}. Set `--trainer.logger` to a WandbLogger "
            f"(offline runs are fine: `wandb sync` uploads their artifacts later) or set `{option}=false`."
        )
    for logger in targets:
        if getattr(logger.experiment, "disabled", False):
            raise ValueError(
                f"`{option}=true` but W&B is disabled (WANDB_MODE or `trainer.logger.init_args.mode` is 'disabled'), "
                f"so no artifact would be recorded. Use mode 'offline' (upload later with `wandb sync`) or 'online', "
                f"or set `{option}=false`."
            )


def log_unlearning_artifacts(
    loggers: Iterable[Logger],
    checkpoints: Sequence[str | os.PathLike],
    journal: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
) -> list[str]:
    """Log unlearned checkpoints (type ``unlearned-model``) and the journal (``unlearning-journal``).

    Files are copied into W&B's staging area when logged, so an offline run keeps exactly
    these bytes until ``wandb sync`` uploads them, even if the journal grows meanwhile.

    Args:
        loggers: the trainer's loggers (only ``WandbLogger`` ones receive artifacts).
        checkpoints: the unlearned checkpoints to log (one artifact holding them all).
        journal: the journal file.
        metadata: plain values attached to both artifacts (counts, digests; never raw ids).

    Returns:
        The names of the artifacts logged.

    Raises:
        FileNotFoundError: a checkpoint or the journal does not exist (names the path).
    """
    paths = [Path(p) for p in checkpoints]
    for path in [*paths, Path(journal)]:
        if not path.is_file():
            raise FileNotFoundError(f"cannot log artifact file {path}: it does not exist.")
    import wandb

    names = []
    for logger in wandb_loggers(loggers):
        run = logger.experiment
        model = wandb.Artifact(f"unlearned-model-{run.id}", type="unlearned-model", metadata=dict(metadata or {}))
        for path in paths:
            model.add_file(str(path), name=path.name, policy="mutable")
        record = wandb.Artifact(f"unlearning-journal-{run.id}", type="unlearning-journal", metadata=dict(metadata or {}))
        record.add_file(str(journal), name=Path(journal).name, policy="mutable")
        for artifact in (model, record):
            if artifact.manifest.entries:
                run.log_artifact(artifact)
                names.append(artifact.name)
    return names


def wandb_run_lines(loggers: Iterable[Logger]) -> list[str]:
    """Where each W&B run of ``loggers`` was written and how to upload it (offline runs).

    Example output::

        [wandb] offline run written to runs/x/wandb/offline-run-20260101_000000-abc123
        [wandb] upload it with: wandb sync runs/x/wandb/offline-run-20260101_000000-abc123
    """
    lines = []
    for logger in wandb_loggers(loggers):
        run = logger.experiment
        if getattr(run, "disabled", False):
            continue
        folder = Path(run.settings.sync_dir)
        try:
            folder = folder.relative_to(Path.cwd())
        except ValueError:
            pass
        if run.offline:
            lines.append(f"[wandb] offline run written to {folder}")
            lines.append(f"[wandb] upload it with: wandb sync {folder}   (after `wandb login`)")
        else:
            lines.append(f"[wandb] run {run.url} (local copy in {folder})")
    return lines
