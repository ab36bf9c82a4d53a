"""benchmarks/study.py: every grid is settings its config accepts, and the choice rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import cli
from tests.conftest import benchmark_script

ROOT = Path(__file__).resolve().parents[1]
STUDY = benchmark_script("study")
split_values = benchmark_script("sweep").split_values
GRIDS = sorted(STUDY.GRIDS.items())


def _printed_config(capsys, config: str, overrides: list[str]) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(ROOT / config), *overrides, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _at(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("which", ["first", "last"])
@pytest.mark.parametrize(("key", "grid"), GRIDS, ids=[f"{t}-{e}-r{r}" for (t, e, r), _ in GRIDS])
def test_every_grid_value_is_a_setting_its_config_takes(key, grid, which, capsys):
    task, editor, _ = key
    config = STUDY.CONFIGS[editor].format(task=task)
    assert (ROOT / config).is_file()
    pick = 0 if which == "first" else -1
    chosen = {k: split_values(v)[pick] for k, v in (item.split("=", 1) for item in grid)}
    printed = _printed_config(capsys, config, [x for k, v in chosen.items() for x in (f"--{k}", v)])
    for dotted, value in chosen.items():
        given = value if "{" in value else yaml.safe_load(value)  # templates stay strings
        assert _at(printed, dotted) == given, f"{config}: {dotted}"


def test_ike_templates_survive_the_grid_split():
    ((_, templates),) = [item.split("=", 1) for item in STUDY.GRIDS[("evqa", "ike", 1)] if "demo_template" in item]
    assert tuple(split_values(templates)) == STUDY.IKE_TEMPLATES


def _row(landed: float, retention: float) -> dict:
    return {"retention_avg": retention, "metrics": {"exact_match": {"immediate": {"rel": landed}}}}


def test_the_choice_is_the_best_retention_among_settings_that_land():
    rows = [_row(10, 95.0), _row(60, 80.0), _row(90, 70.0)]
    assert STUDY.choose(rows, 50.0) is rows[1]  # the no-op-like first row does not land half its edits


def test_without_a_candidate_the_choice_is_the_one_that_lands_most():
    rows = [_row(10, 95.0), _row(30, 60.0), _row(30, 61.0)]
    assert STUDY.choose(rows, 50.0) is rows[2]


def test_a_setting_is_a_table_cell():
    cell = STUDY.short("demo_template={prompt} ASSISTANT: {target}</s>USER: \n|")
    assert "\n" not in cell and "<" not in cell and "|" not in cell.replace("\\|", "")


@pytest.mark.parametrize("name", sorted(STUDY.SERAC_NETWORKS))
def test_every_serac_training_of_the_grids_is_a_setting_of_its_config(name, capsys):
    overrides = [*STUDY.SERAC_NETWORKS[name], f"--{STUDY.T}.out_file", STUDY.serac_file(name)]
    printed = _printed_config(capsys, STUDY.SERAC_TRAIN, overrides)
    assert printed["model"]["init_args"]["out_file"] == STUDY.serac_file(name)
    assert str(printed["trainer"]["max_steps"]) in overrides


def test_every_serac_networks_file_a_grid_names_has_its_training():
    named = {
        value
        for (_, editor, _), grid in STUDY.GRIDS.items()
        if editor == "serac"
        for item in grid
        if ".networks=" in item
        for value in split_values(item.split("=", 1)[1])
    }
    assert named and named <= {STUDY.serac_file(n) for n in STUDY.SERAC_NETWORKS}
