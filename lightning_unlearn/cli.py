"""The ``lightning-unlearn`` command: ``fit``, ``validate``, ``test``, ``unlearn`` and ``compare``."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import WandbLogger

from lightning_unlearn.data.datamodule import RecDataModule
from lightning_unlearn.data.download import DataNotFoundError
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.unlearning.callback import UnlearningCallback
from lightning_unlearn.unlearning.compare import compare, format_table, write_outputs
from lightning_unlearn.unlearning.deletion import DeletionSpec
from lightning_unlearn.unlearning.methods import FineTune, Retrain, Unlearner
from lightning_unlearn.unlearning.recipe import FitRecipe
from lightning_unlearn.unlearning.record import adopt_key, restore_checkpoint
from lightning_unlearn.unlearning.reporting import (
    check_artifact_logging,
    log_comparison,
    log_config,
    log_unlearning_artifacts,
    wandb_run_lines,
)

__all__ = ["LightningUnlearnCLI", "UnlearningTrainer", "main"]


class UnlearningTrainer(pl.Trainer):
    """A ``Trainer`` with two more entry points, exposed as CLI subcommands: ``unlearn`` and ``compare``."""

    def unlearn(
        self,
        model: Recommender,
        datamodule: RecDataModule,
        ckpt_path: str,
        requests: str,
        method: Unlearner,
        out: str | None = None,
        missing: Literal["error", "ignore"] = "error",
        branch: bool = False,
        log_artifacts: bool = False,
    ) -> list[dict[str, Any]]:
        """Load a trained checkpoint, apply the requests with a method, evaluate, log, save.

        The request's counts and digest (never its ids) go into the loggers' hyperparameters
        (``wandb.config``) as ``deletion_applied`` before the method runs; per-request metrics
        are logged with the request index as their W&B x-axis.

        Args:
            model: the recommender (weights come from ``ckpt_path``).
            datamodule: its datamodule.
            ckpt_path: a checkpoint of the trained (or already partly unlearned) model.
            requests: a requests file (CSV or JSON lines) in raw ids.
            method: the unlearning method, e.g. ``FineTune`` or ``Retrain``.
            out: folder for the unlearned checkpoints and the journal (default: ``<run dir>/unlearning``).
            missing: ``"error"`` refuses pairs that are not training rows, ``"ignore"`` drops them.
            branch: ``ckpt_path`` is a checkpoint of another unlearning folder and ``out`` (a new,
                empty folder) starts a new branch from it; that folder's key is copied along, so
                the requests it applied are still recognised.
            log_artifacts: also log the unlearned checkpoints (W&B artifact type ``unlearned-model``)
                and the journal (``unlearning-journal``); needs a ``WandbLogger`` (offline runs
                upload them at ``wandb sync``).

        Returns:
            One report per request applied (as plain dicts).

        Every check that can refuse the command -- the checkpoint, the requests file, the
        request against the data, the folder's latest state -- runs before any logger starts a
        run, so a refusal (whose message may name ids) never reaches the loggers' files.

        Raises:
            ValueError: ``log_artifacts`` without a W&B logger, or with W&B disabled.
            InvalidDeletionRequest: the request is invalid for this data (nothing changed).
            StaleCheckpoint: ``ckpt_path`` is not the latest state of ``out`` (see ``docs/journal.rst``).
        """
        if log_artifacts:
            check_artifact_logging(self.loggers)  # before any work: a refused option changes nothing
        dirpath = Path(out) if out else Path(self._run_dir()) / "unlearning"
        if branch:
            adopt_key(Path(ckpt_path).parent, dirpath)
        state = restore_checkpoint(ckpt_path, model, datamodule)
        callback = UnlearningCallback(method, requests_file=requests, dirpath=dirpath, missing=missing, branch=branch)
        if state.get("unlearning"):
            callback.load_state_dict(state["unlearning"])
        callback.read_requests_file()
        summaries = callback.check(datamodule)
        log_config(self.loggers, {"deletion_applied": summaries[-1] if summaries else {"num_rows": 0}})
        device = self.strategy.root_device
        model.to(device)
        reports = callback.apply_pending(
            model, datamodule, loggers=self.loggers, device=device, recipe=FitRecipe.from_trainer(self), seed=callback.seed
        )
        for report in reports:
            print(f"[unlearn] {report.method}: {report.rows_removed} rows removed in {report.seconds:.3f} s")
        print(f"[unlearn] journal: {callback.journal.path}")
        if log_artifacts and reports:
            journal = callback.journal
            applied = [e for e in journal if e["status"] == "applied"][-len(reports):]
            metadata = {"requests": [{k: v for k, v in e.items() if k != "checkpoint"} for e in applied]}
            names = log_unlearning_artifacts(self.loggers, [journal.checkpoint(e) for e in applied], journal.path, metadata)
            print(f"[unlearn] W&B artifacts: {', '.join(names)}")
        return [r.as_dict() for r in reports]

    def compare(
        self,
        model: Recommender,
        datamodule: RecDataModule,
        methods: list[Unlearner] | None = None,
        deletion: DeletionSpec = DeletionSpec(),
        ckpt_path: str | None = None,
        out: str | None = None,
        k: int = 20,
    ) -> dict[str, Any]:
        """Train (or load) the original, delete, run every method, print and write the comparison.

        Args:
            model: the recommender to train (or load from ``ckpt_path``).
            datamodule: its datamodule.
            methods: the methods (default: ``Retrain``, ``Retrain(seed=seed+1)``, ``FineTune``);
                ``Retrain()`` from the original's seed is always the reference.
            deletion: what to delete.
            ckpt_path: a trained checkpoint to start from instead of training.
            out: folder for ``compare.json`` and ``compare.csv`` (default: the run directory).
            k: top-K cut-off of the completeness figures.

        Every method's figures are logged as ``compare/<method>/<metric>``; a ``WandbLogger``
        also gets the comparison as a ``wandb.Table`` with native charts (utility and
        completeness against seconds, bars per method), see
        :func:`~lightning_unlearn.unlearning.reporting.log_comparison`.

        Returns:
            The ``compare.json`` document.
        """
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        fit_seconds = float("nan")
        if ckpt_path:
            restore_checkpoint(ckpt_path, model, datamodule)
        else:
            start = time.perf_counter()
            self.fit(model, datamodule)
            fit_seconds = time.perf_counter() - start
            best = getattr(self.checkpoint_callback, "best_model_path", "")
            if best:
                model.load_state_dict(torch.load(best, map_location=model.device, weights_only=True)["state_dict"])
        methods = methods if methods is not None else [Retrain(), Retrain(seed=seed + 1), FineTune()]
        model.to(self.strategy.root_device)
        result = compare(model, datamodule, methods, deletion, FitRecipe.from_trainer(self), seed=seed,
                         fit_seconds=fit_seconds, device=self.strategy.root_device, k=k, loggers=self.loggers)
        json_path, _ = write_outputs(result, out or self._run_dir())
        print(format_table(result))
        print(f"[compare] wrote {json_path} and compare.csv")
        log_comparison(self.loggers, result)
        return result

    def _run_dir(self) -> str:
        return self.log_dir or self.default_root_dir


class LightningUnlearnCLI(LightningCLI):
    """LightningCLI for recommenders: dataset sizes are linked into the model, ``fit`` ends with
    a test of the best checkpoint, and ``unlearn``/``compare`` come from :class:`UnlearningTrainer`.

    Every command records the fully resolved configuration in its loggers' hyperparameters
    (``wandb.config``) before it starts working, so an offline W&B run holds it even if the
    command crashes. W&B does not capture the console (``WANDB_CONSOLE=off`` unless set): an
    error about a deletion request names its ids, and they must not reach the run's files. A
    ``WandbLogger`` without ``group`` is grouped by recipe (``ml100k/compare_mf``
    for ``recipes/ml100k/compare_mf.yaml``) and gets the command as its ``job_type``; when the
    command ends, the run is finished and its folder and ``wandb sync`` command are printed.

    Example (shell)::

        lightning-unlearn fit -c recipes/ml100k/mf.yaml --trainer.max_epochs=5
        lightning-unlearn compare -c recipes/ml100k/compare_mf.yaml
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "unlearn": {"model", "datamodule"}, "compare": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_users", "model.init_args.num_users", apply_on="instantiate")
        parser.link_arguments("data.num_items", "model.init_args.num_items", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if _wandb_logger_configs(config):
            # W&B would copy the console into the run's files (output.log, the .wandb log), and an
            # error about a deletion request names its ids: keep the console out (WANDB_CONSOLE=wrap opts in).
            os.environ.setdefault("WANDB_CONSOLE", "off")
        for logger in _wandb_logger_configs(config):
            args = logger.init_args
            if args.get("offline") and args.get("log_model"):
                self.parser.error(
                    f"trainer.logger.init_args.log_model={args.log_model!r} cannot work with "
                    "trainer.logger.init_args.offline=true: WandbLogger logs checkpoints only from online runs. "
                    "Set `--trainer.logger.init_args.log_model=false` (to keep unlearned "
                    "checkpoints and the journal in an offline run, use `unlearn --log_artifacts=true`; `wandb sync` "
                    "uploads them) or `--trainer.logger.init_args.offline=false`."
                )
            if args.get("group") is None:
                args.group = _recipe_name(config)
            if args.get("job_type") is None and self.subcommand:
                args.job_type = self.subcommand

    def after_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        try:
            dumped = self.parser.dump(self.config, skip_unset=False, skip_link_targets=False)
        except TypeError:  # jsonargparse < 4.49 calls it skip_none
            dumped = self.parser.dump(self.config, skip_none=False, skip_link_targets=False)
        config = yaml.safe_load(dumped)[self.subcommand]
        init_args = (config.get("model") or {}).get("init_args")
        if isinstance(init_args, dict):  # linked on instantiation: known only now
            init_args.update(num_users=self.datamodule.num_users, num_items=self.datamodule.num_items)
        log_config(self.trainer.loggers, config)
        # `config` holds the model's and the datamodule's arguments (under `model.init_args` and
        # `data`): Lightning would log their `save_hyperparameters` again, flat at the top level
        # (where the model's `optimizer` overwrote the CLI's own `optimizer` entry).
        for module in (self.model, self.datamodule):
            if module is not None:
                module._log_hyperparams = False

    def after_fit(self) -> None:
        if not self.trainer.interrupted:
            checkpoint = self.trainer.checkpoint_callback
            best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)
        self._finish_wandb()

    def after_validate(self) -> None:
        self._finish_wandb()

    def after_test(self) -> None:
        self._finish_wandb()

    def after_unlearn(self) -> None:
        self._finish_wandb()

    def after_compare(self) -> None:
        self._finish_wandb()

    def _finish_wandb(self) -> None:
        """Say where each W&B run was written (and how to upload an offline one), then finish it."""
        if not self.trainer.is_global_zero:
            return
        for line in wandb_run_lines(self.trainer.loggers):
            print(line)
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.finish()


