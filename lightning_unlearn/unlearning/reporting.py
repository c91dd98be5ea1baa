"""Reporting to the run's loggers, W&B first: the resolved config, comparisons, time series, artifacts.

Everything here goes through Lightning's ``Logger`` objects (``trainer.loggers``); what only W&B
can show (tables, summaries, custom charts, metric axes, artifacts) is added when a
``WandbLogger`` is among them. ``wandb`` (and ``matplotlib``, for :func:`plot_comparison`) is
imported inside the functions that need it, never when this module loads.

Nothing logged here carries a raw id of deleted data: deletions appear as counts and a digest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import Logger, WandbLogger

from lightning_unlearn.unlearning.request import InvalidDeletionRequest

__all__ = [
    "CHART_SPECS",
    "COMPARISON_COLUMNS",
    "comparison_columns",
    "check_artifact_logging",
    "comparison_charts",
    "comparison_rows",
    "define_request_axis",
    "ids_kept_out_of",
    "headline_completeness",
    "log_comparison",
    "log_config",
    "log_method_result",
    "log_unlearning_artifacts",
    "plot_comparison",
    "wandb_loggers",
    "wandb_run_lines",
]

def comparison_columns(k: int = 20) -> tuple[str, ...]:
    """Columns of the comparison table logged to W&B (one row per method), the top-``k`` ones at ``compare``'s ``k``;
    ``completeness`` is the headline figure of :func:`headline_completeness`.

    Example:
        >>> comparison_columns(10)[10:14]
        ('gap_closed_top10', 'gap_closed_mia', 'overlap@10', 'overlap@10_affected')
    """
    return ("method", "seconds", "precompute_seconds", "speedup_vs_retrain", "recall@20", "ndcg@20", "auc", "completeness",
            "gap_closed_rank", "gap_closed_score", f"gap_closed_top{k}", "gap_closed_mia", f"overlap@{k}", f"overlap@{k}_affected",
            "param_distance_rel")


#: :func:`comparison_columns` at the default ``k = 20``.
COMPARISON_COLUMNS = comparison_columns()


def wandb_loggers(loggers: Iterable[Logger]) -> list[WandbLogger]:
    """The ``WandbLogger`` instances among ``loggers``."""
    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def captures_console(loggers: Iterable[Logger]) -> bool:
    """Whether a W&B run of ``loggers`` records the console (``output.log`` and the ``.wandb`` log), so a message printed now is stored.

    Not for a disabled run, nor with ``console="off"`` (``WANDB_CONSOLE=off``, as the lightning-unlearn command sets it).
    """
    for logger in wandb_loggers(loggers):
        run = logger.experiment
        if not getattr(run, "disabled", False) and getattr(getattr(run, "settings", None), "console", None) != "off":
            return True
    return False


@contextlib.contextmanager
def ids_kept_out_of(loggers: Sequence[Logger]):
    """Where a W&B run of ``loggers`` records the console, a refused request's message (it names ids) is not raised as is.

    The refusal is raised again without the ids; ``detail`` holds the original message, and
    :meth:`~lightning_unlearn.unlearning.callback.UnlearningCallback.check` without such a
    logger shows it.

    Args:
        loggers: the loggers whose W&B runs may record the console.

    Raises:
        InvalidDeletionRequest: the refusal, without its ids where a run records the console.

    Example:
        >>> with ids_kept_out_of([]):  # no W&B run: the message as it is
        ...     raise InvalidDeletionRequest("unknown user id: 'alice'")
        Traceback (most recent call last):
        ...
        lightning_unlearn.unlearning.request.InvalidDeletionRequest: unknown user id: 'alice'
    """
    try:
        yield
    except InvalidDeletionRequest as err:
        if not captures_console(loggers):
            raise
        redacted = InvalidDeletionRequest(
            "A deletion request was refused. Its message names ids and is not shown here: a W&B run of these loggers "
            "records the console. Read it from the exception's `detail`, or with `callback.check(datamodule)` where no "
            "such run is live, or run with WANDB_CONSOLE=off, as the lightning-unlearn command does."
        )
        redacted.detail = str(err)
        raise redacted from None


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


def is_measured(method: Mapping[str, Any]) -> bool:
    """Whether a method's entry of a ``compare.json`` document was measured (``status: "ok"``); a failed one has no figures."""
    return method.get("status", "ok") == "ok"


