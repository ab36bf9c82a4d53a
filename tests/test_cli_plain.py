"""The CLI speaks plainly: configs found by name, a missing one named in one line, --help says what it is."""

import subprocess
import sys
from pathlib import Path

import pytest

import cli

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
