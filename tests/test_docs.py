"""Every example in docs/ runs, page by page, in order, in a scratch folder.

What runs:

- every ``.. code-block:: python`` block, in order, in one namespace per page (so a page can
  build on its earlier blocks);
- every ``$ command`` line of a ``.. code-block:: console`` block, in the same order and folder
  (``lightning-unlearn`` in-process, anything else with bash);
- every ``lightning-unlearn`` command of a ``.. code-block:: bash`` block too (bash blocks are
  otherwise only shown: installs, ``wandb sync``).

``lightning-unlearn`` commands run in a short form: ``fit``, ``validate``, ``test``, ``unlearn``
and ``compare`` on MovieLens-100K or synthetic data get one epoch of two batches
and no logger (:data:`BRIEF`; W&B logging has its own tests); commands on MovieLens-1M recipes, too large for the test suite, are parsed and
checked with ``--print_config``; ``--help`` and ``--print_config`` run as written. The scratch
folder links ``recipes/`` to the checkout's, ``WANDB_MODE=disabled``, and the real data comes from ``$LIGHTNING_UNLEARN_DATA`` or
``../shared/data`` (pages that need it are skipped without it). ``yaml`` and ``json`` blocks
must parse.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, shared_data

DOCS = REPO / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.rst") if "_build" not in p.parts)
LANGUAGES = {"python", "console", "bash", "yaml", "json", "text", "none"}
BRIEF = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
         "--trainer.limit_test_batches=2", "--trainer.enable_progress_bar=false", "--trainer.logger=false"]
RUNS = ("fit", "validate", "test", "unlearn", "compare")
DIRECTIVE = re.compile(r"^(?P<indent>[ ]*)\.\. code-block::[ ]*(?P<language>\S*)[ ]*$")


@dataclass
class Block:
    language: str
    text: str
    line: int  # 1-based line of the block's first content line in the page


def code_blocks(page: Path) -> list[Block]:
    """The ``code-block`` directives of an rst page, dedented, with where their content starts."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = DIRECTIVE.match(lines[i])
        i += 1
        if not match:
            continue
        indent = len(match["indent"])
        while i < len(lines) and re.match(r"^\s+:[\w-]+:", lines[i]):  # directive options
            i += 1
        body: list[str] = []
        start = None
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            if lines[i].strip() and start is None:
                start = i + 1
            if start is not None:
                body.append(lines[i])
            i += 1
        blocks.append(Block(match["language"] or "none", textwrap.dedent("\n".join(body)).strip("\n") + "\n", start or i))
    return blocks


def shell_commands(block: Block) -> list[tuple[str, int]]:
    """``(command, line)`` pairs: ``$`` lines of console blocks, ``lightning-unlearn`` lines of bash blocks."""
    commands, pending, first = [], "", 0
    for offset, raw in enumerate(block.text.splitlines()):
        if pending:
            line = raw.strip()
        elif block.language == "console" and raw.startswith("$ "):
            line, first = raw[2:].strip(), block.line + offset
        elif block.language == "bash" and raw.strip().startswith("lightning-unlearn"):
            line, first = raw.strip(), block.line + offset
        else:
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        commands.append((pending + line, first))
        pending = ""
    return commands


def shell_words(command: str) -> list[str]:
    """The words bash makes of a command line (quotes, globs, ``$(...)`` and comments as in a shell)."""
    result = subprocess.run(["bash", "-c", f"printf '%s\\0' {command}"], capture_output=True, text=True, check=True)
    return result.stdout.split("\0")[:-1]


def cli_arguments(command: str) -> list[str]:
    """The arguments a documented ``lightning-unlearn`` command runs with in the tests."""
    args = shell_words(command)[1:]
    if any(a in ("--help", "-h", "--print_config") or a.endswith(".help") for a in args):
        return args
    config = args[args.index("-c") + 1] if "-c" in args else ""
    if "ml1m" in config:
        return [*args, "--print_config"]
    if not args or args[0] not in RUNS:
        return args
    # unlearn and compare measure utility on every test user: they refuse a test batch limit
    return [*args, *(a for a in BRIEF if not (args[0] in ("unlearn", "compare") and a.startswith("--trainer.limit_test_batches")))]


def needs_data(page: Path) -> bool:
    """Whether a page runs commands on the MovieLens recipes (its Python examples use synthetic data)."""
    return bool(re.search(r"lightning-unlearn .*recipes/ml", page.read_text(encoding="utf-8")))