def measured(result: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The methods of a ``compare.json`` document that were measured, in order."""
    return [method for method in result["methods"] if is_measured(method)]


def comparison_rows(result: Mapping[str, Any]) -> list[list[Any]]:
    """The comparison as rows of :func:`comparison_columns` at its ``k`` (non-finite values become ``None``), one per measured method.

    Args:
        result: the ``compare.json`` document.
    """
    headline = headline_completeness(result)
    rows = []
    for method in measured(result):
        figures = {**method["utility"], **method["completeness"], "seconds": method["seconds"],
                   "precompute_seconds": method["precompute_seconds"], "speedup_vs_retrain": method["speedup_vs_retrain"],
                   "completeness": method["completeness"].get(headline)}
        rows.append([method["name"], *(_finite(figures.get(column)) for column in comparison_columns(result.get("k", 20))[1:])])
    return rows


def method_metrics(method: Mapping[str, Any]) -> dict[str, float]:
    """Flat numeric metrics of one method's comparison entry (``seconds``, utility, completeness)."""
    values = {"seconds": method["seconds"], "precompute_seconds": method.get("precompute_seconds", 0.0),
              **method["utility"], **method.get("completeness", {})}
    if "speedup_vs_retrain" in method:
        values["speedup_vs_retrain"] = method["speedup_vs_retrain"]
    return {k: float(v) for k, v in values.items() if _finite(v) is not None}


def log_method_result(loggers: Iterable[Logger], method: Mapping[str, Any], step: int | None = None) -> None:
    """Record one method's figures as ``compare/<method>/<metric>`` as soon as they are known.

    A ``WandbLogger`` gets them in the run **summary** (one value per key), not as history: a
    method's seconds are one number, not a series, and history would make each key a
    single-point line panel in the workspace. Any other logger (CSV, TensorBoard) gets them as
    metrics at ``step``, the method's position in the comparison (1, 2, ...), and is saved at
    once, so its files hold what was done even if a later method crashes.

    Args:
        loggers: the trainer's loggers.
        method: an entry of ``compare.json``'s ``methods`` (utility may come before completeness).
        step: the method's position in the comparison, for loggers other than W&B.
    """
    metrics = {f"compare/{method['name']}/{k}": v for k, v in method_metrics(method).items()}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(metrics)
        else:
            logger.log_metrics(metrics, step=step)
            logger.save()


# ---------------------------------------------------------------------- comparison charts
def _log_x_scatter() -> dict[str, Any]:
    text = {"field": "${field:label}", "type": "nominal"}
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v4.json",
        "description": "lightning_unlearn: one labelled point per method, x on a log scale",
        "title": "${string:title}",
        "data": {"name": "wandb"},
        "transform": [{"filter": "isValid(datum['${field:x}']) && datum['${field:x}'] > 0 && isValid(datum['${field:y}'])"}],
        "encoding": {
            "x": {"field": "${field:x}", "type": "quantitative", "scale": {"type": "log"}, "title": "${string:x-axis-title}"},
            "y": {"field": "${field:y}", "type": "quantitative", "scale": {"zero": False}, "title": "${string:y-axis-title}"},
            "color": {**text, "title": "method"},
            "tooltip": [text, {"field": "name", "type": "nominal", "title": "run"},
                        {"field": "${field:x}", "type": "quantitative"}, {"field": "${field:y}", "type": "quantitative"}],
        },
        "layer": [
            {"mark": {"type": "point", "filled": True, "size": 90}},
            {"mark": {"type": "text", "align": "left", "dx": 7, "dy": -7}, "encoding": {"text": text}},
        ],
    }


def _log_x_dots() -> dict[str, Any]:
    label = {"field": "${field:label}", "type": "nominal"}
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v4.json",
        "description": "lightning_unlearn: one labelled dot per method, the value on a log scale",
        "title": "${string:title}",
        "data": {"name": "wandb"},
        "transform": [{"filter": "isValid(datum['${field:value}']) && datum['${field:value}'] > 0"}],
        "encoding": {
            "y": {**label, "title": None, "sort": None},
            "x": {"field": "${field:value}", "type": "quantitative", "scale": {"type": "log"}, "title": "${string:x-axis-title}"},
            "color": {**label, "legend": None},
            "tooltip": [label, {"field": "name", "type": "nominal", "title": "run"},
                        {"field": "${field:value}", "type": "quantitative"}],
        },
        "layer": [
            {"mark": {"type": "point", "filled": True, "size": 90}},
            {"mark": {"type": "text", "align": "left", "dx": 8},
             "encoding": {"text": {"field": "${field:value}", "type": "quantitative", "format": ".3g"}}},
        ],
    }


