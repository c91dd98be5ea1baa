"""The lightning-unlearn CLI: every recipe runs, unknown keys are errors, sizes are linked."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pytorch_lightning.utilities.exceptions import SIGTERMException

import lightning_unlearn.cli as cli_module
from lightning_unlearn.cli import _is_class, _methods_as_lists, _refuse_a_recipe_before_the_subcommand, main
from lightning_unlearn.models import MF
from lightning_unlearn.unlearning.callback import UnlearningCallback
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("cli_run")

RECIPES = sorted((REPO / "recipes").glob("*/*.yaml"))
COMPARE_RECIPES = [p for p in RECIPES if "deletion" in yaml.safe_load(p.read_text())]  # compare_*, demo_*
UNLEARN_RECIPES = [p for p in RECIPES if p not in COMPARE_RECIPES and "UnlearningCallback" in p.read_text()]
FIT_RECIPES = [p for p in RECIPES if p not in COMPARE_RECIPES and p not in UNLEARN_RECIPES]
DEMO_RECIPES = [REPO / "recipes" / "ml100k" / f"demo_{kind}.yaml" for kind in ("interactions", "users")]


def test_all_foundation_recipes_exist():
    names = {f"{p.parent.name}/{p.stem}" for p in RECIPES}
    assert {"ml100k/mf", "ml100k/lightgcn", "ml100k/neumf", "ml1m/mf", "ml1m/lightgcn"} <= names


@pytest.mark.parametrize("recipe", FIT_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_fast_dev_run(recipe, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("LIGHTNING_UNLEARN_DATA", str(data_dir))
    main(["fit", "-c", str(recipe), "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false"])
    out = capsys.readouterr().out
    assert "test/recall@20" in out and "test/ndcg@20" in out  # fit ends with a test of the model


@pytest.mark.parametrize("recipe", COMPARE_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_compare_recipe_runs_briefly(recipe, data_dir, monkeypatch, capsys):
    """MovieLens-100K comparisons run with two batches per epoch; MovieLens-1M and scale ones are parsed and checked."""
    monkeypatch.setenv("LIGHTNING_UNLEARN_DATA", str(data_dir))
    if recipe.parent.name in ("ml1m", "scale"):
        with pytest.raises(SystemExit) as exit_info:
            main(["compare", "-c", str(recipe), "--print_config"])
        assert exit_info.value.code in (0, None)
        assert "deletion:" in capsys.readouterr().out
        return
    brief = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
             "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--out", "out"]
    main(["compare", "-c", str(recipe), *brief])
    assert "Retrain(seed=1)" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", UNLEARN_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_train_then_unlearn_recipes_parse(recipe, data_dir, monkeypatch, capsys):
    """They train for real on MovieLens-1M before unlearning: here they are parsed and checked."""
    monkeypatch.setenv("LIGHTNING_UNLEARN_DATA", str(data_dir))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "UnlearningCallback" in capsys.readouterr().out


def test_recipes_use_offline_wandb_checkpoint_and_early_stopping():
    for recipe in RECIPES:
        config = yaml.safe_load(recipe.read_text())["trainer"]
        assert config["logger"]["class_path"].endswith("WandbLogger") and config["logger"]["init_args"]["offline"]
        callbacks = {c["class_path"].rsplit(".", 1)[1]: c["init_args"] for c in config["callbacks"]}
        assert callbacks["ModelCheckpoint"]["monitor"] == callbacks["EarlyStopping"]["monitor"] == "val/ndcg@20"


_STOPPING = "{class_path: pytorch_lightning.callbacks.EarlyStopping, init_args: {monitor: val/ndcg@20, mode: max}}"


def write_synthetic_recipe(path: Path, extra: str = "") -> Path:
    path.write_text(
        "trainer: {max_epochs: 2, logger: false, enable_checkpointing: false, enable_progress_bar: false}\n"
        "model: {class_path: lightning_unlearn.models.MF, init_args: {embedding_dim: 8}}\n"
        "data: {source: {class_path: lightning_unlearn.data.Synthetic, init_args: {num_users: 30, num_items: 20}}, batch_size: 64}\n"
        + extra
    )
    return path


@pytest.mark.parametrize("given", [["-c", "ml100k/mf", "fit"], ["--config=ml100k/mf", "test", "--trainer.max_epochs=1"]])
def test_a_recipe_before_the_subcommand_is_refused_with_the_command_that_runs_it(given, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(given)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "before the subcommand takes a file with a section per subcommand" in err
    assert f"Give it after the subcommand: lightning-unlearn {given[2 - given[0].startswith('--config=')]} -c " in err
    assert "Traceback" not in err


def test_a_file_with_a_section_per_subcommand_still_goes_before_it(tmp_path):
    (tmp_path / "all.yaml").write_text("fit:\n  trainer:\n    max_epochs: 1\ntest:\n  trainer:\n    max_epochs: 1\n")
    _refuse_a_recipe_before_the_subcommand(["-c", str(tmp_path / "all.yaml"), "fit"])
    _refuse_a_recipe_before_the_subcommand(["fit", "-c", str(tmp_path / "all.yaml")])  # after it: any file is a recipe


def test_compare_says_what_retrains_refits_leave_out_of_the_original_fit(tmp_path, capsys, monkeypatch):
    """A callback of the user's (stochastic weight averaging, say) shapes the original fit, not Retrain's refits."""
    monkeypatch.chdir(tmp_path)
    recipe = write_synthetic_recipe(tmp_path / "r.yaml")
    (tmp_path / "user3.csv").write_text("user\n3\n")
    main(["compare", "-c", str(recipe), "--methods", "FineTune", "--out", "out", "--trainer.min_steps=3",
          "--trainer.callbacks+=pytorch_lightning.callbacks.LambdaCallback", "--deletion.requests_file", "user3.csv",
          "--deletion.fraction", "0.5"])
    out = capsys.readouterr().out
    assert "[compare] Retrain's refits fit as the trainer does, without the callback LambdaCallback:" in out
    assert out.count("[compare] --deletion.requests_file user3.csv is the deletion: fraction=0.5 (which draw one) is not used") == 1
    assert "SaveConfigCallback" not in out  # LightningCLI's own, in every run: it trains nothing


def test_compare_methods_given_one_name_is_a_list_of_it():
    assert _methods_as_lists(["compare", "--methods", "IFRU"]) == ["compare", "--methods", "[IFRU]"]
    assert _methods_as_lists(["compare", "--methods=AltEraser", "-c", "x.yaml"]) == ["compare", "--methods=[AltEraser]", "-c", "x.yaml"]
    for unchanged in (["compare", "--methods", "[IFRU, AltEraser]"], ["compare", "--methods+", "IFRU"], ["compare", "--methods", "m.yaml"],
                      ["compare", "--methods", "null"], ["compare", "--methods=~"], ["compare", "--methods", "{class_path: IFRU}"],
                      ["fit", "--methods", "IFRU"]):
        assert _methods_as_lists(unchanged) == unchanged


def test_sizes_are_linked_from_the_datamodule(tmp_path, capsys):
    recipe = write_synthetic_recipe(tmp_path / "r.yaml")
    main(["fit", "-c", str(recipe)])
    assert "test/recall@20" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("bad", "named"),
    [("--model.init_args.bogus=1", "bogus"), ("--data.bogus=1", "bogus"), ("--data.split=temporal", "temporal")],
)
def test_unknown_or_invalid_keys_are_errors(bad, named, tmp_path, capsys):
    recipe = write_synthetic_recipe(tmp_path / "r.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(recipe), bad])
    assert exit_info.value.code != 0
    assert named in capsys.readouterr().err


def test_an_optimizer_for_matrices_only_is_not_refused(tmp_path, capsys):
    """The check of --optimizer built it on a one-number parameter, which torch.optim.Muon (matrices only) refuses."""
    recipe = write_synthetic_recipe(tmp_path / "r.yaml")
    main(["fit", "-c", str(recipe), "--optimizer", "torch.optim.Muon", "--optimizer.lr", "0.02"])
    assert "test/recall@20" in capsys.readouterr().out


@pytest.mark.parametrize(("command", "options", "named"), [
    ("fit", ["--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "2"], "--lr_scheduler needs --optimizer"),
    ("predict", ["--trainer.limit_predict_batches=0.5"], "limit_predict_batches is not used"),
    ("fit", ["--optimizer", "torch.optim.SGD", "--optimizer.lr", "-1"], "--optimizer torch.optim.SGD: Invalid learning rate"),
    ("fit", ["--optimizer", "torch.optim.Adam", "--optimizer.fused", "true", "--optimizer.foreach", "true"],
     "--optimizer torch.optim.Adam: `fused` and `foreach` cannot be `True` together"),
    ("fit", ["--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.1", "--lr_scheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau"],
     "needs the metric it watches: give `--lr_scheduler pytorch_lightning.cli.ReduceLROnPlateau"),
    ("compare", ["--trainer.limit_test_batches=0.2"], "compare measures utility on every test user: --trainer.limit_test_batches"),
    ("unlearn", ["--trainer.limit_test_batches=3", "--ckpt_path", "x.ckpt", "--requests", "r.csv", "--method", "FineTune"],
     "unlearn measures utility on every test user: --trainer.limit_test_batches is not used"),
    ("predict", ["--trainer.devices=2"], "runs on one device"),
    ("compare", ["--trainer.devices=[0, 1]"], "runs on one device"),
    ("unlearn", ["--trainer.devices=-1", "--ckpt_path", "x.ckpt", "--requests", "r.csv", "--method", "FineTune"], "runs on one device"),
    ("fit", ["--trainer.overfit_batches=2"], "--trainer.overfit_batches=2 cannot work with this datamodule"),
    ("compare", ["--trainer.fast_dev_run=true"], "compare --trainer.fast_dev_run: Lightning's quick check runs one batch"),
    ("predict", ["--trainer.precision=bf16-mixed"], "--trainer.precision='bf16-mixed' is not used"),
    ("predict", ["--data.eval_candidates=10"], "predict ranks every item for each user: --data.eval_candidates"),
    ("unlearn", ["--ckpt_path", "x.ckpt", "--requests", "a.csv", "--requests=b.csv", "--method", "FineTune"],
     "--requests was given 2 times, and a command takes one (only the last would be used)"),
    ("compare", ["--deletion.requests_file", "a.csv", "--deletion.requests_file", "b.csv"], "--deletion.requests_file was given 2 times"),
    ("unlearn", ["--ckpt_path", "x.ckpt", "--requests", "r.csv", "--method", "FineTune", "--method.epochs", "2", "--method", "IFRU"],
     "--method.epochs was given before another --method, which replaces the method it configured"),
    ("unlearn", ["--ckpt_path", "r.yaml", "--requests", "r.yaml", "--method", "FineTune"], "is not a complete PyTorch checkpoint"),
    ("test", ["--ckpt_path", "r.yaml"], "is not a complete PyTorch checkpoint"),
    ("unlearn", ["--ckpt_path", ".", "--requests", "r.yaml", "--method", "FineTune"], "is a folder: give a checkpoint file in it"),
    *((command, [*limit, f"--trainer.callbacks+={_STOPPING}"], said) for command in ("fit", "compare") for limit, said in (
        (["--trainer.limit_val_batches=0", "--data.val_fraction=0.2"],
         "EarlyStopping watches val/ndcg@20, a validation metric, and --trainer.limit_val_batches=0"),
        (["--data.val_fraction=0"], "and the data has no validation split"),
        (["--trainer.max_steps=3", "--data.val_fraction=0.2", "--data.batch_size=8", "--trainer.accumulate_grad_batches=2"],
         "--trainer.max_steps=3 ends the fit before its first validation (after 4 steps"))),
])
def test_options_a_command_would_not_use_are_refused(command, options, named, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_synthetic_recipe(tmp_path / "r.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main([command, "-c", str(recipe), *options])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and named in err and "Traceback" not in err


@pytest.mark.parametrize(("command", "given"), [
    ("unlearn", ["-c", "a.yaml", "--requests", "b.csv"]), ("unlearn", ["-c", "a.yaml", "-c", "b.yaml"]),
    ("unlearn", ["--config=a.yaml", "--requests=b.csv"]), ("unlearn", ["-ca.yaml", "--requests", "b.csv"]),
    ("compare", ["-c", "a.yaml", "--deletion.requests_file", "b.csv"]), ("compare", ["-c", "dotted.yaml", "--deletion.requests_file", "b.csv"]),
])
def test_request_files_given_by_a_config_and_again_are_refused(command, given, tmp_path, capsys, monkeypatch):
    """jsonargparse keeps the last request file of the configs and the command line: the others' deletions would not be applied."""
    monkeypatch.chdir(tmp_path)
    recipe = write_synthetic_recipe(tmp_path / "r.yaml")
    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text(f"requests: {name}.csv\n" if command == "unlearn" else f"deletion: {{requests_file: {name}.csv}}\n")
    (tmp_path / "dotted.yaml").write_text("deletion.requests_file: a.csv\n")  # jsonargparse reads a dotted key too
    options = ["--ckpt_path", "x.ckpt", "--method", "FineTune"] if command == "unlearn" else []
    with pytest.raises(SystemExit) as exit_info:
        main([command, "-c", str(recipe), *given, *options])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "request files were given 2 times" in err and ".yaml" in err


