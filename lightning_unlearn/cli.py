"""The ``lightning-unlearn`` command: ``fit``, ``validate``, ``test`` (and later ``unlearn``, ``compare``)."""

from __future__ import annotations

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from lightning_unlearn.data.datamodule import RecDataModule
from lightning_unlearn.models.base import Recommender

__all__ = ["LightningUnlearnCLI", "main"]


class LightningUnlearnCLI(LightningCLI):
    """LightningCLI for recommenders: dataset sizes are linked into the model, and ``fit``
    ends with a test of the best checkpoint so one command reports held-out quality.

    Example (shell)::

        lightning-unlearn fit -c recipes/ml100k/mf.yaml --trainer.max_epochs=5
    """

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
        subclass_mode_model=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":  # pragma: no cover
    main()
