"""LlavaBackbone on a tiny random ``LlavaForConditionalGeneration`` saved with ``save_pretrained``.

Checks that the module-path templates name the intended modules in transformers 5.x, that image
positions are (image_size / patch)² per image, and that captured keys come from the right positions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from more_lightning.backbones.llava import LLAVA_FFN_UP, LlavaBackbone
from more_lightning.data.records import Query
from more_lightning.keys import KeyCapture
from tests.conftest import MMEDIT
from tests.tiny_models import LLAVA_SPEC, save_tiny_llava

IMAGE_TOKENS = (LLAVA_SPEC.image_size // LLAVA_SPEC.patch_size) ** 2


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are overhead-bound; one thread avoids oversubscribing the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava_12"))


@pytest.fixture(scope="module")
def loaded(llava_dir: Path):
    backbone = LlavaBackbone(str(llava_dir))
    model, processor = backbone.load()
    return backbone, model, processor


def _image_query() -> Query:
    from more_lightning.data.schema import load_image

    return Query(
        "what color is the bus?", "blue", load_image(MMEDIT / "coco" / "val2014" / "COCO_val2014_000000000001.jpg")
    )


def test_edit_points_are_the_ffn_outputs_of_the_last_layers_and_the_projector(loaded) -> None:
    backbone, model, _ = loaded
    points = backbone.edit_points(model)
    n = model.config.text_config.num_hidden_layers
    assert [p.path for p in points] == [f"model.language_model.layers.{i}.mlp.down_proj" for i in range(n - 7, n)] + [
        "model.multi_modal_projector.linear_1",
        "model.multi_modal_projector.linear_2",
    ]
    assert [p.modality for p in points] == ["text"] * 7 + ["image"] * 2
    # the paths resolve to the very modules transformers builds: Llama MLP down_proj and the projector
    layers = model.model.language_model.layers
    for i, point in zip(range(n - 7, n), points, strict=False):
        module = model.get_submodule(point.path)
        assert module is layers[i].mlp.down_proj
        assert (module.in_features, module.out_features) == (LLAVA_SPEC.text_intermediate, LLAVA_SPEC.text_hidden)
    projector = model.model.multi_modal_projector
    assert model.get_submodule(points[-2].path) is projector.linear_1
    assert model.get_submodule(points[-1].path) is projector.linear_2
    assert projector.linear_1.in_features == LLAVA_SPEC.vision_hidden
    assert projector.linear_2.out_features == LLAVA_SPEC.text_hidden


def test_public_variant_edits_up_and_down_projections_of_12_layers(llava_dir: Path, loaded) -> None:
    _, model, _ = loaded
    backbone = LlavaBackbone(str(llava_dir), num_text_layers=12, extra_text_modules=[LLAVA_FFN_UP])
    points = backbone.edit_points(model)
    text = [p.path for p in points if p.modality == "text"]
    assert len(text) == 24
    assert text[:2] == ["model.language_model.layers.0.mlp.down_proj", "model.language_model.layers.0.mlp.up_proj"]
    assert all(isinstance(model.get_submodule(p), nn.Linear) for p in text)


def test_too_many_layers_is_a_clear_error(llava_dir: Path, loaded) -> None:
    _, model, _ = loaded
    with pytest.raises(ValueError, match="num_text_layers=13 but the model has 12"):
        LlavaBackbone(str(llava_dir), num_text_layers=13).edit_points(model)


def test_image_mask_counts_image_tokens_per_image(loaded) -> None:
    backbone, model, processor = loaded
    inputs = backbone.encode(processor, _image_query(), backbone.image_token_id(processor, model))
    assert int(inputs.image_mask.sum()) == IMAGE_TOKENS * 1  # one image
    assert inputs.pixel_values.shape == (1, 3, LLAVA_SPEC.image_size, LLAVA_SPEC.image_size)
    assert (inputs.labels[inputs.image_mask] == -100).all()
    assert int(inputs.text_mask.sum()) == inputs.input_ids.shape[1] - IMAGE_TOKENS
    text_only = backbone.encode(processor, Query("who wrote moby dick", "melville"), model.config.image_token_id)
    assert int(text_only.image_mask.sum()) == 0 and text_only.pixel_values is None


def _full_inputs(model: nn.Module, paths: list[str], inputs) -> dict[str, torch.Tensor]:
    """Every input row each module sees in one forward (reference for the pooled keys)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: seen.__setitem__(p, a[0].detach()))
        for p in paths
    ]
    with torch.no_grad():
        model(**inputs.model_kwargs())
    for h in hooks:
        h.remove()
    return seen


def test_projector_keys_use_image_positions_and_text_keys_text_positions(loaded) -> None:
    backbone, model, processor = loaded
    inputs = backbone.encode(processor, _image_query(), model.config.image_token_id)
    points = backbone.edit_points(model)
    text_path, image_path = points[-3].path, points[-2].path  # last down_proj, projector linear_1
    modules = {p.path: (model.get_submodule(p.path), p.modality) for p in (points[-3], points[-2])}
    reference = _full_inputs(model, [text_path, image_path], inputs)

    rows = KeyCapture(modules, pool=False)
    with rows.record(inputs.positions("text")), torch.no_grad():
        model(**inputs.model_kwargs())
    keys = rows.keys()
    assert keys[image_path].shape[0] == int(inputs.image_mask.sum()) == IMAGE_TOKENS
    assert keys[text_path].shape[0] == int(inputs.text_mask.sum())
    torch.testing.assert_close(keys[text_path], reference[text_path][inputs.text_mask])
    # the projector's input is the vision features, one row per image token, never a text position
    torch.testing.assert_close(keys[image_path], reference[image_path].reshape(-1, LLAVA_SPEC.vision_hidden))

    pooled = KeyCapture(modules, pool=True)
    with pooled.record(inputs.positions("text")), torch.no_grad():
        model(**inputs.model_kwargs())
    torch.testing.assert_close(pooled.keys()[text_path], keys[text_path].mean(0, keepdim=True))
    everywhere = reference[text_path][inputs.attention_mask.bool()].mean(0, keepdim=True)
    assert not torch.allclose(pooled.keys()[text_path], everywhere)  # image positions are really left out


def test_missing_checkpoint_says_what_to_download_and_which_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        LlavaBackbone(str(tmp_path / "llava-1.5-7b-hf")).load()
    message = str(err.value)
    assert str(tmp_path / "llava-1.5-7b-hf") in message
    assert "huggingface-cli download llava-hf/llava-1.5-7b-hf" in message
    assert "--model.backbone.init_args.path" in message