def run_cli(args: list[str], where: str) -> None:
    from lightning_unlearn.cli import main

    try:
        main(args)
    except SystemExit as exit_info:
        if exit_info.code not in (0, None):
            pytest.fail(f"{where}: `lightning-unlearn {' '.join(args)}` exited with {exit_info.code}")
    finally:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def test_docs_have_pages_and_examples():
    names = {p.stem for p in PAGES}
    assert {"index", "install", "quickstart", "own_model", "requests", "cli", "wandb", "methods", "metrics", "journal"} <= names
    blocks = [b for page in PAGES for b in code_blocks(page)]
    assert sum(b.language == "python" for b in blocks) >= 10
    assert sum(len(shell_commands(b)) for b in blocks if b.language in ("console", "bash")) >= 5


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_blocks_are_known_and_data_blocks_parse(page):
    text = page.read_text(encoding="utf-8")
    assert ">>>" not in text, f"{page.name}: write examples as `.. code-block:: python` so that they run in the tests"
    for block in code_blocks(page):
        where = f"{page.relative_to(REPO)}:{block.line}"
        assert block.language in LANGUAGES, f"{where}: unknown code-block language {block.language!r}"
        if block.language == "yaml":
            assert yaml.safe_load(block.text) is not None, where
        elif block.language == "json":
            for line in block.text.splitlines():
                if line.strip():
                    json.loads(line)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_examples_run(page, tmp_path, monkeypatch, capsys):
    steps = []
    for block in code_blocks(page):
        if block.language == "python":
            steps.append(("python", block.text, block.line))
        elif block.language in ("console", "bash"):
            steps += [("shell", command, line) for command, line in shell_commands(block)]
    if not steps:
        pytest.skip("no runnable examples on this page")
    data = shared_data()
    if data is None and needs_data(page):
        pytest.skip("real data not found: set LIGHTNING_UNLEARN_DATA to a folder with ml-100k/ and ml-1m/")
    if data is not None:
        monkeypatch.setenv("LIGHTNING_UNLEARN_DATA", str(data))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(sys, "argv", ["lightning-unlearn"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(REPO / "recipes", target_is_directory=True)
    namespace = {"__name__": f"docs_{page.stem}"}
    for kind, text, line in steps:
        where = f"{page.relative_to(REPO)}:{line}"
        if kind == "python":
            # Padding puts the block at its own line numbers, so a traceback points into the page.
            exec(compile("\n" * (line - 1) + text, str(page), "exec"), namespace)
        elif text.startswith("lightning-unlearn"):
            run_cli(cli_arguments(text), where)
        else:
            result = subprocess.run(text, shell=True, executable="/bin/bash", capture_output=True, text=True)
            assert result.returncode == 0, f"{where}: `{text}` failed:\n{result.stderr}"
    capsys.readouterr()


def measurement_table(result: dict) -> str:
    """The rounded table a page shows for a ``compare.json`` (``docs/measurements/<name>.csv``)."""
    lines = ["method,seconds per request,precompute s,rank gap,score gap,top-20 gap,MIA gap,Recall@20,NDCG@20,overlap@20"]
    for m in result["methods"]:
        c, u = m["completeness"], m["utility"]
        cells = [m["name"], f"{m['seconds']:.2f}", f"{m['precompute_seconds']:.1f}" if m["precompute_seconds"] else "",
                 *(f"{c[f'gap_closed_{k}']:.3f}" for k in ("rank", "score", "top20", "mia")),
                 f"{u['recall@20']:.4f}", f"{u['ndcg@20']:.4f}", f"{c['overlap@20']:.3f}"]
        lines.append(",".join(f'"{cell}"' if "," in cell else cell for cell in cells))
    o = result["original"]
    lines.append(f"(original: doing nothing),,,0,0,0,0,{o['utility']['recall@20']:.4f},{o['utility']['ndcg@20']:.4f},"
                 f"{o['completeness']['overlap@20']:.3f}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("table", sorted((DOCS / "measurements").glob("*.csv")), ids=lambda p: p.name)
def test_measured_tables_are_the_compare_json_they_quote(table):
    """Numbers on the pages come from the compare.json kept beside them, not by hand."""
    result = json.loads(table.with_suffix(".json").read_text())
    assert table.read_text() == measurement_table(result), f"regenerate {table.name} from {table.with_suffix('.json').name}"


def test_short_forms():
    """How documented commands are shortened (the rule above, checked once)."""
    assert cli_arguments("lightning-unlearn fit -c recipes/ml100k/mf.yaml") == ["fit", "-c", "recipes/ml100k/mf.yaml", *BRIEF]
    assert cli_arguments("lightning-unlearn fit -c recipes/ml1m/mf.yaml")[-1] == "--print_config"
    assert cli_arguments("lightning-unlearn unlearn --method.help IFRU") == ["unlearn", "--method.help", "IFRU"]
    assert cli_arguments("lightning-unlearn test --ckpt_path 'a b.ckpt'  # comment")[:3] == ["test", "--ckpt_path", "a b.ckpt"]
    block = Block("console", "$ lightning-unlearn fit \\\n    -c x.yaml\noutput line\n$ ls\n", 10)
    assert shell_commands(block) == [("lightning-unlearn fit -c x.yaml", 10), ("ls", 13)]