def _wandb_logger_configs(config: Any) -> list[Any]:
    """The ``trainer.logger`` entries of a parsed config that are ``WandbLogger``s."""
    trainer = config.get("trainer") if config is not None else None
    loggers = trainer.get("logger") if trainer is not None else None
    loggers = loggers if isinstance(loggers, list) else [loggers]
    return [entry for entry in loggers
            if hasattr(entry, "get") and str(entry.get("class_path", "")).endswith("WandbLogger") and entry.get("init_args")]


def _recipe_name(config: Any) -> str | None:
    """``<folder>/<stem>`` of the last recipe file given with ``-c`` (``None`` without one)."""
    files = config.get("config") or []
    if not files:
        return None
    path = Path(str(files[-1]))
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-unlearn`` console script.

    A missing data set ends the command with the error's message (where it looked, how to point
    the library at data) and exit status 2, instead of a traceback.

    The command flushes denormal floats to zero (``torch.set_flush_denormal``): weights that an L2
    term drives towards zero (e.g. a NeuMF branch the data stops using) reach the denormal range,
    where CPU arithmetic is many times slower; on MovieLens-1M one NeuMF validation pass took
    530 s instead of 31 s.

    Args:
        args: command-line arguments (default: ``sys.argv[1:]``).

    Raises:
        SystemExit: on invalid arguments, or (status 2) when the data set is not found.
    """
    from lightning_unlearn.recipes_cli import console_args

    args = console_args(args)  # `recipes list|copy` ends here; `-c ml100k/mf` becomes the shipped recipe's path
    torch.set_flush_denormal(True)
    try:
        LightningUnlearnCLI(
            Recommender,
            RecDataModule,
            trainer_class=UnlearningTrainer,
            subclass_mode_model=True,
            args=args,
            save_config_kwargs={"overwrite": True},
        )
    except DataNotFoundError as err:
        print(f"lightning-unlearn: {err}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":  # pragma: no cover
    main()
