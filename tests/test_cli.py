"""Tests of the ``python -m maskrcnn`` command line as a whole: numeric
options range-checked at parse time, help text with a default for every
option, train's output folder on --resume, the demo's explained "n/a"
metrics, and ``python -m benchmarks`` writing outside the source tree.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import pytest
import torch

from maskrcnn.cli import build_parser, main, train_output_folder
from maskrcnn.demo import format_metrics_explained
from maskrcnn.engine import CHECKPOINT_NAME
from maskrcnn.presets import MODEL_PRESETS, SHAPES_TRAINING, SMALL, model_preset

REPO = Path(__file__).resolve().parent.parent
PREDICT = ["predict", "photo.png", "--weights", "w.pt", "--out", "out"]
EVALUATE = ["evaluate", "--weights", "w.pt"]

BAD_VALUES = [
    (PREDICT, "--score-threshold", "2", "must be a number in [0, 1]"),
    (PREDICT, "--score-threshold", "-1", "must be a number in [0, 1]"),
    (PREDICT, "--mask-threshold", "5", "must be a number in [0, 1]"),
    (PREDICT, "--mask-threshold", "nan", "must be a number in [0, 1]"),
    (PREDICT, "--min-size", "0", "must be an integer >= 32"),
    (PREDICT, "--max-size", "8", "must be an integer >= 32"),
    (PREDICT, "--batch-size", "0", "must be an integer >= 1"),
    (PREDICT, "--batch-size", "1.5", "not an integer"),
    (["train"], "--iterations", "0", "must be an integer >= 1"),
    (["train"], "--epochs", "-2", "must be an integer >= 1"),
    (["train"], "--batch-size", "0", "must be an integer >= 1"),
    (["train"], "--lr", "0", "must be a number > 0"),
    (["train"], "--lr", "inf", "must be a number > 0"),
    (["train"], "--lr", "fast", "not a number"),
    (["train"], "--warmup", "-1", "must be an integer >= 0"),
    (["train"], "--weight-decay", "-0.1", "must be a number >= 0"),
    (["train"], "--max-grad-norm", "-1", "must be a number >= 0"),
    (["train"], "--checkpoint-every", "0", "must be an integer >= 1"),
    (["train"], "--workers", "-1", "must be an integer >= 0"),
    (["train"], "--seed", "-1", "must be an integer from 0 to 4294967295"),
    (["train"], "--shapes-images", "0", "must be an integer >= 1"),
    (["train"], "--shapes-seed", str(2**40), "must be an integer from 0 to 4294967295"),
    (["train"], "--image-size", "16", "must be an integer >= 32"),
    (EVALUATE, "--batch-size", "0", "must be an integer >= 1"),
    (EVALUATE, "--workers", "-3", "must be an integer >= 0"),
    (["demo"], "--iterations", "0", "must be an integer >= 1"),
]


@pytest.mark.parametrize("command, option, value, message", BAD_VALUES,
                         ids=[f"{c[0]}{o}={v}" for c, o, v, _ in BAD_VALUES])
def test_numeric_options_are_range_checked(command, option, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, option, value])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: usage lines, then the one error line
    assert last == f"python -m maskrcnn {command[0]}: error: argument {option}: {message}, got {value}" \
        or (message == "not a number" and last.endswith(f"argument {option}: not a number: {value!r}")) \
        or (message == "not an integer" and last.endswith(f"argument {option}: not an integer: {value!r}"))


def test_accepted_edge_values():
    parser = build_parser()
    args = parser.parse_args([*PREDICT, "--score-threshold", "0", "--mask-threshold", "1", "--min-size", "32"])
    assert args.score_threshold == 0.0 and args.mask_threshold == 1.0 and args.min_size == 32
    args = parser.parse_args(["train", "--warmup", "0", "--weight-decay", "0", "--max-grad-norm", "0", "--lr", "1e-5"])
    assert args.warmup == 0 and args.weight_decay == 0.0 and args.lr == 1e-5


def subcommands(parser: argparse.ArgumentParser):
    (choices,) = [action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return choices.items()


def test_every_option_has_help_with_its_default():
    """Each option of each command explains itself and states its default
    ("default: ..." appended, or said in the text); flags default to off,
    required options (alone or one of a required group) say so."""
    for name, parser in subcommands(build_parser()):
        formatter = parser._get_formatter()
        in_required_group = {id(action) for group in parser._mutually_exclusive_groups if group.required
                             for action in group._group_actions}
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            option = f"{name} {action.option_strings[0]}"
            assert action.help, f"{option} has no help text"
            text = formatter._get_help_string(action) % dict(default=action.default)
            if isinstance(action, argparse._StoreTrueAction):
                continue
            required = action.required or id(action) in in_required_group
            assert "default" in text or (required and "required" in text), f"{option}: {text!r}"
        assert "default: " in parser.format_help()  # appended texts render


def test_weight_decay_help_states_default():
    text = " ".join(subcommand_help("train").split())
    assert "--weight-decay WEIGHT_DECAY weight decay of convolution and linear weights" in text
    assert "(default: 0.0001)" in text


def test_train_and_demo_defaults_are_the_presets():
    """train's and demo's defaults are read from maskrcnn.presets (the demo
    trains with the same recipe), and --config offers every model preset."""
    parser = build_parser()
    train = parser.parse_args(["train"])
    recipe = SHAPES_TRAINING
    assert (train.batch_size, train.lr, train.warmup, train.weight_decay, train.max_grad_norm) == (
        recipe.batch_size, recipe.learning_rate, recipe.warmup_iterations, recipe.weight_decay, recipe.max_grad_norm)
    assert train.optimizer is None and f"default: {recipe.optimizer}" in " ".join(subcommand_help("train").split())
    assert train.shapes_images == recipe.iterations * recipe.batch_size and train.config == SMALL.name
    assert parser.parse_args(["demo"]).iterations == recipe.iterations
    for preset in MODEL_PRESETS:
        assert parser.parse_args(["train", "--config", preset.name]).config == preset.name
        assert model_preset(preset.name) is preset


def subcommand_help(command: str) -> str:
    (parser,) = [parser for name, parser in subcommands(build_parser()) if name == command]
    return parser.format_help()


def test_train_output_folder_on_resume():
    parser = build_parser()
    assert train_output_folder(parser.parse_args(["train"])) == Path("train_out")
    assert train_output_folder(parser.parse_args(["train", "--resume", "runs/x/last.pt"])) == Path("runs/x")
    assert train_output_folder(parser.parse_args(["train", "--resume", "runs/x/last.pt", "--out", "y"])) == Path("y")


def test_resume_without_out_continues_in_the_checkpoint_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = ["--image-size", "64", "--batch-size", "2", "--shapes-images", "8", "--device", "cpu"]
    run = tmp_path / "runs" / "x"
    assert main(["train", *tiny, "--iterations", "1", "--out", str(run)]) == 0
    assert main(["train", *tiny, "--iterations", "2", "--resume", str(run / CHECKPOINT_NAME)]) == 0
    assert f"checkpoint: {run / CHECKPOINT_NAME}" in capsys.readouterr().out
    assert torch.load(run / CHECKPOINT_NAME, weights_only=True)["training"]["iteration"] == 2
    assert not (tmp_path / "train_out").exists()


def test_train_with_one_seed_trains_one_model(tmp_path):
    """--seed fixes the initial weights as well as the data order: two runs
    agree bit for bit, another seed gives other weights."""
    tiny = ["--image-size", "64", "--batch-size", "2", "--shapes-images", "4", "--device", "cpu",
            "--iterations", "1", "--no-adapt-threads"]
    weights = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert main(["train", *tiny, "--seed", seed, "--out", str(tmp_path / name)]) == 0
        weights[name] = torch.load(tmp_path / name / CHECKPOINT_NAME, weights_only=True)["model"]
    assert weights["a"].keys() == weights["c"].keys()
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not all(torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])


def test_output_paths_that_are_files_are_one_line_errors(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("x")
    assert main(["train", "--out", str(taken), "--iterations", "1", "--device", "cpu"]) == 1
    assert capsys.readouterr().err == f"error: --out {taken} is a file, not a folder\n"
    assert main(["demo", "--out", str(taken / "demo"), "--iterations", "1", "--device", "cpu"]) == 1
    assert capsys.readouterr().err == f"error: --out {taken / 'demo'}: {taken} is a file, not a folder\n"
    assert main(["evaluate", "--weights", str(tmp_path / "w.pt"), "--out", str(tmp_path), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {tmp_path} is a folder; give a file name") and err.count("\n") == 1


def test_nan_metrics_are_explained():
    metrics = {kind: dict(AP=0.5, AP50=0.75, AP75=0.5, APs=0.25, APm=0.5, APl=math.nan) for kind in ("bbox", "segm")}
    text = format_metrics_explained(metrics)
    assert "nan" not in text
    lines = text.splitlines()
    assert lines[1].split() == ["box", "0.500", "0.750", "0.500", "0.250", "0.500", "n/a"]
    assert lines[-1] == "APl n/a: no ground-truth object is large (area above 96x96 pixels)"
    metrics["bbox"]["APl"] = metrics["segm"]["APl"] = 0.125
    assert "n/a" not in format_metrics_explained(metrics)


def test_benchmarks_write_outside_the_tree_unless_told(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # plain `pytest` does not put the repository on the path
    from benchmarks.__main__ import default_out, main as benchmarks_main

    out = default_out({"device_name": "NVIDIA H200"})
    try:
        assert out.is_dir() and not list(out.iterdir())
        assert out.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
        assert not out.resolve().is_relative_to(REPO)
        assert "nvidia-h200" in out.name
    finally:
        out.rmdir()
    with pytest.raises(SystemExit):
        benchmarks_main(["--repeats", "0"])
    assert "argument --repeats: must be an integer >= 1, got 0" in capsys.readouterr().err
