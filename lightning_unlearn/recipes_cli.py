"""The recipes that ship with the package: run one by name, list them, copy them.

The YAML recipes of the checkout's ``recipes/`` folder are package data
(``lightning_unlearn/recipes``, a link to that folder in a checkout), so an installed wheel
has them too. Wherever ``lightning-unlearn`` takes a recipe file (``-c``/``--config``), a value
that is not an existing file but names a shipped recipe, ``<folder>/<stem>`` with or without
``.yaml`` and with or without a leading ``recipes/``, runs the shipped file:

.. code-block:: bash

   lightning-unlearn fit -c ml100k/mf            # the shipped recipes/ml100k/mf.yaml
   lightning-unlearn recipes list                # the names
   lightning-unlearn recipes copy my_recipes     # editable copies: -c my_recipes/ml100k/mf.yaml

A file of that name in the working directory always wins over the shipped recipe.
"""

from __future__ import annotations

import argparse
import difflib
import filecmp
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "RECIPES", "RecipeNotFoundError", "console_args", "copy_recipes", "find_recipe", "recipe_names", "recipes_main",
    "resolve_config_args",
]

RECIPES = (Path(__file__).resolve().parent / "recipes").resolve()
"""Where the shipped recipes are: ``<folder>/<name>.yaml`` and the files they read."""

SHIPPED = ("*/*.yaml", "*/*.csv")  # the package data of setup.cfg
CONFIG_OPTIONS = ("-c", "--config")
NAME_LIKE = re.compile(r"[\w.-]+(/[\w.-]+)*")  # a relative path: no spaces, colons or braces (YAML text)
NO_FILE_CHECK = ("-h", "--help", "--print_config")  # options that never read the files a recipe names


class RecipeNotFoundError(LookupError):
    """A recipe name that names no shipped recipe, or a shipped recipe whose files are missing here."""


def recipe_names(root: Path = RECIPES) -> list[str]:
    """The names of the shipped recipes, ``<folder>/<stem>``, sorted.

    Args:
        root: the recipes folder (default: the shipped one).

    Example::

        >>> "ml100k/mf" in recipe_names()
        True
    """
    return sorted(f"{path.parent.name}/{path.stem}" for path in root.glob("*/*.yaml"))


def find_recipe(name: str, root: Path = RECIPES) -> Path:
    """The shipped file of a recipe name.

    Args:
        name: ``<folder>/<stem>``, optionally with ``.yaml`` (or ``.yml``) and a leading
            ``recipes/`` or ``./recipes/``: ``ml100k/mf``, ``ml100k/mf.yaml`` and
            ``recipes/ml100k/mf.yaml`` name the same recipe.
        root: the recipes folder (default: the shipped one).

    Returns:
        The recipe's file under ``root``.

    Raises:
        RecipeNotFoundError: no shipped recipe has that name; the message lists those that do.

    Example::

        >>> find_recipe("recipes/ml100k/mf.yaml") == find_recipe("ml100k/mf") == RECIPES / "ml100k" / "mf.yaml"
        True
    """
    key = name.removeprefix("./").removeprefix("recipes/")
    for suffix in (".yaml", ".yml"):
        key = key.removesuffix(suffix)
    names = recipe_names(root)
    if key in names:
        return root / f"{key}.yaml"
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise RecipeNotFoundError(
        f"{name!r} is neither a file here nor the name of a shipped recipe.{hint} "
        f"Shipped recipes (`lightning-unlearn recipes list`): {', '.join(names)}."
    )