#: The Vega-Lite specs of the comparison's custom charts, with W&B's placeholders
#: (``${field:x}`` is the table column mapped to ``x``, ``${string:title}`` a string setting).
#: ``log_x_scatter`` takes fields ``x``, ``y`` and ``label`` (colour and text of each point);
#: ``log_x_dots`` takes ``label`` and ``value``. Both put the quantity on a log axis.
#:
#: :meta hide-value:
CHART_SPECS: dict[str, dict[str, Any]] = {"log_x_scatter": _log_x_scatter(), "log_x_dots": _log_x_dots()}

# W&B's built-in preset with the same field names, named as the panel's preset: the panel draws
# our spec (``customPanelDef``) and would fall back on this one where a W&B version ignored it.
_STOCK_PRESETS = {"log_x_scatter": "wandb/scatter/v0", "log_x_dots": "wandb/bar/v0"}


@functools.cache
def _inline_spec_type() -> type:
    """A ``CustomChartSpec`` whose panel config also carries its own Vega-Lite spec."""
    from wandb.plot.custom_chart import CustomChartSpec

    @dataclasses.dataclass
    class InlineChartSpec(CustomChartSpec):
        panel_def: dict = dataclasses.field(default_factory=dict)

        @property
        def config_value(self) -> dict[str, Any]:
            value = super().config_value
            value["panel_config"]["customPanelDef"] = dict(self.panel_def)
            return value

    return InlineChartSpec


def _custom_chart(table: Any, spec: str, fields: dict[str, str], strings: dict[str, str]) -> Any:
    """``wandb.plot_table`` of ``table`` drawn by ``CHART_SPECS[spec]``, the spec carried in the panel's config."""
    import wandb

    chart = wandb.plot_table(_STOCK_PRESETS[spec], table, fields, strings)
    try:
        inline = _inline_spec_type()
    except ImportError:  # an older wandb without wandb.plot.custom_chart: the built-in preset alone
        return chart
    panel_def = {"name": f"lightning_unlearn/{spec}", "displayName": f"lightning_unlearn {spec}",
                 "description": CHART_SPECS[spec]["description"], "spec": json.dumps(CHART_SPECS[spec], indent=2)}
    values = {f.name: getattr(chart.spec, f.name) for f in dataclasses.fields(chart.spec)}
    chart.spec = inline(**values, panel_def=panel_def)
    return chart


def comparison_charts(table: Any, result: Mapping[str, Any]) -> dict[str, Any]:
    """The comparison's W&B charts, built from its ``compare/table`` (``wandb.Table``).

    Each method is a point or dot coloured and labelled by its name, and seconds and speed-ups
    are on log axes (Retrain's minutes and IFRU's fraction of a second both show):

    - ``compare/chart/gap_closed_vs_speedup``: headline completeness (1 = Retrain) against the
      speed-up over Retrain;
    - ``compare/chart/recall_vs_seconds``: Recall@20 against unlearning seconds;
    - ``compare/chart/seconds``: unlearning seconds per method;
    - ``compare/chart/completeness``: headline completeness per method (W&B's bar chart).

    Args:
        table: a ``wandb.Table`` with :func:`comparison_columns`.
        result: the ``compare.json`` document (for titles).
    """
    import wandb

    headline = headline_completeness(result)
    what = f"{result['deletion']['kind']} deletion, {result['deletion']['rows']} rows"
    return {
        "compare/chart/gap_closed_vs_speedup": _custom_chart(
            table, "log_x_scatter", {"x": "speedup_vs_retrain", "y": "completeness", "label": "method"},
            {"title": f"Gap closed vs speed-up over Retrain ({what})", "x-axis-title": "speed-up over Retrain (x, log scale)",
             "y-axis-title": f"{headline} (1 = Retrain)"}),
        "compare/chart/recall_vs_seconds": _custom_chart(
            table, "log_x_scatter", {"x": "seconds", "y": "recall@20", "label": "method"},
            {"title": f"Recall@20 vs unlearning seconds ({what})", "x-axis-title": "unlearning seconds (log scale)",
             "y-axis-title": "test Recall@20"}),
        "compare/chart/seconds": _custom_chart(
            table, "log_x_dots", {"label": "method", "value": "seconds"},
            {"title": "Unlearning seconds per method", "x-axis-title": "seconds (log scale)"}),
        "compare/chart/completeness": wandb.plot.bar(
            table, "method", "completeness", title=f"Completeness ({headline}; 1 = Retrain) per method"),
    }


