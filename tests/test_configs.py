"""Every shipped config parses against the classes it names (without loading any weights)."""

from pathlib import Path

import pytest

import cli

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_parses_and_starts_with_its_launch_command(config, capsys):
    first = config.read_text().splitlines()[0]
    assert first.startswith("# python cli.py fit --config configs/"), f"{config.name}: first line must be its command"
    assert config.name in first
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path" in printed