def resolve_config_args(args: list[str], root: Path = RECIPES) -> list[str]:
    """Command-line arguments with every recipe name given to ``-c``/``--config`` made a file path.

    A value that is an existing file (or directory) stays as it is, and so does a value that
    cannot be a relative path (YAML text, an absolute path): jsonargparse reads those itself.
    Any other value must name a shipped recipe. Unless the arguments only print (``--help``,
    ``--print_config``), the files a shipped recipe reads relative to the working directory
    (``recipes/ml1m/delete_users.csv``) must be there too.

    Args:
        args: the command-line arguments, without the program name.
        root: the recipes folder (default: the shipped one).

    Returns:
        A new list, where recipe names are replaced by the shipped files' paths.

    Raises:
        RecipeNotFoundError: a value is neither a file nor a shipped recipe (the message lists
            the recipes), or a shipped recipe reads a file that the working directory lacks (the
            message says how to copy the recipes here).

    Example::

        >>> args = resolve_config_args(["fit", "-c", "ml100k/mf", "--trainer.max_epochs=5"])
        >>> args[0], Path(args[2]).relative_to(RECIPES).as_posix(), args[3]
        ('fit', 'ml100k/mf.yaml', '--trainer.max_epochs=5')
    """
    check_files = not any(arg.split("=", 1)[0] in NO_FILE_CHECK for arg in args)
    resolved = list(args)
    for i, arg in enumerate(args):
        if arg in CONFIG_OPTIONS and i + 1 < len(args):
            index, value, prefix = i + 1, args[i + 1], ""
        elif arg.startswith("--config="):
            index, value, prefix = i, arg.removeprefix("--config="), "--config="
        else:
            continue
        if Path(value).exists() or not NAME_LIKE.fullmatch(value):
            continue
        path = find_recipe(value, root)
        if check_files:
            _check_files_read(path, root)
        resolved[index] = prefix + str(path)
    return resolved


def _files_read(recipe: Path, root: Path) -> list[str]:
    """The shipped files a recipe names by their path from the working directory (``recipes/...``)."""

    def strings(node: Any) -> Iterator[str]:
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)

    document = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    return sorted({s for s in strings(document) if s.startswith("recipes/") and (root / s.removeprefix("recipes/")).is_file()})


def _check_files_read(recipe: Path, root: Path) -> None:
    missing = [name for name in _files_read(recipe, root) if not Path(name).is_file()]
    if missing:
        name = f"{recipe.parent.name}/{recipe.stem}"
        raise RecipeNotFoundError(
            f"the recipe {name} reads {', '.join(missing)} relative to the working directory, which has no such file. "
            f"Copy the recipes here first (`lightning-unlearn recipes copy recipes`), then run "
            f"`-c recipes/{name}.yaml` from this folder."
        )


