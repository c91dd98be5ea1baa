"""What the ``lightning-unlearn`` console shows: help without reST markup, one paragraph for an
error in what the command was given (not a traceback), and no third-party noise."""

from __future__ import annotations

import argparse
import logging
import re
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, NoReturn

from jsonargparse import DefaultHelpFormatter
from pytorch_lightning.cli import LightningArgumentParser

from lightning_unlearn.data.datamodule import DataFingerprintMismatch
from lightning_unlearn.unlearning.compare import PartialResultsMismatch
from lightning_unlearn.unlearning.journal import FolderLocked, JournalCorrupted
from lightning_unlearn.unlearning.record import CheckpointUnreadable, MissingDataState, StaleCheckpoint
from lightning_unlearn.unlearning.request import InvalidDeletionRequest

__all__ = ["USER_ERRORS", "OptionRefused", "PlainHelpFormatter", "PlainHelpParser", "counted", "plain_text", "quiet_third_party_noise", "user_error_message"]


# ---------------------------------------------------------------------- help text without reST
_ROLE = re.compile(r":(?:py:)?(?P<role>[a-z]+):`(?P<tilde>~?)(?P<text>[^`<]*?)\s*(?:<(?P<target>[^>`]*)>)?`")


def plain_text(text: str) -> str:
    """Docstring text without its reST markup, for the command line's help.

    Example:
        >>> plain_text("see :class:`~lightning_unlearn.unlearning.methods.Retrain`, ``missing='ignore'`` and :doc:`journal`")
        "see Retrain, missing='ignore' and docs/journal.rst"
    """

    def role(match: re.Match) -> str:
        if match["target"] is not None and match["text"]:
            return match["text"]  # :meth:`title <target>`
        name = match["target"] if match["target"] is not None else match["text"]
        if match["role"] == "doc":
            return f"docs/{name}.rst"
        return name.rsplit(".", 1)[-1] if match["tilde"] else name

    text = _ROLE.sub(role, text)
    text = re.sub(r"``(.+?)``", r"\1", text, flags=re.S)
    text = re.sub(r"`([^`<]+?)\s*<([^>`]+)>`__?", r"\1 (\2)", text)  # `title <url>`_
    return re.sub(r"(?<![\w`])`([^`]+?)`(?![\w`])", r"\1", text)  # `interpreted text`


class PlainHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter, with the docstrings' reST markup taken out (:func:`plain_text`)."""

    def _expand_help(self, action: argparse.Action) -> str:
        return plain_text(super()._expand_help(action))

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))

    def start_section(self, heading: str | None) -> None:
        super().start_section(plain_text(heading) if heading else heading)


class PlainHelpParser(LightningArgumentParser):
    """The CLI's argument parser: help without reST markup (:class:`PlainHelpFormatter`), an unknown method named with
    the known ones, and no abbreviated options (``--trainer.max_epoch`` is a typo, refused, not ``max_epochs``)."""

    def __init__(self, *args: Any, formatter_class: type[argparse.HelpFormatter] = PlainHelpFormatter, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if re.search(r'key "methods?"', message) and "Expected a dot import path string" in message:
            message += f"\n  Methods by name: {', '.join(METHOD_NAMES)} (their case as written), or a class path."
        super().error(message, ex)


METHOD_NAMES = ("Retrain", "FineTune", "IFRU", "AltEraser", "SCIF")
"""The unlearning methods ``--method`` and ``methods`` take by name."""


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, in the plural unless ``n`` is 1.

    Example:
        >>> counted(1, "deletion"), counted(3, "deletion")
        ('1 deletion', '3 deletions')
    """
    return f"{n} {noun}{'' if n == 1 else 's'}"


class OptionRefused(ValueError):
    """A command-line option the command cannot use as given (the message names it and what is accepted)."""


USER_ERRORS = (InvalidDeletionRequest, StaleCheckpoint, JournalCorrupted, FolderLocked, DataFingerprintMismatch,
               CheckpointUnreadable, MissingDataState, FileNotFoundError, PartialResultsMismatch, OptionRefused)
"""Errors in what the command was given (a request, a checkpoint, a folder): a message, not a traceback."""

_MISSING_OPTION = {
    "unlearn": "`--missing ignore`",
    "fit": "`missing: ignore` in the UnlearningCallback's init_args",
}


def user_error_message(err: BaseException, subcommand: str | None) -> str:
    """The one-paragraph message ``lightning-unlearn`` prints for one of :data:`USER_ERRORS`, in
    the command line's words (``--missing ignore``, not the Python argument ``missing='ignore'``).

    Example:
        >>> user_error_message(InvalidDeletionRequest("Deletion request has 1 pair that is not a row of this table "
        ...     "(the training split): (2, 20) (only in the test split). Pass missing='ignore' to drop such pairs."), "unlearn")
        'lightning-unlearn unlearn: error: Deletion request has 1 pair that is not in the training split: (2, 20) (only in the test split). Pass `--missing ignore` to drop such pairs.'
    """
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, InvalidDeletionRequest):
        text = re.sub(r"\b(is not a row|are not rows) of this table(?: \(the training split\))?",
                      lambda m: f"{m[1].split()[0]} not in the training split", text)
        option = _MISSING_OPTION.get(subcommand or "")
        if option:
            text = text.replace("Pass missing='ignore'", f"Pass {option}").replace("(missing='ignore')", f"({option})")
        else:
            text = text.replace("Pass missing='ignore' to drop such pairs.", "Remove such pairs from the request.")
    return f"lightning-unlearn{f' {subcommand}' if subcommand else ''}: error: {text}"


_LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"
_RANK_ZERO_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")


class _DropLitLoggerTip(logging.Filter):
    """Lightning's advertisement for litlogger, logged at every Trainer's creation."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LITLOGGER_TIP)


@contextmanager
def quiet_third_party_noise() -> Iterator[None]:
    """Silence, for the command only, lines that say nothing about the run: torch's deprecation of
    ``LeafSpec`` (which Lightning still uses) and Lightning's litlogger tip. W&B's "anonymous
    setting has no effect" is avoided at its cause (:meth:`lightning_unlearn.cli.LightningUnlearnCLI.instantiate_classes`)."""
    tip = _DropLitLoggerTip()
    loggers = [logging.getLogger(name) for name in _RANK_ZERO_LOGGERS]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
        for logger in loggers:
            logger.addFilter(tip)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(tip)
