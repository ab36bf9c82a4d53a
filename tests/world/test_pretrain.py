"""Pretraining feeds the model exactly what the engine will: same ids, labels and pixels."""

import random
from pathlib import Path

import lightning as L
import pytest
import torch

from more_lightning.backbones.llava import LlavaBackbone
from more_lightning.data.records import Query
from more_lightning.world.knowledge import build_knowledge
from more_lightning.world.pretrain import (
    DEFAULT_MIX,
    IGNORE,
    Encoder,
    PretrainDataModule,
    PretrainModule,
    confusable_scene,
    pixel_values,
    sample_examples,
)
from more_lightning.world.questions import MME_CATEGORIES, QTYPES, make_vqa, make_yes_no
from more_lightning.world.scenes import render, sample_scene
from more_lightning.world.tiny_llava import TinyLlavaSpec, build_model, build_processor


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


def test_confusable_scenes_share_attributes_and_still_have_referents():
    rng = random.Random(0)
    asked = 0
    for _ in range(200):
        scene = confusable_scene(rng)
        assert 2 <= scene.count() <= 5
        for attribute in ("shape", "colour", "pattern"):
            assert len({getattr(o, attribute) for o in scene.objects}) <= 2
        item = make_vqa(scene, "position", rng)
        if item is not None:
            asked += 1
            named = [o for o in scene.objects if all(getattr(o, a) == getattr(item.target, a) for a in item.named)]
            assert named == [item.target] and item.answer == item.target.position
    assert asked > 150


def test_the_object_ramp_starts_with_single_objects():
    dm = PretrainDataModule(num_entities=20, batch_size=8, vision_batch_size=2, vision_steps=0, object_ramp_steps=10)
    stream = dm.stream
    assert [stream._ramped(s).max_objects for s in (0, 1, 2, 4, 9, 10)] == [1, 1, 2, 3, 5, 5]
    assert stream._ramped(0).distractor_prob == 0.0 and stream._ramped(10) == stream.sampling


class _Trace(L.Callback):
    """Records the learning rate and AdamW's step count of one text parameter at every step."""

    def __init__(self) -> None:
        self.lrs, self.adam_steps, self.vision, self.images = [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])  # what this step uses
        self.vision.append("vision_pixels" in batch)
        self.images.append(int(batch["pixel_values"].shape[0]) if "pixel_values" in batch else None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        optimizer = trainer.optimizers[0]
        param = pl_module.model.lm_head.weight
        self.adam_steps.append(int(optimizer.state[param]["step"]) if param in optimizer.state else 0)


def test_fit_runs_three_stages_and_saves(tmp_path):
    dm = PretrainDataModule(
        num_entities=20, batch_size=4, vision_batch_size=2, vision_steps=2, restart_mix={"knowledge": 1.0}
    )
    module = PretrainModule(
        str(tmp_path / "model"), lr=1e-3, warmup_steps=2, restart_steps=3, restart_lr=5e-4, restart_warmup_steps=2
    )
    trace = _Trace()
    trainer = L.Trainer(
        max_steps=9, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[trace],
    )  # fmt: skip
    trainer.fit(module, dm)
    # stage 1 (steps 0-1): the tower alone; stage 2 (2-5): warmup 2 then cosine; stage 3 (6-8): restart
    half_cosine = 0.05 + 0.95 * 0.5  # the cosine half-way between the peak and min_lr_ratio
    expected = [0.0, 0.0, 5e-4, 1e-3, 1e-3, 1e-3 * half_cosine, 2.5e-4, 5e-4, 5e-4]
    torch.testing.assert_close([lrs[1] for lrs in trace.lrs], expected)
    assert [lrs[0] for lrs in trace.lrs][2:] == [lrs[1] for lrs in trace.lrs][2:]  # the tower follows from stage 2
    # AdamW's moments restart with stage 3: its step count starts again from one
    assert trace.adam_steps == [0, 0, 1, 2, 3, 4, 1, 2, 3]
    # stage 3 streams its own mix (here text only) and no vision batch
    assert trace.vision == [True] * 6 + [False] * 3
    assert trace.images[:2] == [None, None] and min(trace.images[2:6]) > 0 and trace.images[6:] == [0, 0, 0]
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_a_restart_leaves_the_stream_before_it_unchanged():
    plain, restarted = _datamodule().stream, _datamodule().stream
    restarted.restart_step = 3
    for step, (a, b) in enumerate(zip(iter(plain), iter(restarted), strict=False)):
        if step == 3:
            assert "vision_pixels" in a and "vision_pixels" not in b
            break
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key])


