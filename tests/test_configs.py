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


PRESETS = sorted((Path(__file__).parent.parent / "configs" / "presets").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_editor_presets_are_one_override_away(preset, capsys):
    import yaml

    first = preset.read_text().splitlines()[0]
    assert first.startswith("# python cli.py fit --config configs/") and f"configs/presets/{preset.name}" in first
    command = first.removeprefix("# python cli.py ").split()
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    editor = printed["model"]["init_args"]["editor"]["init_args"]
    assert editor == {**editor, **yaml.safe_load(preset.read_text())["init_args"]}


def test_the_presets_are_the_paper_and_public_forms():
    import yaml

    forms = {p.stem: yaml.safe_load(p.read_text())["init_args"] for p in PRESETS}
    assert {k: forms["more_paper"][k] for k in ("prior", "write_with", "steps_per_edit")} == {
        "prior": "paper",
        "write_with": "current",
        "steps_per_edit": 1,
    }
    assert {k: forms["more_public"][k] for k in ("prior", "write_with", "steps_per_edit", "key_positions")} == {
        "prior": "public",
        "write_with": "previous",
        "steps_per_edit": 5,
        "key_positions": "target",
    }
