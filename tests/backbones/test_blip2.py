"""Blip2Backbone on a tiny random ``Blip2ForConditionalGeneration`` (8-layer OPT) saved with ``save_pretrained``.

Checks the OPT ``fc2`` / ``language_projection`` paths in transformers 5.x, the query-token image positions
(and the guard against BLIP-2 silently accepting fewer), text-only queries, and which positions keys come from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from more_lightning.backbones.blip2 import BLIP2_VQA_TEMPLATE, Blip2Backbone, FlatRowInputs
from more_lightning.data.records import Query
from more_lightning.data.schema import load_image
from more_lightning.keys import KeyCapture
from tests.conftest import MMEDIT
from tests.tiny_models import BLIP2_QUERY_TOKENS, BLIP2_TEXT_LAYERS, save_tiny_blip2


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are overhead-bound; one thread avoids oversubscribing the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_blip2(tmp_path_factory.mktemp("tiny_blip2"))


@pytest.fixture(scope="module")
def loaded(blip2_dir: Path):
    backbone = Blip2Backbone(str(blip2_dir))
    model, processor = backbone.load()
    return backbone, model, processor


def _image_query(prompt: str = "what color is the bus?") -> Query:
    return Query(prompt, "blue", load_image(MMEDIT / "coco" / "val2014" / "COCO_val2014_000000000001.jpg"))


def test_edit_points_are_opt_fc2_of_the_last_layers_and_the_language_projection(loaded) -> None:
    backbone, model, _ = loaded
    points = backbone.edit_points(model)
    n = BLIP2_TEXT_LAYERS
    assert backbone.num_layers(model) == n
    assert [p.path for p in points] == [f"language_model.model.decoder.layers.{i}.fc2" for i in range(n - 7, n)] + [
        "language_projection"
    ]
    assert [p.modality for p in points] == ["text"] * 7 + ["image"]
    layers = model.language_model.model.decoder.layers
    for i, point in zip(range(n - 7, n), points, strict=False):
        module = model.get_submodule(point.path)
        assert module is layers[i].fc2  # OPT's FFN output projection: ffn_dim -> hidden
        assert (module.in_features, module.out_features) == (model.config.text_config.ffn_dim, 32)
    projector = model.get_submodule("language_projection")
    assert projector.in_features == model.config.qformer_config.hidden_size
    assert projector.out_features == model.config.text_config.hidden_size


def test_image_positions_are_the_query_tokens(loaded) -> None:
    backbone, model, processor = loaded
    inputs = backbone.encode(processor, _image_query(), model.config.image_token_id)
    assert isinstance(inputs, FlatRowInputs)
    assert int(inputs.image_mask.sum()) == BLIP2_QUERY_TOKENS * 1  # one image
    assert inputs.image_mask[0, :BLIP2_QUERY_TOKENS].all()  # BLIP-2 puts them first, before BOS
    assert (inputs.labels[inputs.image_mask] == -100).all()
    assert isinstance(inputs.to("cpu", torch.float32), FlatRowInputs)  # survives .to()
    text = processor.tokenizer.decode(inputs.input_ids[0, BLIP2_QUERY_TOKENS:], skip_special_tokens=True)
    assert text.startswith("question")  # the E-VQA template (word-level tokenizer lower-cases)


def test_blip2_silently_accepts_fewer_image_tokens_so_encode_refuses_them(loaded) -> None:
    backbone, model, processor = loaded
    image_token = model.config.image_token_id
    good = backbone.encode(processor, _image_query(), image_token)
    short_ids = good.input_ids[:, 2:]  # drop two of the four query-token placeholders
    with torch.no_grad():  # the transformers model itself does not complain
        model(input_ids=short_ids, pixel_values=good.pixel_values)
    extra = Blip2Backbone(backbone.path, template="<image> " + BLIP2_VQA_TEMPLATE)
    with pytest.raises(ValueError, match="needs exactly num_query_tokens=4"):
        extra.encode(processor, _image_query(), image_token)


def test_processor_without_num_query_tokens_is_fixed_at_load(tmp_path: Path) -> None:
    folder = save_tiny_blip2(tmp_path / "old_processor", processor_query_tokens=None)
    backbone = Blip2Backbone(str(folder))
    model, processor = backbone.load()
    assert processor.num_query_tokens == BLIP2_QUERY_TOKENS
    inputs = backbone.encode(processor, _image_query(), model.config.image_token_id)
    assert int(inputs.image_mask.sum()) == BLIP2_QUERY_TOKENS


def test_processor_model_query_token_mismatch_is_an_error(tmp_path: Path) -> None:
    folder = save_tiny_blip2(tmp_path / "mismatch", processor_query_tokens=2)
    with pytest.raises(ValueError, match="processor num_query_tokens=2 but the model has num_query_tokens=4"):
        Blip2Backbone(str(folder)).load()


def test_config_without_image_token_is_a_clear_error(loaded) -> None:
    backbone, model, processor = loaded
    model.config.image_token_id = None  # an old snapshot's config.json has no image_token_index
    try:
        with pytest.raises(ValueError, match="has no image_token_index"):
            backbone.image_token_id(processor, model)
    finally:
        model.config.image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")


def test_text_only_queries_run_the_language_model(loaded) -> None:
    backbone, model, processor = loaded
    inputs = backbone.encode(processor, Query("who wrote moby dick", "herman melville"), model.config.image_token_id)
    assert inputs.pixel_values is None and int(inputs.image_mask.sum()) == 0
    with torch.no_grad():
        logits = backbone.logits(model, inputs)
    assert logits.shape == (*inputs.input_ids.shape, model.config.text_config.vocab_size)


def test_projector_keys_use_query_positions_and_text_keys_text_positions(loaded) -> None:
    backbone, model, processor = loaded
    inputs = backbone.encode(processor, _image_query(), model.config.image_token_id)
    text_path, image_path = "language_model.model.decoder.layers.7.fc2", "language_projection"
    modules = {
        text_path: (model.get_submodule(text_path), "text"),
        image_path: (model.get_submodule(image_path), "image"),
    }
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        modules[p][0].register_forward_hook(lambda m, a, o, p=p: seen.__setitem__(p, a[0].detach())) for p in modules
    ]
    rows = KeyCapture(modules, pool=False)
    with rows.record(inputs.positions("text")), torch.no_grad():
        model(**inputs.model_kwargs())
    for h in hooks:
        h.remove()
    keys = rows.keys()
    # OPT feeds fc2 flat (B·T, d) rows; FlatRowInputs' masks follow that row order
    assert seen[text_path].shape[0] == inputs.input_ids.numel()
    assert keys[text_path].shape[0] == int(inputs.text_mask.sum()) == inputs.input_ids.shape[1] - BLIP2_QUERY_TOKENS
    torch.testing.assert_close(keys[text_path], seen[text_path][inputs.text_mask.reshape(-1)])
    # language_projection sees the Q-Former outputs: one row per query token, i.e. per image position
    assert keys[image_path].shape[0] == int(inputs.image_mask.sum()) == BLIP2_QUERY_TOKENS
    torch.testing.assert_close(keys[image_path], seen[image_path].reshape(BLIP2_QUERY_TOKENS, -1))


def test_missing_checkpoint_says_what_to_download_and_which_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        Blip2Backbone(str(tmp_path / "blip2-opt-2.7b")).load()
    message = str(err.value)
    assert "huggingface-cli download Salesforce/blip2-opt-2.7b" in message
    assert "--model.backbone.init_args.path" in message