def copy_recipes(dest: str | Path, force: bool = False, root: Path = RECIPES) -> list[Path]:
    """Copy every shipped recipe, and the files they read, into ``dest`` (``dest/<folder>/<file>``).

    Nothing is copied if any file in ``dest`` would be overwritten with other content, unless
    ``force``; files that are already there with the same content are left as they are.

    Args:
        dest: the folder to copy into (created if needed).
        force: overwrite files that differ.
        root: the recipes folder (default: the shipped one).

    Returns:
        The files written.

    Raises:
        FileExistsError: a file in ``dest`` differs from the shipped one and ``force`` is false
            (the message lists them).
        NotADirectoryError: ``dest`` is a file.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     written = copy_recipes(tmp)
        ...     again = copy_recipes(tmp)  # the same content: nothing to do
        ...     (Path(tmp) / "ml100k" / "mf.yaml").is_file(), len(written) > 0, again
        (True, True, [])
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{dest} is a file: give the folder to copy the recipes into.")
    pairs = [(source, dest / source.relative_to(root)) for source in _shipped_files(root)]
    todo = [(s, d) for s, d in pairs if not (d.is_file() and filecmp.cmp(s, d, shallow=False))]
    clashes = [d for _, d in todo if d.exists()]
    if clashes and not force:
        raise FileExistsError(
            f"{len(clashes)} file(s) in {dest} differ from the shipped recipes and would be overwritten: "
            f"{', '.join(str(c) for c in clashes)}. Pass --force to overwrite them, or copy into another folder."
        )
    for source, target in todo:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return [target for _, target in todo]


def _shipped_files(root: Path) -> list[Path]:
    return sorted({path for pattern in SHIPPED for path in root.glob(pattern)})


def recipes_main(args: list[str], root: Path = RECIPES) -> int:
    """The ``lightning-unlearn recipes`` command: ``list`` the shipped recipes or ``copy`` them.

    Args:
        args: the arguments after ``recipes``: ``list``, or ``copy DIR [--force]``.
        root: the recipes folder (default: the shipped one).

    Returns:
        The exit status: 0, or 2 (a user mistake, as the other commands end one) when ``copy`` refused to
        overwrite files or was given a file for its folder.

    Raises:
        SystemExit: on invalid arguments (status 2) and for ``--help`` (status 0).

    Example::

        >>> recipes_main(["list"])  # doctest: +ELLIPSIS
        ml100k/compare_lightgcn
        ...
        ml100k/mf
        ...
        0
    """
    parser = argparse.ArgumentParser(
        prog="lightning-unlearn recipes", description="The recipes that ship with lightning_unlearn."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,copy}")
    commands.add_parser("list", help="print the names of the shipped recipes (run one with `fit -c <name>`)")
    copy = commands.add_parser("copy", help="copy the shipped recipes into a folder, to edit them")
    copy.add_argument("dir", help="the folder to copy into, as <dir>/<folder>/<recipe>.yaml (created if needed)")
    copy.add_argument("--force", action="store_true", help="overwrite files that differ from the shipped ones")
    options = parser.parse_args(args)
    if options.command == "list":
        for name in recipe_names(root):
            print(name)
        return 0
    try:
        written = copy_recipes(options.dir, force=options.force, root=root)
    except (FileExistsError, NotADirectoryError) as err:  # a file to overwrite; or `dir`, or a folder in it, is a file
        print(f"lightning-unlearn recipes copy: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a folder that cannot be made or written (no permission, a read-only or virtual file system)
        print(f"lightning-unlearn recipes copy: {options.dir} cannot be written ({err.strerror}): give a folder you can write to.",
              file=sys.stderr)
        return 2
    dest = Path(options.dir)
    same = len(_shipped_files(root)) - len(written)
    print(f"[recipes] copied {len(written)} file(s) into {dest}" + (f", {same} were there already" if same else ""))
    print(f"[recipes] run one with: lightning-unlearn fit -c {(dest / 'ml100k' / 'mf.yaml').as_posix()}")
    readers = [name for name in recipe_names(root) if _files_read(root / f"{name}.yaml", root)]
    if readers and dest.resolve() != (Path.cwd() / "recipes").resolve():
        print(f"[recipes] note: {', '.join(readers)} read recipes/<folder>/<file> from the working directory: "
              "run them where these copies are ./recipes, or edit those paths")
    return 0


def console_args(args: list[str] | None) -> list[str] | None:
    """What the ``lightning-unlearn`` command hands to LightningCLI, after the recipe commands.

    ``recipes ...`` runs :func:`recipes_main` and exits with its status; otherwise recipe names
    given to ``-c`` are made paths (:func:`resolve_config_args`). With ``args=None`` (the console
    script) the arguments are ``sys.argv[1:]``, rewritten in place, and ``None`` is returned, so
    that LightningCLI reads ``sys.argv`` as usual.

    Args:
        args: command-line arguments, or ``None`` for ``sys.argv[1:]``.

    Returns:
        The arguments for LightningCLI (``None``: ``sys.argv``).

    Raises:
        SystemExit: after ``recipes ...`` (its status), or with status 2 and the message of a
            :class:`RecipeNotFoundError` when a recipe name is unknown.

    Example::

        >>> console_args(["fit", "-c", "ml100k/mf"])[2].endswith("mf.yaml")
        True
    """
    given = sys.argv[1:] if args is None else list(args)
    if given[:1] == ["recipes"]:
        raise SystemExit(recipes_main(given[1:]))
    try:
        resolved = resolve_config_args(given)
    except RecipeNotFoundError as err:
        print(f"lightning-unlearn: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    if args is None:
        sys.argv[1:] = resolved
        return None
    return resolved