def test_a_requests_file_given_as_a_config_is_refused_without_its_ids(tmp_path, capsys, monkeypatch):
    """jsonargparse's own error printed the file's content ("Unexpected config: user\\n987654"): a raw id on stderr."""
    monkeypatch.chdir(tmp_path)
    recipe = write_synthetic_recipe(tmp_path / "r.yaml")
    (tmp_path / "one.csv").write_text("user\n987654\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "-c", str(recipe), "-c", "one.csv", "--ckpt_path", "x.ckpt", "--method", "FineTune"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "-c one.csv is not a configuration" in captured.err
    assert "987654" not in captured.err + captured.out


@pytest.mark.parametrize(("options", "named"), [
    ([], "predict needs --ckpt_path"), (["--ckpt_path", "x.ckpt", "--k", "0"], "predict needs k >= 1"),
])
def test_predict_refuses_an_untrained_model_and_no_recommendations(options, named, tmp_path, capsys):
    recipe = write_synthetic_recipe(tmp_path / "r.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "-c", str(recipe), *options])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and named in err and "Traceback" not in err


@pytest.mark.parametrize(("command", "options", "named"), [
    ("compare", ["--deletion.fraction", "1.5"], "error: DeletionSpec(fraction=...) must be in (0, 1), got 1.5"),
    ("compare", ["--k", "0"], "compare(k=...) must be an integer >= 1, got 0"),
    ("compare", ["--repeats", "0"], "compare(repeats=...) must be an integer >= 1, got 0"),
    ("compare", ["--methods+", "FineTune", "--methods+", "FineTune"], "compare needs distinct methods"),
    ("compare", ["--deletion.kind", "users", "--deletion.count", "30"], "deletes every one of the 30 users"),
    ("compare", ["--k", "0", "--trainer.logger", "pytorch_lightning.loggers.CSVLogger", "--trainer.logger.save_dir", "logs"],
     "compare(k=...) must be an integer >= 1"),  # refused before the logger writes anything
    ("compare", ["--out", "a_file"], "compare --out a_file is a file"),
    ("compare", ["--out", "a_file/inside"], "compare --out a_file/inside is below"),
    ("compare", ["--deletion.requests_file", "unknown.csv"], "unknown user id: '99999'"),  # before the original's fit
    ("unlearn", ["--ckpt_path", "x.ckpt", "--requests", "r.csv", "--method", "FineTune", "--out", "a_file"],
     "unlearn --out a_file is a file"),
    ("unlearn", ["--ckpt_path", "x.ckpt", "--requests", "r.csv", "--method", "FineTune", "--log_artifacts", "true"],
     "log_artifacts=true"),
    ("fit", ["--model.init_args.embedding_dim", "0"], "MF(embedding_dim=...) must be an integer >= 1"),
    pytest.param("fit", ["--trainer.accelerator", "gpu", "--trainer.devices", "1"], "the trainer options",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    ("fit", ["--trainer.max_epoch", "1"], "unrecognized arguments: --trainer.max_epoch"),  # a prefix is a typo
])
def test_a_mistake_in_the_options_is_a_message_not_a_traceback(command, options, named, tmp_path, capsys):
    """What the command was given and a class or check refuses: one paragraph on stderr, exit 2, before anything runs."""
    recipe = write_synthetic_recipe(tmp_path / "r.yaml")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "unknown.csv").write_text("user\n99999\n")
    with pytest.raises(SystemExit) as exit_info:
        main([command, "-c", str(recipe), *options])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and named in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.ckpt")) and not (tmp_path / "lightning_logs").exists()  # nothing ran
    assert not (tmp_path / "logs").exists()


class BuggyMF(MF):
    """A user's model with a bug in its constructor: torch raises a ValueError there."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        torch.nn.init.xavier_uniform_(torch.zeros(3))


def test_a_bug_in_a_user_s_class_keeps_its_traceback(tmp_path):
    """Only this package's own refusals become a one-line message: a ValueError from deeper down is a bug to debug."""
    recipe = write_synthetic_recipe(tmp_path / "r.yaml")
    with pytest.raises(ValueError, match="Fan in and fan out can not be computed"):
        main(["fit", "-c", str(recipe), "--model", "tests.test_cli.BuggyMF"])


def test_a_value_error_c_code_raises_on_a_call_from_the_package_is_a_bug_not_a_refusal():
    """The innermost frame is the package's in both cases: only a ``raise`` statement there is a refusal."""
    source = "def refuse():\n    raise ValueError('refused')\n\ndef call():\n    return int('not a number')\n"
    where: dict = {}
    exec(compile(source, str(cli_module._PACKAGE / "a_module.py"), "exec"), where)  # noqa: S102 - code that sits in the package
    for function, refused in ((where["refuse"], True), (where["call"], False)):
        with pytest.raises(ValueError) as caught:
            function()
        assert (cli_module._refused_here(caught.value) is caught.value) is refused


def test_a_checkpoint_is_refused_for_another_model_class_and_predict_for_a_folder(tmp_path, capsys):
    recipe = write_synthetic_recipe(tmp_path / "r.yaml")
    main(["fit", "-c", str(recipe), "--trainer.max_epochs", "1", "--trainer.enable_checkpointing", "true",
          "--trainer.default_root_dir", str(tmp_path)])
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    capsys.readouterr()
    lightgcn = write_synthetic_recipe(tmp_path / "g.yaml").read_text().replace("models.MF", "models.LightGCN")
    (tmp_path / "g.yaml").write_text(lightgcn)
    with pytest.raises(SystemExit):
        main(["test", "-c", str(tmp_path / "g.yaml"), "--ckpt_path", str(checkpoint)])
    assert "holds a lightning_unlearn.models.MF model, and the config builds a lightning_unlearn.models.LightGCN" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", "-c", str(recipe), "--ckpt_path", str(checkpoint), "--out", str(tmp_path)])
    assert f"predict --out {tmp_path} is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["validate", "test"])
@pytest.mark.parametrize("ckpt_path", ["best", "last", "no/such.ckpt", None])
def test_evaluating_needs_a_checkpoint_file(command, ckpt_path, tmp_path, capsys):
    """Lightning would raise a raw error for ``best`` and evaluate the untrained model for a ``last`` it cannot find,
    or without --ckpt_path. The refusal comes before the logger records the command's configuration: it leaves no run behind."""
    recipe = write_synthetic_recipe(tmp_path / "r.yaml")
    logger = ["--trainer.logger", "pytorch_lightning.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path / "logs")]
    with pytest.raises(SystemExit) as exit_info:
        main([command, "-c", str(recipe), *(["--ckpt_path", ckpt_path] if ckpt_path else []), *logger])
    assert exit_info.value.code != 0
    assert ("needs a checkpoint file" if ckpt_path else f"{command} needs --ckpt_path") in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_validate_finds_the_last_checkpoint_a_fit_saved(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    write_synthetic_recipe(recipe)
    saver = (f"{{class_path: pytorch_lightning.callbacks.ModelCheckpoint, init_args: {{dirpath: {tmp_path / 'ckpt'}, "
             f"save_last: true}}}}")
    text = recipe.read_text().replace("enable_checkpointing: false, ", "")
    recipe.write_text(text.replace("enable_progress_bar: false}", f"enable_progress_bar: false, callbacks: [{saver}]}}"))
    main(["fit", "-c", str(recipe)])
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    main(["validate", "-c", str(recipe), "--ckpt_path", "last"])  # found: validated, not refused
    assert "needs a checkpoint file" not in capsys.readouterr().err


def test_unknown_key_in_yaml_is_an_error(tmp_path, capsys):
    recipe = write_synthetic_recipe(tmp_path / "r.yaml", extra="extra_section: {a: 1}\n")
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(recipe)])
    assert "extra_section" in capsys.readouterr().err


def test_the_command_flushes_denormals(monkeypatch):
    """Denormal weights (an L2-decayed NeuMF branch) made a MovieLens-1M validation pass 17x slower."""
    calls = []
    monkeypatch.setattr("torch.set_flush_denormal", lambda mode: calls.append(mode) or True)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and calls == [True]


def test_console_script_help():
    """The usage line names every command, ``recipes`` too, with the recipe after the subcommand (before it is refused)."""
    result = subprocess.run([sys.executable, "-m", "lightning_unlearn.cli", "--help"], capture_output=True, text=True, check=True)
    usage = result.stdout.split("\n\n")[0]
    assert "{fit,validate,test,predict,unlearn,compare} [-c RECIPE]" in usage and "lightning-unlearn recipes {list,copy}" in usage
    fit = subprocess.run([sys.executable, "-m", "lightning_unlearn.cli", "fit", "--help"], capture_output=True, text=True, check=True)
    assert fit.stdout.startswith("usage: lightning-unlearn [options] fit ")  # a subcommand's own line, not the main one


def test_demo_recipes_differ_only_in_the_deletion_and_the_run_folder():
    """`make demo` runs part 2 from the model part 1 trained: sound only if they train the same way."""
    interactions, users = (yaml.safe_load(p.read_text()) for p in DEMO_RECIPES)
    for section in ("seed_everything", "model", "data", "methods"):
        assert interactions[section] == users[section], section
    assert interactions["trainer"]["max_epochs"] == users["trainer"]["max_epochs"]
    stopping = [next(c["init_args"] for c in r["trainer"]["callbacks"] if c["class_path"].endswith("EarlyStopping"))
                for r in (interactions, users)]
    assert stopping[0] == stopping[1]  # Retrain refits with the trainer's early stopping
    assert interactions["deletion"] == {"kind": "interactions", "fraction": 0.01, "seed": 0}
    assert users["deletion"] == {"kind": "users", "fraction": 0.01, "selection": "random", "seed": 0}
    assert interactions["data"]["source"] == {"class_path": "lightning_unlearn.data.MovieLens100K", "init_args": {"download": True}}
    # ... and like recipes/ml100k/mf.yaml, so the README's quality figures for it hold for the demo's model.
    base = yaml.safe_load((REPO / "recipes" / "ml100k" / "mf.yaml").read_text())
    assert interactions["model"] == base["model"] and stopping[0] == next(
        c["init_args"] for c in base["trainer"]["callbacks"] if c["class_path"].endswith("EarlyStopping"))
    assert {k: v for k, v in interactions["data"].items() if k != "source"} == {k: v for k, v in base["data"].items() if k != "source"}
    methods = [(m["class_path"].rsplit(".", 1)[1], m.get("init_args", {})) for m in interactions["methods"]]
    assert ("Retrain", {}) in methods and ("Retrain", {"seed": 1}) in methods and ("FineTune", {"epochs": 2, "lr": 1.0e-3}) in methods
    assert ("IFRU", {"k_hop": 0}) in methods and ("AltEraser", {"rounds": 1}) in methods


def test_make_demo_runs_both_demo_recipes_from_one_trained_model():
    plan = subprocess.run(["make", "-n", "demo", "-o", ".venv/bin/.installed"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    commands = [line for line in plan.replace("\\\n", " ").splitlines() if "lightning-unlearn compare" in line]
    assert [c.split("-c ")[1].split()[0] for c in commands] == [str(p.relative_to(REPO)) for p in DEMO_RECIPES]
    first = yaml.safe_load(DEMO_RECIPES[0].read_text())["trainer"]["callbacks"]
    checkpoint = next(c["init_args"] for c in first if c["class_path"].endswith("ModelCheckpoint"))
    assert f"--ckpt_path {checkpoint['dirpath']}/{checkpoint['filename']}.ckpt" in commands[1]
    assert all("--trainer.logger.init_args.offline=true" in c for c in commands)
    assert "wandb sync" in plan


class _MyCallback(UnlearningCallback):
    """A user's subclass: its inline requests are copied into the run's config files as much as the base class's."""


def test_the_config_checks_find_subclasses_by_import_and_unknown_classes_by_name():
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    assert _is_class(f"{__name__}._MyCallback", UnlearningCallback)
    assert _is_class("lightning_unlearn.unlearning.UnlearningCallback", UnlearningCallback)
    assert _is_class("pytorch_lightning.loggers.WandbLogger", WandbLogger)
    assert not _is_class("pytorch_lightning.loggers.CSVLogger", WandbLogger) and not _is_class(None, CSVLogger)
    assert _is_class("somewhere.not.importable.WandbLogger", WandbLogger)  # by name: the W&B settings still apply


def _lightning_ctrl_c():
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        sys.exit(1)  # as Lightning's Trainer ends one


@pytest.mark.parametrize(("stop", "status", "named"), [
    (SIGTERMException(), 143, "stopped by SIGTERM"), (KeyboardInterrupt(), 130, "stopped by an interrupt (Ctrl-C)"),
    (None, 130, "stopped by an interrupt (Ctrl-C)"),
])
def test_a_stopped_command_exits_non_zero_and_says_how_to_go_on(stop, status, named, monkeypatch, capsys):
    """Lightning ends a SIGTERM as a SystemExit of status 0: a scheduler's `compare ... && next` would go on."""
    def stopped(*args, **kwargs):
        if stop is None:
            _lightning_ctrl_c()
        raise stop

    monkeypatch.setattr(cli_module.LightningUnlearnCLI, "__init__", stopped)
    for command, kept in (("compare", "`compare --resume true` runs only the methods not measured"),
                          ("fit", "the unlearning folder's journal names the state to resume from"), ("predict", None)):
        with pytest.raises(SystemExit) as exit_info:
            main([command])
        err = capsys.readouterr().err
        assert exit_info.value.code == status and named in err, command
        assert (kept in err if kept else "What finished is kept" not in err) and ("compare" in err) == (command == "compare")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EPERM, errno.EACCES, errno.EROFS, errno.ENAMETOOLONG])
def test_a_file_system_refusal_is_one_paragraph_that_says_what_is_kept(code, monkeypatch, capsys):
    """A full disk, a file over the size limit (RLIMIT_FSIZE), a read-only file or file system: a message naming the file,
    not a traceback (review 35a #6)."""
    def refused(*args, **kwargs):
        raise OSError(code, os.strerror(code), "/srv/runs/unlearning/journal.jsonl")

    monkeypatch.setattr(cli_module.LightningUnlearnCLI, "__init__", refused)
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.startswith(f"lightning-unlearn: {os.strerror(code)} (/srv/runs/unlearning/journal.jsonl). What finished is kept")


def test_an_unknown_method_is_named_with_the_known_ones(tmp_path, capsys):
    import lightning_unlearn.unlearning as unlearning
    from lightning_unlearn.console import METHOD_NAMES
    from lightning_unlearn.unlearning.methods import Unlearner

    assert all(issubclass(getattr(unlearning, name), Unlearner) for name in METHOD_NAMES)
    recipe = write_synthetic_recipe(tmp_path / "r.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "-c", str(recipe), "--ckpt_path", "x.ckpt", "--requests", "r.csv", "--method", "IFRUU"])
    assert exit_info.value.code == 2 and "Methods by name: Retrain, FineTune, IFRU, AltEraser, SCIF" in capsys.readouterr().err


def test_the_step_cap_of_a_resumed_fit_is_not_counted_against_its_first_validation():
    """A fit resumed from a checkpoint goes on from its steps, on fewer rows once its removals are applied (after this
    check): its max_steps cannot be compared with the batches of the data as loaded, so it is not refused for them."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EarlyStopping

    from lightning_unlearn.cli import _refuse_early_stopping_without_validation
    from lightning_unlearn.console import OptionRefused
    from lightning_unlearn.data import RecDataModule, Synthetic

    dm = RecDataModule(Synthetic(num_users=30, num_items=20), batch_size=8, val_fraction=0.2)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False, callbacks=[EarlyStopping("val/ndcg@20", mode="max")])
    _refuse_early_stopping_without_validation(trainer, dm, resumed=True)
    with pytest.raises(OptionRefused, match="--trainer.max_steps=2 ends the fit before its first validation"):
        _refuse_early_stopping_without_validation(trainer, dm, resumed=False)
