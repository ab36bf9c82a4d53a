"""Pretraining feeds the model exactly what the engine will: same ids, labels and pixels."""

import random

import torch

from more_lightning.backbones.llava import LlavaBackbone
from more_lightning.data.records import Query
from more_lightning.world.knowledge import build_knowledge
from more_lightning.world.pretrain import (
    DEFAULT_MIX,
    IGNORE,
    Encoder,
    PretrainDataModule,
    close_distractor_scene,
    pixel_values,
    sample_examples,
)
from more_lightning.world.questions import make_vqa
from more_lightning.world.scenes import render, sample_scene
from more_lightning.world.tiny_llava import TinyLlavaSpec, build_processor


def _datamodule() -> PretrainDataModule:
    return PretrainDataModule(num_entities=20, batch_size=8, vision_batch_size=4, vision_steps=1)


def test_pixel_values_equal_the_processor():
    dm = _datamodule()
    image = render(sample_scene(random.Random(0)), jitter=True, seed=1)
    expected = dm.processor(text="<image>", images=image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(pixel_values(image), expected)


def test_encoder_matches_the_backbone_encoding_plus_eos():
    dm = _datamodule()
    encoder, backbone = Encoder(dm.processor), LlavaBackbone(path="unused")
    rng, facts = random.Random(0), build_knowledge(20)
    for _ in range(30):
        scene, examples = sample_examples(rng, facts, DEFAULT_MIX)
        _, prompt, target = examples[-1]
        image = render(scene) if scene is not None else None
        ref = backbone.encode(dm.processor, Query(prompt, target, image), encoder.image_token_id)
        ids, labels = encoder(prompt, target, image is not None)
        eos = dm.tokenizer.eos_token_id
        assert ids == [*ref.input_ids[0].tolist(), eos]
        assert labels == [*ref.labels[0].tolist(), eos]


def test_stream_is_deterministic_and_staged():
    first = iter(_datamodule().train_dataloader())
    second = iter(_datamodule().train_dataloader())
    a0, a1, _b0, b1 = next(first), next(first), next(second), next(second)
    assert "input_ids" not in a0  # stage 1: vision only
    for key in a1:
        torch.testing.assert_close(a1[key], b1[key])
    n_images = (a1["input_ids"] == Encoder(_datamodule().processor).image_token_id).any(1).sum()
    assert a1["pixel_values"].shape[0] == n_images
    assert ((a1["labels"] != IGNORE).sum(1) >= 2).all()  # answer + </s>


def test_processor_spec_matches_pixels():
    spec = TinyLlavaSpec()
    processor = build_processor(_datamodule().tokenizer, spec)
    assert processor.image_processor.crop_size["height"] == spec.image_size


def test_close_distractor_scenes_share_an_attribute_and_have_a_referent():
    rng = random.Random(0)
    for _ in range(200):
        scene = close_distractor_scene(rng)
        pairs = [(o.colour, o.shape) for o in scene.objects]
        assert 2 <= scene.count() <= 3
        assert len({c for c, _ in pairs}) < len(pairs) or len({s for _, s in pairs}) < len(pairs)
        item = make_vqa(scene, "position", rng)  # a referent named by colour + shape exists ...
        assert item is not None
        referent = next(o for o in scene.objects if o.position == item.answer)
        assert pairs.count((referent.colour, referent.shape)) == 1  # ... and is unique
