"""The shipped real-backbone MEND configs: meta-training for 2 steps, then a 3-edit stream with the networks it wrote.

As ``test_real_configs.py``: tiny random LLaVA / BLIP-2 checkpoints (the real transformers classes) stand in for
LLaVA-1.5-7B and BLIP-2-OPT-2.7B and the MMEdit fixtures for the MMEdit files; only paths, horizon, steps and the
log folder are overridden.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import cli
from tests.conftest import networks_training_args
from tests.test_real_configs import CONFIGS, SCORES, _load, _path_args, checked_header, checkpoints  # noqa: F401

LLAVA_DOWN = {f"model.language_model.layers.{i}.mlp.down_proj" for i in range(9, 12)}
OPT_FC2 = {f"language_model.model.decoder.layers.{i}.fc2" for i in range(5, 8)}
WRITTEN = {"llava": LLAVA_DOWN, "blip2": OPT_FC2}
TRAIN_FILES = ("vqa_train.json", "caption_train_edit.json")


@pytest.mark.parametrize("family", sorted(WRITTEN))
def test_mend_configs_keep_mends_settings(family: str) -> None:
    _, backbone, editor, data = checked_header(f"{family}_evqa_mend")
    assert backbone["dtype"] == "bfloat16" and backbone["num_text_layers"] == 3 and data["num_edits"] == 100
    train = _load(f"{family}_mend_train")
    settings = train["model"]["init_args"]
    assert settings["out_file"] == editor["networks"]  # the stream loads what meta-training writes
    assert settings["backbone"] == _load(f"{family}_evqa_mend")["model"]["init_args"]["backbone"]
    assert {k: settings[k] for k in ("rank", "n_hidden", "share", "edit_lr", "lr", "lr_lr")} == {
        "rank": 1920, "n_hidden": 1, "share": True, "edit_lr": 1e-4, "lr": 1e-6, "lr_lr": 1e-4,
    }  # fmt: skip
    assert tuple(Path(f).name for f in train["data"]["init_args"]["train_files"]) == TRAIN_FILES


@pytest.mark.parametrize("family", sorted(WRITTEN))
def test_meta_training_then_a_3_edit_stream(family: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    networks = tmp_path / "mend.safetensors"
    config = CONFIGS / f"{family}_mend_train.yaml"
    cli.main(networks_training_args(config, checkpoints[family], networks, list(TRAIN_FILES), tmp_path))
    assert networks.is_file()
    args = ["fit", "--config", str(CONFIGS / f"{family}_evqa_mend.yaml")]
    args += [*_path_args(checkpoints[family], "vqa_eval.json", tmp_path)]
    run = cli.main([*args, "--model.init_args.editor.init_args.networks", str(networks)])
    assert set(run.model.editor.written_modules()) == WRITTEN[family]
    assert all(float(run.model.editor.delta_weight(m).norm()) > 0 for m in WRITTEN[family])
    metrics = json.loads((Path(run.trainer.logger.log_dir) / "metrics.json").read_text())
    assert (metrics["editor"], metrics["num_edits"]) == ("MEND", 3)
    assert set(metrics["immediate"]) == set(SCORES) and set(metrics["retention"]) == set(SCORES)
    saved = yaml.safe_load((Path(run.trainer.logger.log_dir) / "config.yaml").read_text())
    assert saved["model"]["init_args"]["editor"]["class_path"] == "more_lightning.editors.mend.MEND"


def test_a_stream_without_its_networks_is_one_message(checkpoints: dict[str, Path], tmp_path: Path, capsys) -> None:  # noqa: F811
    args = ["fit", "--config", str(CONFIGS / "llava_evqa_mend.yaml")]
    args += [*_path_args(checkpoints["llava"], "vqa_eval.json", tmp_path)]
    assert cli.run([*args, "--model.init_args.editor.init_args.networks", str(tmp_path / "none.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: MEND editor networks") and "mend_train.yaml" in err and "Traceback" not in err