def _save_chart_specs(run: Any) -> None:
    """Write :data:`CHART_SPECS` into the run's files (``charts/<name>.vl.json``), uploaded with the run."""
    folder = Path(run.dir) / "charts"
    folder.mkdir(parents=True, exist_ok=True)
    for name, spec in CHART_SPECS.items():
        (folder / f"{name}.vl.json").write_text(json.dumps(spec, indent=2) + "\n")
    run.save(str(folder / "*.vl.json"), base_path=run.dir, policy="now")


def log_comparison(loggers: Iterable[Logger], result: Mapping[str, Any]) -> None:
    """Log a finished comparison: every method's figures, and in W&B a table with charts.

    Every method's figures (seconds, utility, speed-up, completeness) go to each logger as in
    :func:`log_method_result`: the W&B run summary, or metrics at the method's position for
    other loggers. A ``WandbLogger`` also receives ``compare/table`` (a ``wandb.Table`` of
    :func:`comparison_columns`, one row per method), the charts of :func:`comparison_charts`
    (their Vega-Lite specs also saved as the run's files ``charts/*.vl.json``), and the
    original's figures and the headline figure's name in the summary.

    Args:
        loggers: the trainer's loggers.
        result: the ``compare.json`` document.
    """
    for index, method in enumerate(result["methods"], start=1):  # the position in the comparison, failed ones counted
        if is_measured(method):
            log_method_result(loggers, method, step=index)
    targets = wandb_loggers(loggers)
    if not targets:
        return
    import wandb

    rows = comparison_rows(result)
    for logger in targets:
        run = logger.experiment
        table = wandb.Table(columns=list(comparison_columns(result.get("k", 20))), data=rows)
        run.log({"compare/table": table, **comparison_charts(table, result)})
        if not getattr(run, "disabled", False):
            _save_chart_specs(run)
        original = result["original"]
        summary = {
            "compare/headline_completeness": headline_completeness(result),
            "compare/original/recall@20": _finite(original["utility"].get("recall@20")),
            "compare/original/grad_norm": _finite(original["grad_norm"]),
            "compare/original/fit_seconds": _finite(original["fit_seconds"]),  # none for an original loaded from --ckpt_path
        }
        run.summary.update({key: value for key, value in summary.items() if value is not None})  # as in the table: no figure, no key


