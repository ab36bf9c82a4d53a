"""The shipped real-backbone FT-M, AlphaEdit, GRACE, IKE and LiveEdit configs, run unchanged except for paths, horizon
and log folder (and LiveEdit's layer on the BLIP-2 stand-in, which has fewer language layers than it counts back).

As ``test_real_configs.py`` does for M-ORE: tiny random LLaVA / BLIP-2 checkpoints (the real transformers
classes) stand in for LLaVA-1.5-7B and BLIP-2-OPT-2.7B, the MMEdit fixtures for the MMEdit files (AlphaEdit's
retain keys from the fixture's train files); each config runs a 3-edit stream through ``cli.py fit``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import cli
from tests.conftest import MMEDIT
from tests.test_real_configs import CONFIGS, SCORES, _load, _path_args, checked_header, checkpoints  # noqa: F401
from tests.tiny_models import BLIP2_TEXT_LAYERS

LLAVA_PROJECTOR = {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"}
LLAVA_DOWN = {f"model.language_model.layers.{i}.mlp.down_proj" for i in range(5, 12)}
OPT_FC2 = {f"language_model.model.decoder.layers.{i}.fc2" for i in range(1, 8)}
BASELINES = {
    # config: (family, editor class, what the editor writes)
    "llava_evqa_ft_m": ("llava", "FTM", LLAVA_PROJECTOR),
    "blip2_evqa_ft_m": ("blip2", "FTM", {"language_projection"}),
    "llava_evqa_alphaedit": ("llava", "AlphaEdit", LLAVA_DOWN),
    "blip2_evqa_alphaedit": ("blip2", "AlphaEdit", OPT_FC2),
    # parameter-preserving: nothing is written
    "llava_evqa_grace": ("llava", "GRACE", set()),
    "blip2_evqa_grace": ("blip2", "GRACE", set()),
    "llava_evqa_ike": ("llava", "IKE", set()),
    "blip2_evqa_ike": ("blip2", "IKE", set()),
    "llava_evqa_liveedit": ("llava", "LiveEdit", set()),
    "blip2_evqa_liveedit": ("blip2", "LiveEdit", set()),
}
#: LiveEdit edits layer 21 of 32 (11 from the top); the tiny BLIP-2 stand-in has 8 language layers: its first, there.
SHALLOW_BLIP2 = [
    "--model.init_args.backbone.init_args.num_text_layers", str(BLIP2_TEXT_LAYERS),
    "--model.init_args.editor.init_args.layer", str(-BLIP2_TEXT_LAYERS),
]  # fmt: skip
RETAIN_FILES = [str(MMEDIT / "vqa_train.json"), str(MMEDIT / "caption_train_edit.json")]
RETAIN = [
    "--model.init_args.editor.init_args.retain_files", json.dumps(RETAIN_FILES),
    "--model.init_args.editor.init_args.image_root", str(MMEDIT / "coco"),
    "--model.init_args.editor.init_args.rephrase_root", str(MMEDIT / "rephrase"),
]  # fmt: skip


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_config_header_and_settings(name: str) -> None:
    _, backbone, editor, data = checked_header(name)
    assert backbone["dtype"] == "bfloat16" and data["num_edits"] == 100
    if name.endswith("liveedit"):  # LiveEdit's edit layer l_e = 21 of 32 and expert rank 4
        assert (backbone["num_text_layers"], editor["layer"], editor["rank"]) == (11, -11, 4)
    else:
        assert backbone["num_text_layers"] == 7
    if name.endswith("alphaedit"):  # AlphaEdit's own null-space threshold and L2; K0 from both train files
        assert (editor["nullspace_threshold"], editor["l2"]) == (0.02, 10.0)
        assert [Path(f).name for f in editor["retain_files"]] == ["vqa_train.json", "caption_train_edit.json"]


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_config_runs_a_3_edit_stream(name: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    family, editor, written = BASELINES[name]
    extra = RETAIN if editor == "AlphaEdit" else SHALLOW_BLIP2 if (editor, family) == ("LiveEdit", "blip2") else []
    args = [
        "fit",
        "--config",
        str(CONFIGS / f"{name}.yaml"),
        *_path_args(checkpoints[family], "vqa_eval.json", tmp_path),
    ]
    run = cli.main([*args, *extra])
    assert set(run.model.editor.written_modules()) == written
    assert all(float(run.model.editor.delta_weight(m).norm()) > 0 for m in written)
    metrics = json.loads((Path(run.trainer.logger.log_dir) / "metrics.json").read_text())
    assert (metrics["editor"], metrics["num_edits"]) == (editor, 3)
    assert set(metrics["immediate"]) == set(SCORES) and set(metrics["retention"]) == set(SCORES)
    assert (
        yaml.safe_load((Path(run.trainer.logger.log_dir) / "config.yaml").read_text())["model"]["init_args"]["editor"][
            "class_path"
        ]
        == _load(name)["model"]["init_args"]["editor"]["class_path"]
    )