def test_workers_hand_out_the_steps_in_order_each_staged_by_its_own_step():
    dm = PretrainDataModule(num_entities=20, batch_size=4, vision_batch_size=2, vision_steps=2, num_workers=2)
    dm.stream.restart_step = 5
    batches = [b for _, b in zip(range(7), dm.train_dataloader(), strict=False)]
    stages = [("vision_pixels" in b, "input_ids" in b) for b in batches]
    # stage 1 (vision only) at steps 0-1, stage 2 (both) at 2-4, stage 3 (language only) from 5
    assert stages == [(True, False)] * 2 + [(True, True)] * 3 + [(False, True)] * 2
    # the two workers draw from their own seeds: steps 0 and 1 (one per worker) are not the same scenes
    assert not torch.equal(batches[0]["vision_pixels"], batches[1]["vision_pixels"])
    with pytest.raises(ValueError, match="num_workers"):
        PretrainDataModule(num_entities=20, num_workers=-1)


def test_crowded_scenes_have_six_to_nine_objects():
    rng, facts = random.Random(0), build_knowledge(20)
    only_position = {q: float(q == "position") for q in QTYPES}
    counts = set()
    for _ in range(100):
        scene, [(task, _, answer)] = sample_examples(
            rng, facts, {"vqa": 1.0}, only_position, distractor_prob=1.0, crowded_prob=1.0
        )
        counts.add(scene.count())
        assert task == "vqa_position" and answer in {o.position for o in scene.objects}
    assert counts == {6, 7, 8, 9}


def test_a_frozen_tower_keeps_its_stage_one_weights(tmp_path):
    dm = PretrainDataModule(num_entities=20, batch_size=4, vision_batch_size=2, vision_steps=2)
    module = PretrainModule(str(tmp_path / "model"), warmup_steps=1, freeze_tower=True)

    class _Tower(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 2:  # the first step of stage 2: the tower as stage 1 left it
                self.after_stage1 = {k: v.clone() for k, v in pl_module.model.model.vision_tower.state_dict().items()}
                self.vision_batch = "vision_pixels" in batch

    tower = _Tower()
    _trainer(5, tower).fit(module, dm)
    final = module.model.model.vision_tower.state_dict()
    assert not tower.vision_batch
    for key, value in tower.after_stage1.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=0)
    text = module.model.model.language_model.layers[0].mlp.down_proj.weight
    assert text.requires_grad


MODEL = Path(__file__).parents[2] / "models" / "tiny_llava"


class _FirstWeights(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


def _trainer(steps: int, *callbacks) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=list(callbacks),
    )  # fmt: skip


def test_init_from_runs_stage_three_alone_on_a_saved_model(tmp_path):
    dm = PretrainDataModule(batch_size=4, vision_batch_size=2, vision_steps=0, restart_mix={"vqa": 1.0})
    module = PretrainModule(str(tmp_path / "model"), restart_steps=2, init_from=str(MODEL))
    first = _FirstWeights()
    _trainer(2, first).fit(module, dm)
    saved = LlavaBackbone(path=str(MODEL)).load()[0].state_dict()
    assert saved.keys() == first.state.keys()
    for key, value in saved.items():
        torch.testing.assert_close(first.state[key], value, rtol=0, atol=0)
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_init_from_refuses_a_model_of_another_vocabulary(tmp_path):
    dm = PretrainDataModule(num_entities=20, batch_size=4, vision_batch_size=2, vision_steps=0)
    module = PretrainModule(str(tmp_path / "model"), restart_steps=1, init_from=str(MODEL))
    with pytest.raises(ValueError, match=r"tokenizer\.json is not this world's tokenizer"):
        _trainer(1).fit(module, dm)


