"""The ``lightning-unlearn`` command: ``fit``, ``validate``, ``test``, ``unlearn`` and ``compare``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from lightning_unlearn.data.datamodule import RecDataModule
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.unlearning.callback import UnlearningCallback
from lightning_unlearn.unlearning.compare import compare, format_table, write_outputs
from lightning_unlearn.unlearning.deletion import DeletionSpec
from lightning_unlearn.unlearning.methods import FineTune, Retrain, Unlearner
from lightning_unlearn.unlearning.recipe import FitRecipe

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
    ) -> list[dict[str, Any]]:
        """Load a trained checkpoint, apply the requests with a method, evaluate, log, save.

        Args:
            model: the recommender (weights come from ``ckpt_path``).
            datamodule: its datamodule.
            ckpt_path: a checkpoint of the trained (or already partly unlearned) model.
            requests: a requests file (CSV or JSON lines) in raw ids.
            method: the unlearning method, e.g. ``FineTune`` or ``Retrain``.
            out: folder for the unlearned checkpoints and the journal (default: ``<run dir>/unlearning``).
            missing: ``"error"`` refuses pairs that are not training rows, ``"ignore"`` drops them.

        Returns:
            One report per request applied (as plain dicts).
        """
        state = _load_checkpoint(ckpt_path, model, datamodule)
        callback = UnlearningCallback(method, requests_file=requests, dirpath=out or Path(self._run_dir()) / "unlearning", missing=missing)
        if state.get("unlearning"):
            callback.load_state_dict(state["unlearning"])
        callback.read_requests_file()
        device = self.strategy.root_device
        model.to(device)
        reports = callback.apply_pending(
            model, datamodule, loggers=self.loggers, device=device, recipe=FitRecipe.from_trainer(self), seed=callback.seed
        )
        for report in reports:
            print(f"[unlearn] {report.method}: {report.rows_removed} rows removed in {report.seconds:.3f} s")
        print(f"[unlearn] journal: {callback.journal.path}")
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

        Returns:
            The ``compare.json`` document.
        """
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        fit_seconds = float("nan")
        if ckpt_path:
            _load_checkpoint(ckpt_path, model, datamodule)
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
                         fit_seconds=fit_seconds, device=self.strategy.root_device, k=k)
        json_path, _ = write_outputs(result, out or self._run_dir())
        print(format_table(result))
        print(f"[compare] wrote {json_path} and compare.csv")
        for method in result["methods"]:
            metrics = {"seconds": method["seconds"], "speedup_vs_retrain": method["speedup_vs_retrain"],
                       **method["utility"], **method["completeness"]}
            for logger in self.loggers:
                logger.log_metrics({f"compare/{method['name']}/{k}": float(v) for k, v in metrics.items()})
        return result

    def _run_dir(self) -> str:
        return self.log_dir or self.default_root_dir


def _load_checkpoint(path: str, model: Recommender, datamodule: RecDataModule) -> dict[str, Any]:
    """Load weights into ``model`` and re-apply recorded removals to ``datamodule``.

    Reads Lightning checkpoints and the callback's unlearned checkpoints alike (``weights_only``).
    A checkpoint recorded on other data than ``datamodule`` loads raises
    :class:`~lightning_unlearn.data.datamodule.DataFingerprintMismatch` before the model or the
    data change.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    removals = state.get("datamodule_state") or state.get(type(datamodule).__qualname__)
    datamodule.check_state_dict(removals)
    model.load_state_dict(state["state_dict"])
    if removals:
        datamodule.load_state_dict(removals)
    datamodule.setup()
    model.set_graph(datamodule.train)
    if "unlearning" not in state:
        callbacks = state.get("callbacks", {})
        state["unlearning"] = next((v for k, v in callbacks.items() if k.startswith("UnlearningCallback")), None)
    return state


class LightningUnlearnCLI(LightningCLI):
    """LightningCLI for recommenders: dataset sizes are linked into the model, ``fit`` ends with
    a test of the best checkpoint, and ``unlearn``/``compare`` come from :class:`UnlearningTrainer`.

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

    def after_fit(self) -> None:
        if self.trainer.interrupted:
            return
        checkpoint = self.trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-unlearn`` console script.

    Args:
        args: command-line arguments (default: ``sys.argv[1:]``).
    """
    LightningUnlearnCLI(
        Recommender,
        RecDataModule,
        trainer_class=UnlearningTrainer,
        subclass_mode_model=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":  # pragma: no cover
    main()
