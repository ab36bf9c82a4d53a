"""The shipped real-backbone configs, run unchanged except for paths, horizon and log folder.

Tiny random LLaVA / BLIP-2 checkpoints (the real transformers classes) stand in for LLaVA-1.5-7B and
BLIP-2-OPT-2.7B, and ``tests/fixtures/mmedit`` (the MMEdit layout: ``val2014/`` and
``val2014_image_rephrase/`` under separate roots) stands in for the MMEdit files. Each config runs a
3-edit stream through ``cli.py fit`` and must write a complete ``metrics.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import cli
from tests.conftest import MMEDIT
from tests.tiny_models import save_tiny_blip2, save_tiny_llava

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
REAL = {
    # config: (family, fixture data file)
    "llava_eic": ("llava", "caption_eval_edit.json"),
    "llava_evqa": ("llava", "vqa_eval.json"),
    "llava_eic_public": ("llava", "caption_eval_edit.json"),
    "blip2_eic": ("blip2", "caption_eval_edit.json"),
    "blip2_evqa": ("blip2", "vqa_eval.json"),
}
LLAVA_DOWN = "model.language_model.layers.{i}.mlp.down_proj"
LLAVA_UP = "model.language_model.layers.{i}.mlp.up_proj"
LLAVA_PROJECTOR = ["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"]
OPT_FC2 = "language_model.model.decoder.layers.{i}.fc2"
EXPECTED_POINTS = {  # tiny LLaVA: 12 layers; tiny BLIP-2: 8 layers
    "llava_eic": [LLAVA_DOWN.format(i=i) for i in range(5, 12)] + LLAVA_PROJECTOR,
    "llava_evqa": [LLAVA_DOWN.format(i=i) for i in range(5, 12)] + LLAVA_PROJECTOR,
    "llava_eic_public": [t.format(i=i) for i in range(12) for t in (LLAVA_DOWN, LLAVA_UP)] + LLAVA_PROJECTOR,
    "blip2_eic": [OPT_FC2.format(i=i) for i in range(1, 8)] + ["language_projection"],
    "blip2_evqa": [OPT_FC2.format(i=i) for i in range(1, 8)] + ["language_projection"],
}
SCORES = ("rel", "t_gen", "m_gen", "t_loc", "m_loc", "avg")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are overhead-bound; one thread avoids oversubscribing the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "llava": save_tiny_llava(tmp_path_factory.mktemp("llava-1.5-7b-hf")),
        "blip2": save_tiny_blip2(tmp_path_factory.mktemp("blip2-opt-2.7b")),
    }


def _load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def _path_args(checkpoint: Path, data_file: str, save_dir: Path) -> list[str]:
    return [
        "--model.init_args.backbone.init_args.path", str(checkpoint),
        "--data.init_args.data_file", str(MMEDIT / data_file),
        "--data.init_args.image_root", str(MMEDIT / "coco"),
        "--data.init_args.rephrase_root", str(MMEDIT / "rephrase"),
        "--data.init_args.num_edits", "3",
        "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


def checked_header(name: str) -> tuple[dict, dict, dict, dict]:
    """The config ``name`` after checking its header (launch command, downloads, dtype, template, memory estimate);
    returns it and its backbone, editor and data ``init_args``."""
    text = (CONFIGS / f"{name}.yaml").read_text()
    assert text.startswith(f"# python cli.py fit --config configs/{name}.yaml\n")
    for needed in ("Download", "data/mmedit", "bfloat16", "Template", "estimate"):
        assert needed in text, f"{name}.yaml header lacks {needed!r}"
    config = _load(name)
    parts = (config["model"]["init_args"]["backbone"], config["model"]["init_args"]["editor"], config["data"])
    return config, *(part["init_args"] for part in parts)


@pytest.mark.parametrize("name", sorted(REAL))
def test_config_header_and_paper_settings(name: str) -> None:
    config, backbone, editor, data = checked_header(name)
    assert config["trainer"]["accelerator"] == "auto"
    assert backbone["dtype"] == "bfloat16" and backbone["path"].startswith("data/")
    assert data["num_edits"] == 100  # the paper's longest horizon (tables 1 and 4: 1, 10, 100)
    assert editor["alpha"] / editor["r"] == 2.0
    if name.startswith("llava"):
        assert (editor["r"], editor["eta"], editor["lam"]) == (512, 0.1, 2000.0)
        assert editor.get("image_eta") is None and editor.get("image_lam") is None  # shared with the projector
    else:
        assert (editor["r"], editor["eta"], editor["lam"]) == (128, 0.06, 5000.0)
        assert (editor["image_eta"], editor["image_lam"]) == (0.03, 20000.0)
    if name.endswith("_public"):
        assert (backbone["num_text_layers"], editor["top_k"], editor["steps_per_edit"]) == (12, 7, 5)
        assert (editor["prior"], editor["write_with"], editor["key_positions"]) == ("public", "previous", "target")
        assert backbone["extra_text_modules"] == [LLAVA_UP]
    else:
        assert backbone["num_text_layers"] == 7 and editor["steps_per_edit"] == 1
        assert (editor["prior"], editor["write_with"]) == ("paper", "current")


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_config_runs_a_3_edit_stream(name: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    family, data_file = REAL[name]
    run = cli.main(
        ["fit", "--config", str(CONFIGS / f"{name}.yaml"), *_path_args(checkpoints[family], data_file, tmp_path)]
    )
    module = run.model
    assert [p.path for p in module.edit_points] == EXPECTED_POINTS[name]
    assert str(module.model.dtype) == "torch.bfloat16"  # the config's dtype, loaded through Backbone.load
    # only the paths, the horizon and the log folder were overridden: everything else is the shipped config
    saved = yaml.safe_load((Path(run.trainer.logger.log_dir) / "config.yaml").read_text())["model"]["init_args"]
    shipped = _load(name)["model"]["init_args"]
    for part in ("editor", "backbone"):
        expected = {k: v for k, v in shipped[part]["init_args"].items() if k != "path"}
        assert {k: saved[part]["init_args"][k] for k in expected} == expected
        assert saved[part]["class_path"] == shipped[part]["class_path"]

    metrics = json.loads((Path(run.trainer.logger.log_dir) / "metrics.json").read_text())
    assert metrics["editor"] == "MORE"
    assert metrics["task"] == _load(name)["model"]["init_args"]["task"]
    assert metrics["num_edits"] == 3
    for phase in ("immediate", "retention"):
        assert set(metrics[phase]) == set(SCORES)
        assert all(0.0 <= metrics[phase][k] <= 100.0 for k in SCORES)
    assert set(metrics["locality_agreement"]) == {"t_loc", "m_loc"}
    assert set(metrics["exact_match"]["immediate"]) == {"rel", "t_gen", "m_gen"}
    assert metrics["seconds_per_edit"] > 0


@pytest.mark.parametrize("name", ["llava_eic", "blip2_evqa"])
def test_missing_checkpoint_names_the_download_and_the_key(name: str, tmp_path: Path) -> None:
    _, data_file = REAL[name]
    args = _path_args(tmp_path / "not-downloaded", data_file, tmp_path)
    with pytest.raises(Exception) as err:  # jsonargparse wraps the FileNotFoundError of Backbone.load
        cli.main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), *args])
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    message = "\n".join(chain)
    assert f"no checkpoint at '{tmp_path / 'not-downloaded'}'" in message
    assert "huggingface-cli download" in message and "--model.backbone.init_args.path" in message
