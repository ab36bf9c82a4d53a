"""The shipped real-backbone FT-M, AlphaEdit, GRACE, IKE, LiveEdit and SERAC configs, run unchanged except for paths,
horizon and log folder (LiveEdit's layer on the BLIP-2 stand-in, which has fewer language layers than it counts back;
SERAC's networks from its real training configs run for 2 steps on the stand-ins, a tiny random BERT for its
sentence encoder).

As ``test_real_configs.py`` does for M-ORE: tiny random LLaVA / BLIP-2 checkpoints (the real transformers
classes) stand in for LLaVA-1.5-7B and BLIP-2-OPT-2.7B, the MMEdit fixtures for the MMEdit files (AlphaEdit's
retain keys from the fixture's train files; SERAC's networks from its shipped training config, run for 2 steps on the
fixture's train files); each config runs a 3-edit stream through ``cli.py fit``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import cli
from tests.conftest import MMEDIT, networks_training_args
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
    "llava_evqa_serac": ("llava", "SERAC", set()),
    "blip2_evqa_serac": ("blip2", "SERAC", set()),
}
#: LiveEdit edits layer 21 of 32 (11 from the top); the tiny BLIP-2 stand-in has 8 language layers: its first, there.
SHALLOW_BLIP2 = [
    "--model.init_args.backbone.init_args.num_text_layers", str(BLIP2_TEXT_LAYERS),
    "--model.init_args.editor.init_args.layer", str(-BLIP2_TEXT_LAYERS),
]  # fmt: skip
TRAIN_FILES = ["vqa_train.json", "caption_train_edit.json"]
RETAIN_FILES = [str(MMEDIT / f) for f in TRAIN_FILES]
RETAIN = [
    "--model.init_args.editor.init_args.retain_files", json.dumps(RETAIN_FILES),
    "--model.init_args.editor.init_args.image_root", str(MMEDIT / "coco"),
    "--model.init_args.editor.init_args.rephrase_root", str(MMEDIT / "rephrase"),
]  # fmt: skip


@pytest.fixture(scope="module")
def serac_networks(
    checkpoints: dict[str, Path],  # noqa: F811
    tiny_bert_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    """Per family, SERAC networks written by the shipped ``<family>_serac_train.yaml`` after 2 steps, on the tiny BERT
    in place of data/bert-base-uncased."""
    folder = tmp_path_factory.mktemp("serac")
    files = {}
    for family, checkpoint in checkpoints.items():
        files[family] = folder / f"{family}_serac.safetensors"
        config, extra = CONFIGS / f"{family}_serac_train.yaml", ("--model.init_args.encoder", str(tiny_bert_dir))
        cli.main(networks_training_args(config, checkpoint, files[family], TRAIN_FILES, folder, *extra))
    return files


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
    if name.endswith("serac"):  # SERAC's threshold; the networks its training config writes, for this backbone
        assert editor["threshold"] == 0.5
        train = _load(name.replace("evqa_serac", "serac_train"))["model"]["init_args"]
        assert train["out_file"] == editor["networks"]
        assert train["encoder"] == "data/bert-base-uncased" and editor.get("encoder") is None  # the file records it
        assert train["backbone"] == _load(name)["model"]["init_args"]["backbone"]


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_config_runs_a_3_edit_stream(
    name: str,
    checkpoints: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    family, editor, written = BASELINES[name]
    extra = RETAIN if editor == "AlphaEdit" else SHALLOW_BLIP2 if (editor, family) == ("LiveEdit", "blip2") else []
    if editor == "SERAC":
        extra = ["--model.init_args.editor.init_args.networks", str(request.getfixturevalue("serac_networks")[family])]
    args = [
        "fit",
        "--config",
        str(CONFIGS / f"{name}.yaml"),
        *_path_args(checkpoints[family], "vqa_eval.json", tmp_path),
    ]
    run = cli.main([*args, *extra])
    if editor == "SERAC":  # the classifier on the encoder folder its networks file records
        assert run.model.editor.networks.encoder.folder == str(request.getfixturevalue("tiny_bert_dir"))
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
