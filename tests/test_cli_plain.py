"""The CLI speaks plainly: configs found by name, user errors in one line with no run folder left behind,
--help says what it is, the progress bar counts edits."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli

from .conftest import MMEDIT
from .stream_helpers import stream_config

ROOT = Path(__file__).resolve().parents[1]


def test_a_config_name_is_looked_up_in_configs():
    resolved = cli.resolve_config_args(["fit", "--config", "tiny_llava_eic.yaml", "--data.init_args.num_edits", "2"])
    assert resolved[2] == str(ROOT / "configs" / "tiny_llava_eic.yaml")
    assert resolved[3:] == ["--data.init_args.num_edits", "2"]
    assert cli.resolve_config_args(["fit", "--config=tiny_llava_eic.yaml"])[1] == f"--config={resolved[2]}"
    existing = str(ROOT / "configs" / "tiny_llava_evqa.yaml")
    assert cli.resolve_config_args(["fit", "-c", existing]) == ["fit", "-c", existing]


def test_a_missing_config_is_one_line_naming_the_configs_folder(capsys):
    assert cli.run(["fit", "--config", "no_such_config.yaml"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_config.yaml not found" in err[0] and "configs" in err[0]
    with pytest.raises(FileNotFoundError):
        cli.resolve_config_args(["fit", "--config", "no_such_config.yaml"])


def test_help_says_what_the_project_is():
    out = subprocess.run([sys.executable, "cli.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "online (lifelong) editing of multimodal LLMs" in out.stdout
    assert "args parameter is intended" not in out.stderr
    assert "{fit,predict}" in out.stdout and "validate" not in out.stdout  # nothing an edit stream cannot honour


@pytest.fixture()
def config(tiny_llava_dir, tmp_path) -> Path:
    return stream_config(tmp_path / "stream.yaml", tiny_llava_dir, MMEDIT, num_edits=2)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _no_run_folder(tmp_path: Path) -> None:
    assert not list((tmp_path / "runs").glob("*/version_*")), list((tmp_path / "runs").rglob("*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model.init_args.editor.init_args.r", "0"],
            "r must be >= 1, got 0 (setting: model.init_args.editor.init_args.r)",
        ),
        (["--data.init_args.num_edits", "0"], "got 0 (setting: data.init_args.num_edits)"),
        (
            ["--model.init_args.backbone.init_args.num_text_layers", "9"],
            "model.init_args.backbone.init_args.num_text_layers",
        ),
        (["--model.init_args.editor.init_args.r", "abc"], "model.init_args.editor.init_args.r: expected int, got abc"),
        (["--model.init_args.editor.init_args.rank", "8"], "model.init_args.editor.init_args: Option 'rank' is not"),
        (["--data.init_args.num_edits", "50"], "data.init_args.num_edits is 50 but"),
    ],
    ids=["r-0", "num-edits-0", "num-text-layers", "r-not-int", "unknown-key", "num-edits-too-many"],
)
def test_an_invalid_setting_is_one_line_naming_it(config, tmp_path, capsys, args, message):
    assert cli.run(["fit", "--config", str(config), *args]) == 1
    assert message in _one_error_line(capsys)
    _no_run_folder(tmp_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.init_args.backbone.init_args.path", "no/such/model"], "no checkpoint at 'no/such/model'"),
        (["--data.init_args.data_file", "no_such.json"], "data file 'no_such.json' not found"),
        (["--data.init_args.image_root", "no_images"], "field 'image': image file not found"),
        (["--ckpt_path", "no_such.ckpt"], "checkpoint no_such.ckpt not found"),
        (["--model.init_args.load_edit_state", "no_such.safetensors"], "edit state 'no_such.safetensors' not found"),
    ],
    ids=["checkpoint", "data-file", "image-root", "ckpt-path", "edit-state"],
)
def test_a_missing_file_is_one_line_and_leaves_no_run_folder(config, tmp_path, capsys, args, message):
    assert cli.run(["fit", "--config", str(config), *args]) == 1
    assert message in _one_error_line(capsys)
    _no_run_folder(tmp_path)
    assert not (tmp_path / "runs").exists()  # nor the logger's parents this run created


def test_validate_and_test_are_not_offered(config, capsys):
    assert set(cli.EditCLI.subcommands()) == {"fit", "predict"}
    assert cli.run(["validate", "--config", str(config)]) == 1
    assert "invalid choice: 'validate' (choose from 'fit', 'predict')" in _one_error_line(capsys)


def test_the_command_line_shows_no_traceback_unless_debug_is_asked(config):
    command = [sys.executable, "cli.py", "fit", "--config", str(config), "--model.init_args.editor.init_args.r", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plain = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1].startswith("error: r must be >= 1")
    debug = subprocess.run([*command, "--debug"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "r must be >= 1" in debug.stderr


def test_the_progress_bar_counts_edits(config, capsys):
    cli.main(["fit", "--config", str(config), "--trainer.enable_progress_bar", "true"])
    out = capsys.readouterr().out
    assert "edit 2/2 100%" in out and "rel=" in out
    assert "v_num" not in out and "Epoch" not in out
