"""Sphinx configuration of the lightning_unlearn documentation.

Build: ``make docs`` (``python -m sphinx -W --keep-going -b html docs docs/_build/html``).
Nothing here reaches the network: no intersphinx, and the package imports no downloader.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout, whether or not it is installed
os.environ.setdefault("WANDB_MODE", "disabled")  # importing the package never needs W&B, but be sure

from lightning_unlearn import __version__  # noqa: E402

project = "lightning_unlearn"
author = "the lightning_unlearn authors"
copyright = "the lightning_unlearn authors"  # noqa: A001
release = version = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",  # the page loads MathJax in the browser; the build fetches nothing
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build"]
templates_path: list[str] = []
root_doc = "index"

# API reference: Google-style docstrings, members in source order, documented where they are defined.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
autosummary_generate = False  # the API pages are written by hand; autosummary only draws tables

html_theme = "alabaster"
html_title = f"lightning_unlearn {release}"
html_static_path: list[str] = []
html_theme_options = {"description": "Recommendation unlearning for PyTorch Lightning", "fixed_sidebar": True}

# Overridden Lightning hooks (training_step, train_dataloader, ...) carry no docstring of their
# own; inheriting Lightning's would pull in its roles and labels (``paramref``, ``testcode``),
# which mean nothing here. The base classes are linked from every class instead.
autodoc_inherit_docstrings = False