def test_length_chunks_give_the_same_loss_as_one_padded_batch():
    dm = PretrainDataModule(num_entities=20, batch_size=12, vision_batch_size=2, vision_steps=0)
    batch = next(iter(dm.train_dataloader()))
    module = PretrainModule("unused", length_chunks=1, dense_weight=0.5, align_weight=0.5)
    module.trainer = L.Trainer(accelerator="cpu", logger=False)
    module.trainer.datamodule = dm
    module.configure_model()
    module.model.eval()
    one_loss, one_exact, one_dense, one_align = module._lm_loss(batch)
    module.hparams.length_chunks = 3
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # the chunks do cut padding
    three_loss, three_exact, _, three_align = module._lm_loss(batch)
    torch.testing.assert_close(three_loss, one_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(three_exact, one_exact)
    assert one_align > 0 and one_dense > 0
    # per-chunk means of per-chunk means: equal only up to how the chunks split the cells, so loosely
    torch.testing.assert_close(three_align, one_align, rtol=0.2, atol=0)


def test_dense_loss_is_the_mean_log_likelihood_of_each_objects_words():
    dm = _datamodule()
    module = PretrainModule("unused", dense_weight=1.0)
    module.stream = dm.stream
    image_id = dm.stream.encoder.image_token_id
    scenes = [sample_scene(random.Random(k), max_objects=4) for k in range(2)]
    words = torch.stack([dm.stream.cell_words(s) for s in scenes])  # (2, 36, 6)
    input_ids = torch.tensor([[2, 7, *([image_id] * 36), 9, 9]] * 2)  # (2, 40)
    logits = torch.randn(2, 40, len(dm.tokenizer), generator=torch.Generator().manual_seed(0))
    total, count = 0.0, 0
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            text = f"{obj.size} {obj.colour} {obj.pattern} {obj.shape} {obj.position}"
            for word in text.split():
                logp = logits[b, 2 + obj.cell].log_softmax(-1)
                total -= float(logp[dm.tokenizer.convert_tokens_to_ids(word)])
                count += 1
    torch.testing.assert_close(module._dense_loss(logits, input_ids, words), torch.tensor(total / count))


def test_further_turns_follow_the_answer_and_only_answers_are_labelled():
    dm = _datamodule()
    encoder = Encoder(dm.processor)
    ids, labels = encoder("what colour is the star?", "red", True, [("how big is the star?", "large")])
    tokens = dm.tokenizer.convert_ids_to_tokens(ids)
    text = " ".join(t for t in tokens if t != "<image>")
    assert text.endswith("? assistant : red </s> user : how big is the star ? assistant : large </s>")
    supervised = [t for t, label in zip(tokens, labels, strict=True) if label != IGNORE]
    assert supervised == ["red", "</s>", "large", "</s>"]
    assert [label for label in labels if label != IGNORE] == dm.tokenizer.convert_tokens_to_ids(supervised)


def test_yes_no_turns_are_single_questions_of_a_pair_about_the_rows_scene():
    """With ``turn_yes_no`` 1 every further turn is one yes/no question whose answer is right for the scene;
    a row never holds both questions of a pair (their answers would give each other away)."""
    dm = PretrainDataModule(num_entities=20, batch_size=8, vqa_turns=4, turn_yes_no=1.0)
    stream, rng = dm.stream, random.Random(0)
    answers, checked = [], 0
    for _ in range(30):
        scene = sample_scene(rng, min_objects=2)
        turns = stream._more_turns(scene, stream.sampling, rng)
        assert len(turns) == 3
        pairs = [make_yes_no(scene, c, random.Random(k)) for c in MME_CATEGORIES for k in range(100)]
        known = {q: a.lower() for pair in pairs if pair for q, a in pair}
        for question, answer in turns:
            assert question.endswith("please answer yes or no.") and answer in ("yes", "no")
            if question in known:  # the same question drawn for this scene elsewhere: the same answer
                assert known[question] == answer
                checked += 1
        answers += [a for _, a in turns]
    assert checked >= 30
    assert 0.3 < answers.count("yes") / len(answers) < 0.7
    plain = PretrainDataModule(num_entities=20, batch_size=8, vqa_turns=4).stream
    turns = plain._more_turns(sample_scene(rng, min_objects=2), plain.sampling, rng)
    assert not any(q.endswith("please answer yes or no.") for q, _ in turns)


def test_encoder_caches_hand_out_copies():
    encoder = Encoder(_datamodule().processor)
    first = encoder.target_ids("red")
    first.append(-1)
    assert encoder.target_ids("red") == first[:-1]
    assert encoder.image_tokens == 36


def test_align_loss_is_one_minus_the_cosine_to_each_objects_word_embeddings():
    dm = _datamodule()
    module = PretrainModule("unused", align_weight=1.0)
    module.model = build_model(dm.tokenizer, TinyLlavaSpec())
    scenes = [sample_scene(random.Random(k), max_objects=4) for k in range(3)]
    words = torch.stack([dm.stream.cell_words(s) for s in scenes])  # (3, 36, 6)
    projected = torch.randn(3, 36, 128, generator=torch.Generator().manual_seed(0))
    embedding = module.model.get_input_embeddings().weight
    total, count = 0.0, 0
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            text = f"{obj.size} {obj.colour} {obj.pattern} {obj.shape} {obj.position}"
            ids = dm.tokenizer.convert_tokens_to_ids(text.split())
            mean = embedding[ids].mean(0)
            cos = float(projected[b, obj.cell] @ mean / (projected[b, obj.cell].norm() * mean.norm()))
            total += 1 - cos
            count += 1
    loss = module._align_loss(projected, words)
    torch.testing.assert_close(loss, torch.tensor(total / count), rtol=1e-5, atol=1e-6)
    assert module._align_loss(projected, torch.full_like(words, IGNORE)) == 0  # no object: no loss
