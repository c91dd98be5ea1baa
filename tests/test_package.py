"""The package people install: its metadata, the recipes it ships, and the command from a wheel.

The fast tests run the resolver and ``lightning-unlearn recipes`` in-process against the
installed package (editable in a checkout: the shipped recipes are the checkout's
``recipes/``). :func:`wheel_venv` builds a wheel of the checkout (from a copy of it, so the
checkout gets no ``build/``), installs it into a fresh venv without reaching any index, and
makes the already installed dependencies visible there through a ``.pth`` file, so that
``lightning_unlearn`` itself comes only from the wheel.
"""

from __future__ import annotations

import ast
import configparser
import email
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from lightning_unlearn.cli import main
from lightning_unlearn.recipes_cli import (
    RECIPES,
    RecipeNotFoundError,
    console_args,
    copy_recipes,
    find_recipe,
    recipe_names,
    resolve_config_args,
)
from tests.conftest import REPO

CHECKOUT_NAMES = sorted(f"{p.parent.name}/{p.stem}" for p in (REPO / "recipes").glob("*/*.yaml"))
CHECKOUT_FILES = sorted(p.relative_to(REPO / "recipes").as_posix() for p in (REPO / "recipes").glob("*/*") if p.is_file())
# What building the wheel reads from the checkout (setup.cfg's `file:` entries and packages).
BUILD_INPUTS = ("pyproject.toml", "setup.cfg", "LICENSE", "docs/pypi.md", "lightning_unlearn", "recipes")


def run_main(args: list[str]) -> int:
    """``lightning-unlearn <args>`` in-process; its exit status."""
    try:
        main(args)
    except SystemExit as exit_info:
        return exit_info.code if isinstance(exit_info.code, int) else 1
    return 0


# --- the resolver and `recipes list|copy`, in-process ---------------------------------------------


def test_shipped_recipes_are_the_checkouts():
    assert CHECKOUT_NAMES and recipe_names() == CHECKOUT_NAMES
    assert {"ml100k/mf", "ml1m/mf_ifru"} <= set(recipe_names())


@pytest.mark.parametrize("name", ["ml100k/mf", "ml100k/mf.yaml", "ml100k/mf.yml", "recipes/ml100k/mf.yaml", "./recipes/ml100k/mf"])
def test_find_recipe_accepts_every_spelling(name):
    assert find_recipe(name) == RECIPES / "ml100k" / "mf.yaml"
    assert find_recipe(name).read_text() == (REPO / "recipes" / "ml100k" / "mf.yaml").read_text()


def test_an_unknown_name_lists_the_recipes():
    with pytest.raises(RecipeNotFoundError) as info:
        find_recipe("ml100k/mff")
    message = str(info.value)
    assert "'ml100k/mff' is neither a file here nor the name of a shipped recipe" in message
    assert "Did you mean ml100k/mf" in message
    assert all(name in message for name in CHECKOUT_NAMES)


def test_resolve_rewrites_only_recipe_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mf = str(RECIPES / "ml100k" / "mf.yaml")
    assert resolve_config_args(["fit", "-c", "ml100k/mf", "--trainer.max_epochs=1"]) == ["fit", "-c", mf, "--trainer.max_epochs=1"]
    assert resolve_config_args(["fit", "--config", "ml100k/mf.yaml"]) == ["fit", "--config", mf]
    assert resolve_config_args(["fit", "--config=recipes/ml100k/mf.yaml"]) == ["fit", f"--config={mf}"]
    assert resolve_config_args(["compare", "-c", "ml100k/compare_mf", "-c", "ml100k/mf"])[1:] == [
        "-c", str(RECIPES / "ml100k" / "compare_mf.yaml"), "-c", mf]
    untouched = [
        ["fit", "--trainer.max_epochs=1"],
        ["fit", "-c", "{trainer: {max_epochs: 1}}"],  # YAML text: jsonargparse reads it
        ["fit", "-c", str(tmp_path / "elsewhere.yaml")],  # an absolute path: jsonargparse says it is missing
        ["fit", "-c"],
    ]
    for args in untouched:
        assert resolve_config_args(args) == args
    # A file here wins over the shipped recipe of the same name.
    (tmp_path / "ml100k").mkdir()
    (tmp_path / "ml100k" / "mf.yaml").write_text("seed_everything: 1\n")
    assert resolve_config_args(["fit", "-c", "ml100k/mf.yaml"]) == ["fit", "-c", "ml100k/mf.yaml"]
    assert resolve_config_args(["fit", "-c", "ml100k/mf"]) == ["fit", "-c", mf]
    with pytest.raises(RecipeNotFoundError, match="'configs/mine.yaml' is neither a file here"):
        resolve_config_args(["fit", "-c", "configs/mine.yaml"])