def plot_comparison(result: Mapping[str, Any], path: str | os.PathLike | None = None) -> Any:
    """Draw the comparison's two W&B scatter charts with matplotlib, side by side in one figure.

    The same table as ``compare/table`` (:func:`comparison_rows`), the same choices as the W&B
    panels ``compare/chart/recall_vs_seconds`` and ``compare/chart/gap_closed_vs_speedup``: a
    point per method, coloured (in Vega's category-10 colours, by name, as W&B assigns them) and
    labelled by name, seconds and speed-up on log axes.

    Args:
        result: the ``compare.json`` document.
        path: where to write the image (its suffix chooses the format, e.g. ``.png``), if anywhere.

    Returns:
        The ``matplotlib.figure.Figure`` (made without pyplot, so nothing global changes).

    Raises:
        ImportError: matplotlib is not installed (``pip install matplotlib``, or the ``docs`` extra).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as err:
        raise ImportError("plot_comparison needs matplotlib: `pip install matplotlib` "
                          "(or `pip install lightning-unlearn[docs]`).") from err
    columns = {name: i for i, name in enumerate(comparison_columns(result.get("k", 20)))}
    rows = comparison_rows(result)
    headline = headline_completeness(result)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    order = sorted(row[0] for row in rows)
    colours = {name: palette[order.index(name) % len(palette)] for name in order}
    what = f"{result['deletion']['kind']} deletion, {result['deletion']['rows']} rows"

    figure = Figure(figsize=(11, 4.4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # no pyplot, so no global state; Agg writes PNG, and savefig picks others by suffix
    left, right = figure.subplots(1, 2)
    panels = [(left, "seconds", "recall@20", "Recall@20 vs unlearning seconds", "unlearning seconds (log scale)", "test Recall@20"),
              (right, "speedup_vs_retrain", "completeness", "Gap closed vs speed-up over Retrain",
               "speed-up over Retrain (x, log scale)", f"{headline} (1 = Retrain)")]
    for axes, x, y, title, x_title, y_title in panels:
        points = [(row[0], row[columns[x]], row[columns[y]]) for row in rows
                  if row[columns[x]] is not None and row[columns[x]] > 0 and row[columns[y]] is not None]
        for name, px, py in points:
            axes.scatter([px], [py], s=60, color=colours[name], zorder=3)
        axes.set_xscale("log")
        axes.set_title(title, fontsize=11)
        axes.set_xlabel(x_title)
        axes.set_ylabel(y_title)
        axes.grid(True, which="major", color="#e6e6e6", zorder=0)
        axes.margins(x=0.25, y=0.15)
        _label_points(figure, axes, points, colours)
    model = " on ".join(str(result[k]) for k in ("model", "dataset") if result.get(k))
    figure.suptitle(f"{model}: {what}" if model else what, fontsize=12)
    handles = [Line2D([], [], marker="o", linestyle="", markersize=8, color=colours[row[0]]) for row in rows]
    figure.legend(handles, [row[0] for row in rows], loc="outside lower center", ncol=min(len(rows), 5), frameon=False)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
    return figure


def _label_points(figure: Any, axes: Any, points: list[tuple[str, float, float]], colours: Mapping[str, str]) -> None:
    """Write each point's name beside it, moving a label down while it would overlap one already placed."""
    figure.canvas.draw()  # fixes the axes' limits, so that data maps to pixels
    placed: list[Any] = []
    renderer = figure.canvas.get_renderer()
    for name, x, y in sorted(points, key=lambda p: (-p[2], p[1])):
        offset = 6
        while True:
            label = axes.annotate(name, (x, y), xytext=(7, offset), textcoords="offset points", fontsize=9,
                                  color=colours[name], va="bottom")
            box = label.get_window_extent(renderer).expanded(1.02, 1.1)
            if not any(box.overlaps(other) for other in placed) or offset < -60:
                placed.append(box)
                break
            label.remove()
            offset -= 12


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
    """Log unlearned models (type ``unlearned-model``) and the journal (``unlearning-journal``).

    Files are copied into W&B's staging area when logged, so an offline run keeps exactly
    these bytes until ``wandb sync`` uploads them, even if the journal grows meanwhile. Each
    model is its checkpoint's weights and hyperparameters only (it loads with
    ``ModelClass.load_from_checkpoint``): the datamodule's removals and the callback's state,
    indices that anyone with the data set maps back to the deleted users, items and pairs, stay
    in the unlearning folder, and so does resuming (from the folder's checkpoint).

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
    with tempfile.TemporaryDirectory() as folder:
        models = [_weights_only(path, Path(folder)) for path in paths]
        for logger in wandb_loggers(loggers):
            run = logger.experiment
            model = wandb.Artifact(f"unlearned-model-{run.id}", type="unlearned-model", metadata=dict(metadata or {}))
            for path in models:
                model.add_file(str(path), name=path.name, policy="mutable")  # copied into the staging area now
            record = wandb.Artifact(f"unlearning-journal-{run.id}", type="unlearning-journal", metadata=dict(metadata or {}))
            record.add_file(str(journal), name=Path(journal).name, policy="mutable")
            for artifact in (model, record):
                if artifact.manifest.entries:
                    run.log_artifact(artifact)
                    names.append(artifact.name)
    return names


_MODEL_KEYS = ("pytorch-lightning_version", "epoch", "global_step", "state_dict", "hyper_parameters", "hparams_name")


def _weights_only(checkpoint: Path, folder: Path) -> Path:
    """A copy of ``checkpoint`` in ``folder`` with only what loading the model needs (no removals, no callback state)."""
    import torch

    kept = {k: v for k, v in torch.load(checkpoint, map_location="cpu", weights_only=True).items() if k in _MODEL_KEYS}
    torch.save(kept, folder / checkpoint.name)
    return folder / checkpoint.name


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