def test_a_recipe_that_reads_files_from_the_working_directory_needs_them_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeNotFoundError, match=r"reads recipes/ml1m/delete_users.csv .* recipes copy recipes"):
        resolve_config_args(["fit", "-c", "ml1m/mf_ifru"])
    for printing in ("--print_config", "--print_config=comments", "--help"):
        assert resolve_config_args(["fit", "-c", "ml1m/mf_ifru", printing])[2] == str(RECIPES / "ml1m" / "mf_ifru.yaml")
    copy_recipes(tmp_path / "recipes")
    assert resolve_config_args(["fit", "-c", "ml1m/mf_ifru"])[2] == str(RECIPES / "ml1m" / "mf_ifru.yaml")


def test_console_args_keep_sys_argv_for_the_console_script(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-unlearn", "fit", "-c", "ml100k/mf"])
    assert console_args(None) is None  # LightningCLI reads sys.argv, which now holds the path
    assert sys.argv == ["lightning-unlearn", "fit", "-c", str(RECIPES / "ml100k" / "mf.yaml")]
    assert console_args(["test", "-c", "ml100k/mf"]) == ["test", "-c", str(RECIPES / "ml100k" / "mf.yaml")]


def test_main_refuses_an_unknown_recipe_with_the_names(cli_run, capsys):
    assert run_main(["fit", "-c", "ml100k/nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-unlearn: 'ml100k/nope' is neither a file here nor the name of a shipped recipe")
    assert "ml100k/mf, ml100k/neumf" in err


def test_main_runs_a_recipe_by_name(cli_run, capsys):
    assert run_main(["fit", "-c", "ml100k/mf", "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "class_path: lightning_unlearn.models.MF" in out and "save_dir: runs/ml100k_mf" in out


def test_recipes_list_and_copy(cli_run, tmp_path, capsys):
    assert run_main(["recipes", "list"]) == 0
    assert capsys.readouterr().out.split() == CHECKOUT_NAMES

    dest = tmp_path / "mine"
    assert run_main(["recipes", "copy", str(dest)]) == 0
    out = capsys.readouterr().out
    assert f"copied {len(CHECKOUT_FILES)} file(s) into {dest}" in out
    assert "ml1m/mf_ifru" in out  # the note on recipes that read recipes/... from the working directory
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == CHECKOUT_FILES
    assert (dest / "ml1m" / "delete_users.csv").read_bytes() == (REPO / "recipes" / "ml1m" / "delete_users.csv").read_bytes()

    assert run_main(["recipes", "copy", str(dest)]) == 0  # the same content again: nothing to do
    assert f"copied 0 file(s) into {dest}, {len(CHECKOUT_FILES)} were there already" in capsys.readouterr().out

    mine = dest / "ml100k" / "mf.yaml"
    mine.write_text(mine.read_text() + "# my edit\n")
    assert run_main(["recipes", "copy", str(dest)]) == 2
    assert "1 file(s) in" in capsys.readouterr().err and mine.read_text().endswith("# my edit\n")
    assert run_main(["recipes", "copy", str(dest), "--force"]) == 0
    assert "copied 1 file(s)" in capsys.readouterr().out
    assert mine.read_text() == (REPO / "recipes" / "ml100k" / "mf.yaml").read_text()

    assert run_main(["recipes", "copy", "recipes"]) == 0  # into ./recipes: no note, the paths work as written
    assert "note:" not in capsys.readouterr().out
    assert run_main(["recipes"]) == 2
    assert run_main(["recipes", "--help"]) == 0
    (tmp_path / "a_file").write_text("")
    assert run_main(["recipes", "copy", "a_file"]) == 2  # a message, not a traceback
    assert "a_file is a file: give the folder to copy the recipes into" in capsys.readouterr().err
    assert run_main(["recipes", "copy", "/proc/lightning_unlearn"]) == 2  # a folder that cannot be made: a message too
    assert "/proc/lightning_unlearn cannot be written (" in capsys.readouterr().err


# --- metadata -----------------------------------------------------------------------------------


def setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg", encoding="utf-8")
    return config


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_direct_imports_are_declared():
    """Every third-party module the package imports is a dependency of its own, with a lower bound."""
    declared = {normalized(Requirement(line).name): Requirement(line) for line in
                setup_cfg()["options"]["install_requires"].strip().splitlines()}
    optional = {normalized(Requirement(line).name) for extra in setup_cfg()["options.extras_require"].values()
                for line in extra.strip().splitlines()}  # imported where a feature needs it (plot_comparison: matplotlib)
    imported = set()
    for path in (REPO / "lightning_unlearn").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"lightning_unlearn"}
    from importlib.metadata import packages_distributions

    distributions = packages_distributions()
    for module in sorted(third_party):
        names = {normalized(d) for d in distributions.get(module, [module])}
        assert names & (set(declared) | optional), f"`import {module}` but none of {sorted(names)} is a dependency or an extra"
    for name in ("torch", "numpy", "wandb", "pyyaml", "tqdm", "typing-extensions", "pytorch-lightning", "jsonargparse"):
        assert any(spec.operator in (">=", ">") for spec in declared[name].specifier), f"{name} has no lower bound"
    assert "2.6.2" not in declared["pytorch-lightning"].specifier and "2.6.3" not in declared["pytorch-lightning"].specifier


def test_long_description_example_runs(tmp_path, monkeypatch):
    """The Python example of the PyPI page (docs/pypi.md, the long description) runs as printed."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "pypi.md").read_text(encoding="utf-8"), re.DOTALL)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "docs/pypi.md", "exec"), {"__name__": "pypi_md"})  # noqa: S102 - the page's own example
    assert (tmp_path / "unlearning" / "journal.jsonl").is_file()


# --- from a wheel, in a fresh venv ----------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of the fresh venv's commands: no PYTHONPATH, no index, W&B off."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", WANDB_MODE="disabled", **extra)
    return env


def run(command: list[str | Path], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], check=False, cwd=cwd, env=env or clean_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> tuple[Path, Path]:
    """``(wheel, venv)``: a wheel of the checkout, installed with ``--no-deps --no-index`` into a fresh venv."""
    root = tmp_path_factory.mktemp("package")
    source = root / "source"
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                 "-w", root / "dist", source], cwd=root)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (root / "dist").glob("lightning_unlearn-*.whl")

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, env=clean_env())
    installed = run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps",
                     "--no-index", wheel], cwd=root)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # The dependencies (torch, Lightning, ...) come from this interpreter's site-packages: a .pth line
    # puts them on the path after the venv's own (their .pth files, e.g. an editable install, are not run).
    purelib = Path(run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       cwd=root).stdout.strip())
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (purelib / "_lightning_unlearn_test_deps.pth").write_text("".join(f"{p}\n" for p in paths))
    return wheel, venv


def test_wheel_metadata_and_contents(wheel_venv):
    wheel, _ = wheel_venv
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(archive.read(metadata_name))
        licenses = [n for n in names if re.search(r"\.dist-info/licenses/LICENSE$", n)]
        assert licenses and "Apache License" in archive.read(licenses[0]).decode()
    assert {f"lightning_unlearn/recipes/{f}" for f in CHECKOUT_FILES} <= names
    assert "lightning_unlearn/recipes_cli.py" in names and "lightning_unlearn/py.typed" in names
    assert metadata["License"] == "Apache-2.0"
    assert not any("Pytest" in c for c in metadata.get_all("Classifier"))
    urls = dict(u.split(", ", 1) for u in metadata.get_all("Project-URL"))
    assert {"Documentation", "Source", "Tracker"} <= set(urls) and all(u.startswith("https://") for u in urls.values())
    description = metadata.get_payload()
    assert "lightning-unlearn" in description and "../shared" not in description and "](../" not in description
    requires = {normalized(Requirement(r).name): Requirement(r) for r in metadata.get_all("Requires-Dist") if "extra ==" not in r}
    assert {"pyyaml", "tqdm", "typing-extensions"} <= set(requires)


def test_wheel_recipes_by_name(wheel_venv, tmp_path):
    """From the installed wheel, outside the checkout: the package, ``recipes list|copy``, a name to ``-c``."""
    _, venv = wheel_venv
    cli = venv / "bin" / "lightning-unlearn"
    where = run([venv / "bin" / "python", "-c", "import lightning_unlearn.recipes_cli as r; print(r.__file__); print(r.RECIPES)"],
                cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    module, recipes = map(Path, where.stdout.split())
    assert module.resolve().is_relative_to(venv.resolve()) and recipes.is_relative_to(venv.resolve()), where.stdout

    listed = run([cli, "recipes", "list"], cwd=tmp_path)
    assert listed.returncode == 0 and listed.stdout.split() == CHECKOUT_NAMES, listed.stderr

    unknown = run([cli, "fit", "-c", "ml100k/nope"], cwd=tmp_path)
    assert unknown.returncode == 2 and "ml100k/mf, ml100k/neumf" in unknown.stderr
    needs_copy = run([cli, "fit", "-c", "ml1m/mf_ifru"], cwd=tmp_path)
    assert needs_copy.returncode == 2 and "lightning-unlearn recipes copy recipes" in needs_copy.stderr

    copied = run([cli, "recipes", "copy", "recipes"], cwd=tmp_path)
    assert copied.returncode == 0, copied.stderr
    assert sorted(p.relative_to(tmp_path / "recipes").as_posix() for p in (tmp_path / "recipes").rglob("*") if p.is_file()) == CHECKOUT_FILES
    printed = run([cli, "fit", "-c", "ml1m/mf_ifru", "--print_config"], cwd=tmp_path)
    assert printed.returncode == 0 and "requests_file: recipes/ml1m/delete_users.csv" in printed.stdout, printed.stderr


def test_wheel_fits_a_recipe_by_name(wheel_venv, tmp_path, data_dir):
    _, venv = wheel_venv
    fit = run([venv / "bin" / "lightning-unlearn", "fit", "-c", "ml100k/mf", "--trainer.fast_dev_run=true",
               "--trainer.logger=false", "--trainer.enable_progress_bar=false"],
              cwd=tmp_path, env=clean_env(LIGHTNING_UNLEARN_DATA=str(data_dir)))
    output = fit.stdout + fit.stderr
    assert fit.returncode == 0, output
    assert "`Trainer.fit` stopped" in output and re.search(r"test/ndcg@20\s+\d", output), output

