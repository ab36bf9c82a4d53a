"""Pretrain the embedded world's tiny LLaVA from scratch.

``python cli.py fit --config configs/tiny_llava_pretrain.yaml`` (stages 1–2), then
``python cli.py fit --config configs/tiny_llava_pretrain_stage3.yaml`` (stage 3, from the stage-2 model).

1. ``vision_steps`` steps train only the CLIP tower, supervised: a linear head per attribute reads
   every patch token (one patch = one grid cell) and classifies the cell's shape, colour, pattern and
   size (or "empty") and which cell it is (so positions are explicit in every image token).
2. Then the language modelling loss of answers trains the projector and the language model, over an
   infinite stream of train-seed scenes and questions of every type, captions, MME-like yes/no pairs
   and the knowledge base (text only), each encoded exactly as :meth:`LlavaBackbone.encode` does, plus
   ``</s>`` after the target so greedy decoding knows where an answer ends. With ``freeze_tower`` the
   tower stays as stage 1 left it (as LLaVA's CLIP); otherwise the attribute loss stays on with weight
   ``aux_weight``. ``dense_weight`` asks every occupied cell's image token to predict its object's
   words; ``object_ramp_steps`` starts the stream on single-object scenes; ``vqa_turns`` puts further
   questions about the image in the same row as later turns of the conversation.
3. The last ``restart_steps`` steps are a warm restart: the language modelling loss alone (no vision
   batch), fresh AdamW moments, a second warmup + cosine cycle peaking at ``restart_lr``, and the
   stream's ``restart_*`` mix (by default stage 2's). Stages 1–2 are unchanged by it, step for step;
   with ``init_from`` it runs alone on a saved model.

What each piece changed is measured in the README ("The embedded world"). At the end the model and
processor are saved with ``save_pretrained`` to ``out_dir``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from typing_extensions import override

from more_lightning.backbones.llava import LLAVA_TEMPLATE, LLAVA_TEXT_TEMPLATE, LlavaBackbone
from more_lightning.world.knowledge import Fact, build_knowledge, knowledge_words
from more_lightning.world.questions import (
    CAPTION_PROMPTS,
    MME_CATEGORIES,
    QTYPES,
    caption,
    draw_qtype,
    make_vqa,
    make_yes_no,
    scene_vocabulary,
)
from more_lightning.world.scenes import (
    COLOURS,
    IMAGE_SIZE,
    MAX_OBJECTS,
    NUM_CELLS,
    PATTERNS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    region_cells,
    render,
    sample_scene,
)
from more_lightning.world.tiny_llava import TinyLlavaSpec, build_model, build_processor, build_tokenizer

log = logging.getLogger(__name__)

#: Task -> share of the language-modelling stream.
#: Measured (pilot, 2026-11-25): the knowledge base and counting are learned first, yes/no questions
#: and positions last, so those get a larger share.
DEFAULT_MIX: dict[str, float] = {"vqa": 0.5, "caption": 0.15, "yes_no": 0.2, "knowledge": 0.1}
#: VQA question type -> relative frequency within the VQA share.
DEFAULT_QTYPE_WEIGHTS: dict[str, float] = {q: 1.0 for q in QTYPES}
#: VQA types that name a referent: trained on confusable scenes too.
REFERRING_QTYPES: tuple[str, ...] = tuple(q for q in QTYPES if q != "count")
#: Most objects in a caption's scene (the benchmark's caption edits have 1–3).
CAPTION_OBJECTS = 3
#: Object count range of a :func:`crowded_scene`.
CROWDED_OBJECTS: tuple[int, int] = (6, 9)
#: What the attribute heads classify per cell: shape, colour, pattern, size (0 = empty cell) and the cell itself.
CELL_CLASSES: tuple[int, ...] = (len(SHAPES) + 1, len(COLOURS) + 1, len(PATTERNS) + 1, len(SIZES) + 1, NUM_CELLS)
IGNORE = -100
#: Words an object's image token is asked to predict (:meth:`WorldStream.cell_words`): size, colour, pattern,
#: shape and its position's one or two words.
CELL_WORDS = 6


def world_tokenizer(facts: list[Fact]):
    """The tiny LLaVA's tokenizer: every scene word and every knowledge-base word."""
    return build_tokenizer(scene_vocabulary() | knowledge_words(facts))


def pixel_values(image) -> Tensor:
    """(3, H, W) float tensor: what the world's processor makes of a 96×96 RGB image.

    Equal to ``processor(images=image)["pixel_values"][0]`` (no resize or crop at 96 px, mean =
    std = 0.5); computed directly because the processor is ~1 ms per image. Tested for equality.
    """
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy((array - 0.5) / 0.5).permute(2, 0, 1).contiguous()


def cell_labels(scene: Scene) -> Tensor:
    """(36, 5) long: per cell the shape, colour, pattern and size index (0 = empty cell) and the cell index."""
    labels = torch.zeros(NUM_CELLS, len(CELL_CLASSES), dtype=torch.long)
    labels[:, -1] = torch.arange(NUM_CELLS)
    colours, sizes = list(COLOURS), list(SIZES)
    for o in scene.objects:
        labels[o.cell, :4] = torch.tensor(
            [
                SHAPES.index(o.shape) + 1,
                colours.index(o.colour) + 1,
                PATTERNS.index(o.pattern) + 1,
                sizes.index(o.size) + 1,
            ]
        )
    return labels


class Encoder:
    """Encodes (prompt, target, image) like ``LlavaBackbone.encode``, caching prompt token ids."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<image>")
        self._blank = render(Scene(()))
        self._prompt_ids: dict[tuple[str, bool], list[int]] = {}
        self._words: dict[str, list[int]] = {}
        self._targets: dict[str, list[int]] = {}
        blank = self.processor(text=LLAVA_TEMPLATE.format(prompt=""), images=self._blank)["input_ids"][0]
        #: How many image tokens the processor expands one ``<image>`` into.
        self.image_tokens = list(blank).count(self.image_token_id)

    def prompt_ids(self, prompt: str, with_image: bool) -> list[int]:
        """Ids of the query, as ``processor(text=..., images=...)`` makes them (tested equal): the template's
        ``<image>`` expanded to :attr:`image_tokens` tokens, then tokenized (the processor would also
        preprocess an image each time, which the ids do not depend on)."""
        key = (prompt, with_image)
        if key not in self._prompt_ids:
            if with_image:
                text = LLAVA_TEMPLATE.format(prompt=prompt).replace("<image>", "<image>" * self.image_tokens)
            else:
                text = LLAVA_TEXT_TEMPLATE.format(prompt=prompt)
            self._prompt_ids[key] = list(self.tokenizer(text)["input_ids"])
        return self._prompt_ids[key]

    def prompt_words(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (cached: the stream asks for the same texts often)."""
        if text not in self._words:
            self._words[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._words[text]

    def target_ids(self, target: str) -> list[int]:
        if target not in self._targets:
            ids = self.tokenizer(" " + target, add_special_tokens=False)["input_ids"]
            self._targets[target] = [*ids, self.tokenizer.eos_token_id]
        return list(self._targets[target])

    def __call__(
        self, prompt: str, target: str, with_image: bool, more: list[tuple[str, str]] = ()
    ) -> tuple[list[int], list[int]]:
        """Ids and labels of the query, then of each (prompt, target) of ``more`` as further turns of the
        conversation (``USER: ... ASSISTANT: ...`` after the ``</s>`` that ends the answer before)."""
        prompt_ids, target_ids = self.prompt_ids(prompt, with_image), self.target_ids(target)
        ids, labels = prompt_ids + target_ids, [IGNORE] * len(prompt_ids) + target_ids
        for turn, answer in more:
            turn_ids = self.prompt_words(LLAVA_TEXT_TEMPLATE.format(prompt=turn))
            answer_ids = self.target_ids(answer)
            ids += turn_ids + answer_ids
            labels += [IGNORE] * len(turn_ids) + answer_ids
        return ids, labels


def confusable_scene(rng: random.Random, max_objects: int = MAX_OBJECTS) -> Scene:
    """A scene of 2..``max_objects`` objects whose attributes come from two values each, so that most
    objects share most attributes with another one.

    A referring expression ("the striped star") is only informative about binding when other objects are
    striped or are stars; in uniformly drawn scenes of 12 colours, 8 shapes and 4 patterns that is rare.
    """
    n = rng.randint(2, max(2, max_objects))
    pools = {
        "shape": rng.sample(SHAPES, 2),
        "colour": rng.sample(list(COLOURS), 2),
        "pattern": rng.sample(PATTERNS, 2),
        "size": list(SIZES),
    }
    regions = sorted(rng.sample(range(9), n))
    cells = sorted(rng.choice(region_cells(r)) for r in regions)
    objects = []
    for c in cells:
        fields = {a: rng.choice(pool) for a, pool in pools.items()}
        objects.append(SceneObject(**fields, cell=c))
    return Scene(tuple(objects))


def crowded_scene(rng: random.Random) -> Scene:
    """A scene of 6–9 objects: more than any benchmark scene has.

    With most regions occupied, locating the referent against the empty cells stops working, and its
    position has to come from its own image tokens.
    """
    return sample_scene(rng, max_objects=CROWDED_OBJECTS[1], min_objects=CROWDED_OBJECTS[0])


def sample_examples(
    rng: random.Random,
    facts: list[Fact],
    mix: dict[str, float],
    qtype_weights: dict[str, float] | None = None,
    distractor_prob: float = 0.0,
    crowded_prob: float = 0.0,
    max_objects: int = MAX_OBJECTS,
) -> tuple[Scene | None, list[tuple[str, str, str]]]:
    """A scene (None = text only) and (task, prompt, target) examples about it from the training distribution.

    Yes/no questions come as their pair (one *yes*, one *no*, differing in one word) about the same
    image: measured, single yes/no questions stayed at chance for 2,000 steps while the VQA types
    were learned; the contrast of the pair points the gradient at the compared attribute.
    Questions of :data:`REFERRING_QTYPES` are asked about a hard scene with probability
    ``distractor_prob``: a :func:`crowded_scene` with probability ``crowded_prob``, else a
    :func:`confusable_scene`. Other scenes have 1..``max_objects`` objects.
    """
    qtype_weights = qtype_weights or DEFAULT_QTYPE_WEIGHTS
    task = rng.choices(list(mix), weights=list(mix.values()))[0]
    if task == "knowledge":
        fact = rng.choice(facts)
        return None, [(task, fact.question(rng.randrange(3)), fact.answer)]
    qtype = draw_qtype(rng, qtype_weights) if task == "vqa" else ""
    hard = qtype in REFERRING_QTYPES and rng.random() < distractor_prob
    while True:
        if task == "caption":  # as in the benchmark: captions stay about as long as E-IC's
            scene = sample_scene(rng, max_objects=min(max_objects, CAPTION_OBJECTS))
            return scene, [(task, rng.choice(CAPTION_PROMPTS), caption(scene))]
        if not hard:
            scene = sample_scene(rng, max_objects=max_objects)
        elif crowded_prob and rng.random() < crowded_prob:
            scene = crowded_scene(rng)
        else:
            scene = confusable_scene(rng, max_objects)
        if task == "vqa":
            item = make_vqa(scene, qtype, rng)
            if item is not None:
                return scene, [(f"vqa_{item.qtype}", item.question, item.answer)]
        else:
            pair = make_yes_no(scene, rng.choice(MME_CATEGORIES), rng)
            if pair is not None:
                return scene, [(task, question, answer.lower()) for question, answer in pair]


@dataclass(frozen=True)
class Sampling:
    """What the language-modelling stream draws: the arguments of :func:`sample_examples`."""

    mix: dict[str, float]
    qtype_weights: dict[str, float]
    distractor_prob: float = 0.0
    crowded_prob: float = 0.0
    max_objects: int = MAX_OBJECTS
    vqa_turns: int = 1
    turn_yes_no: float = 0.0


class WorldStream(IterableDataset):
    """An endless stream of ready batches: vision-only for the first ``vision_steps``, then mixed."""

    def __init__(
        self,
        encoder: Encoder,
        facts: list[Fact],
        seed: int,
        batch_size: int,
        vision_batch_size: int,
        vision_steps: int,
        sampling: Sampling,
        jitter_prob: float,
        restart_sampling: Sampling | None = None,
        object_ramp_steps: int = 0,
    ) -> None:
        self.encoder, self.facts, self.seed = encoder, facts, seed
        self.object_ramp_steps = object_ramp_steps
        self.batch_size, self.vision_batch_size, self.vision_steps = batch_size, vision_batch_size, vision_steps
        self.sampling, self.jitter_prob = sampling, jitter_prob
        self.restart_sampling = restart_sampling or sampling
        #: First step of stage 3, set by :class:`PretrainModule` from its ``restart_steps``; None = no stage 3.
        self.restart_step: int | None = None
        #: Whether stage 2 batches carry a vision batch (the attribute loss), set by :class:`PretrainModule`.
        self.vision_in_stage2 = True
        tasks = set(sampling.mix) | set(self.restart_sampling.mix)
        self.tasks = sorted({t for t in tasks if t != "vqa"} | {f"vqa_{q}" for q in QTYPES})

    def _image(self, scene: Scene, rng: random.Random) -> Tensor:
        jitter = rng.random() < self.jitter_prob
        return pixel_values(render(scene, jitter=jitter, seed=rng.randrange(2**31)))

    def _vision_batch(self, rng: random.Random) -> dict[str, Tensor]:
        scenes = [sample_scene(rng, max_objects=CROWDED_OBJECTS[1]) for _ in range(self.vision_batch_size)]
        return {
            "vision_pixels": torch.stack([self._image(s, rng) for s in scenes]),  # (Bv, 3, H, W)
            "cell_labels": torch.stack([cell_labels(s) for s in scenes]),  # (Bv, 36, 5)
        }

    def cell_words(self, scene: Scene) -> Tensor:
        """(36, CELL_WORDS) long: per cell the token ids of its object's size, colour, pattern, shape and
        position words (``IGNORE`` for an empty cell and after "center", one word)."""
        ids = torch.full((NUM_CELLS, CELL_WORDS), IGNORE, dtype=torch.long)
        for o in scene.objects:
            found = self.encoder.prompt_words(f"{o.size} {o.colour} {o.pattern} {o.shape} {o.position}")
            ids[o.cell, : len(found)] = torch.tensor(found)
        return ids

    def _lm_batch(self, rng: random.Random, sampling: Sampling) -> dict[str, Tensor]:
        rows, images, tasks, words = [], [], [], []
        while len(rows) < self.batch_size:
            scene, examples = sample_examples(
                rng,
                self.facts,
                sampling.mix,
                sampling.qtype_weights,
                sampling.distractor_prob,
                sampling.crowded_prob,
                sampling.max_objects,
            )
            image = self._image(scene, rng) if scene is not None else None
            for task, prompt, target in examples:
                more = self._more_turns(scene, sampling, rng) if task.startswith("vqa_") else []
                rows.append(self.encoder(prompt, target, scene is not None, more))
                if image is not None:
                    images.append(image)
                    words.append(self.cell_words(scene))
                tasks.append(self.tasks.index(task))
        # LLaVA scatters image features into the <image> tokens in row order: ``images`` is in row order.
        width = max(len(ids) for ids, _ in rows)
        pad = self.encoder.tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])  # (B, T)
        labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in rows])  # (B, T)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])  # (B, T)
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "task": torch.tensor(tasks)}
        batch["pixel_values"] = (
            torch.stack(images) if images else torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)
        )  # (Bi, 3, H, W)
        batch["cell_words"] = torch.stack(words) if words else torch.zeros(0, NUM_CELLS, CELL_WORDS, dtype=torch.long)
        return batch

    def _more_turns(self, scene: Scene, sampling: Sampling, rng: random.Random) -> list[tuple[str, str]]:
        """``sampling.vqa_turns - 1`` further questions about the same scene (types drawn by the weights); each
        is, with probability ``sampling.turn_yes_no``, one question of a yes/no pair (category and which of
        the two drawn at random: a row never holds both, whose answers would give each other away)."""
        turns = []
        while len(turns) < sampling.vqa_turns - 1:
            if sampling.turn_yes_no and rng.random() < sampling.turn_yes_no:
                pair = make_yes_no(scene, rng.choice(MME_CATEGORIES), rng)
                if pair is not None:
                    question, answer = rng.choice(pair)
                    turns.append((question, answer.lower()))
                continue
            item = make_vqa(scene, draw_qtype(rng, sampling.qtype_weights), rng)
            if item is not None:
                turns.append((item.question, item.answer))
        return turns

    def _ramped(self, lm_step: int) -> Sampling:
        """Stage 2's sampling at its ``lm_step``-th step: scenes of at most one object at first, one more
        every ``object_ramp_steps / max_objects`` steps (a curriculum; 0 = none)."""
        if lm_step >= self.object_ramp_steps:
            return self.sampling
        most = 1 + lm_step * self.sampling.max_objects // self.object_ramp_steps
        return replace(
            self.sampling, max_objects=most, distractor_prob=0.0 if most < 2 else self.sampling.distractor_prob
        )

    @override
    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        """One process yields steps 0, 1, 2, …; worker ``w`` of ``n`` (a DataLoader's ``num_workers``) yields
        steps w, w + n, w + 2n, … from its own seed, so the DataLoader's round-robin hands the trainer the
        steps in order, each staged by its own step number."""
        worker = get_worker_info()
        if worker is None:
            rng, step, stride = random.Random(f"pretrain-{self.seed}"), 0, 1
        else:
            rng = random.Random(f"pretrain-{self.seed}-worker-{worker.id}-of-{worker.num_workers}")
            step, stride = worker.id, worker.num_workers
        while True:
            if self.restart_step is not None and step >= self.restart_step:  # stage 3: language modelling only
                batch = self._lm_batch(rng, self.restart_sampling)
            elif step < self.vision_steps:
                batch = self._vision_batch(rng)
            else:
                batch = self._vision_batch(rng) if self.vision_in_stage2 else {}
                batch.update(self._lm_batch(rng, self._ramped(step - self.vision_steps)))
            step += stride
            yield batch


class PretrainDataModule(L.LightningDataModule):
    """The embedded world's training stream (train-seed scenes + the knowledge base).

    Args:
        num_entities: knowledge-base size (entities × 3 relations facts).
        knowledge_seed: seed of the knowledge base (must match the benchmark's).
        seed: seed of the training stream (scenes and questions); the benchmark's train/eval
            splits use their own seeds.
        batch_size: language-modelling examples per step.
        vision_batch_size: scenes per step for the attribute objective.
        vision_steps: steps of stage 1 (vision tower only).
        jitter_prob: share of images rendered jittered (as the image rephrases are).
        mix: share of each task in the stream (vqa, caption, yes_no, knowledge).
        qtype_weights: relative frequency of each VQA question type.
        distractor_prob: share of the questions that name an object asked about a
            :func:`confusable_scene` (or a :func:`crowded_scene`, see ``crowded_prob``).
        restart_mix, restart_qtype_weights, restart_distractor_prob: the same during stage 3 (the
            module's ``restart_steps``); None = as in stage 2.
        crowded_prob: share of stage 2's hard scenes that are a :func:`crowded_scene`.
        vqa_turns: questions per VQA row: the first as the engine encodes a query, the others as
            further turns of the conversation about the same image (more answers per image forward).
        object_ramp_steps: a curriculum over the first steps of stage 2: scenes of one object at
            first, one more allowed every ``object_ramp_steps / 5`` steps.
        restart_crowded_prob: share of stage 3's hard scenes that are a :func:`crowded_scene`
            (6–9 objects) rather than a :func:`confusable_scene`.
        restart_vqa_turns: ``vqa_turns`` of stage 3 (None = as in stage 2).
        num_workers: processes that build the batches (0 = the training process; each worker draws from its
            own seed, so the stream differs from the 0-worker one). Pays where a step is faster than a batch
            is built, as on a GPU; on 2 cores a training step takes 7–14× as long as a batch
            (benchmarks/pretrain_step.py).
        turn_yes_no: share of the further turns of a VQA row (stages 2 and 3) that are one yes/no question
            about the image instead of a VQA question: yes/no answers carry one bit each, and as further
            turns they cost no image tokens.
    """

    def __init__(
        self,
        num_entities: int = 200,
        knowledge_seed: int = 0,
        seed: int = 0,
        batch_size: int = 64,
        vision_batch_size: int = 64,
        vision_steps: int = 500,
        jitter_prob: float = 0.5,
        mix: dict[str, float] | None = None,
        qtype_weights: dict[str, float] | None = None,
        distractor_prob: float = 0.0,
        restart_mix: dict[str, float] | None = None,
        restart_qtype_weights: dict[str, float] | None = None,
        restart_distractor_prob: float | None = None,
        restart_crowded_prob: float = 0.0,
        crowded_prob: float = 0.0,
        object_ramp_steps: int = 0,
        vqa_turns: int = 1,
        restart_vqa_turns: int | None = None,
        turn_yes_no: float = 0.0,
        num_workers: int = 0,
        spec: TinyLlavaSpec | None = None,
    ) -> None:
        super().__init__()
        if num_workers < 0:
            raise ValueError(f"num_workers must be ≥ 0, got {num_workers}")
        self.num_workers = num_workers
        self.facts = build_knowledge(num_entities, knowledge_seed)
        self.tokenizer = world_tokenizer(self.facts)
        self.spec = spec or TinyLlavaSpec()
        self.processor = build_processor(self.tokenizer, self.spec)
        sampling = Sampling(
            mix or DEFAULT_MIX,
            qtype_weights or DEFAULT_QTYPE_WEIGHTS,
            distractor_prob,
            crowded_prob,
            vqa_turns=vqa_turns,
            turn_yes_no=turn_yes_no,
        )
        restart_sampling = Sampling(
            restart_mix or sampling.mix,
            restart_qtype_weights or sampling.qtype_weights,
            distractor_prob if restart_distractor_prob is None else restart_distractor_prob,
            restart_crowded_prob,
            vqa_turns=vqa_turns if restart_vqa_turns is None else restart_vqa_turns,
            turn_yes_no=turn_yes_no,
        )
        self.stream = WorldStream(
            Encoder(self.processor),
            self.facts,
            seed,
            batch_size,
            vision_batch_size,
            vision_steps,
            sampling,
            jitter_prob,
            restart_sampling,
            object_ramp_steps,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.stream, batch_size=None, num_workers=self.num_workers)


class PretrainModule(L.LightningModule):
    """Trains a fresh tiny LLaVA in three stages and saves it with ``save_pretrained``.

    Args:
        out_dir: where the model, tokenizer and processor are saved at the end of ``fit``.
        lr: peak learning rate of stage 2 (warmup, then cosine to ``lr * min_lr_ratio``).
        vision_lr: learning rate of the vision tower and attribute heads in stage 1.
        warmup_steps: linear warmup of stage 2.
        aux_weight: weight of the attribute loss during stage 2.
        restart_steps: length of stage 3 (the last ``restart_steps`` of ``max_steps``); 0 = none.
        restart_lr: peak learning rate of stage 3 (linear warmup, then cosine).
        restart_warmup_steps: linear warmup of stage 3.
        weight_decay: AdamW weight decay.
        model_seed: initialisation seed.
        num_threads: torch CPU threads.
        init_from: start from this saved tiny LLaVA instead of fresh weights, e.g. to run stage 3
            alone on a stage-2 model: ``--model.init_args.init_from DIR --trainer.max_steps 800
            --data.init_args.vision_steps 0`` (with ``restart_steps: 800``).
        length_chunks: run each language-modelling batch in this many groups of rows of similar
            length (same loss; less padded work where captions are much longer than the rest).
        dense_weight: weight of the dense word loss at the image tokens (:meth:`_dense_loss`) in stages
            2–3: each occupied cell's image token predicts the words of its object.
        align_weight: weight of the alignment loss in stages 2–3 (:meth:`_align_loss`): each occupied cell's
            projected image token is pulled (cosine) towards the mean input embedding of its object's words,
            so image tokens enter the language model in the space its text tokens live in.
        freeze_tower: freeze the vision tower after stage 1, as LLaVA keeps its CLIP tower frozen.
            Measured: with the tower trained on by the language-modelling loss from a random
            projector, its per-object attribute accuracy fell from 0.86 to 0.01 within 50 steps.
    """

    def __init__(
        self,
        out_dir: str = "models/tiny_llava",
        lr: float = 1e-3,
        vision_lr: float = 2e-3,
        warmup_steps: int = 200,
        min_lr_ratio: float = 0.05,
        aux_weight: float = 0.2,
        restart_steps: int = 0,
        restart_lr: float = 3e-4,
        restart_warmup_steps: int = 50,
        weight_decay: float = 0.01,
        model_seed: int = 0,
        num_threads: int = 2,
        init_from: str | None = None,
        freeze_tower: bool = False,
        length_chunks: int = 1,
        dense_weight: float = 0.0,
        align_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.set_num_threads(num_threads)
        self.model: nn.Module | None = None

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        dm = self.trainer.datamodule
        self.processor, self.stream = dm.processor, dm.stream
        if self.hparams.init_from:
            self.model = self._load(self.hparams.init_from, dm.tokenizer)
        else:
            self.model = build_model(dm.tokenizer, dm.spec, seed=self.hparams.model_seed)
        width = self.model.config.vision_config.hidden_size
        self.heads = nn.ModuleList([nn.Linear(width, n) for n in CELL_CLASSES])

    @staticmethod
    def _load(path: str, tokenizer) -> nn.Module:
        """A saved tiny LLaVA (safetensors, offline) whose tokenizer is the stream's."""
        model, processor = LlavaBackbone(path=path).load()
        if processor.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"init_from={path}: its tokenizer.json is not this world's tokenizer (other vocabulary)")
        return model.train()

    def _vision_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        tower = self.model.model.vision_tower
        hidden = tower(pixel_values=batch["vision_pixels"]).last_hidden_state[:, 1:]  # (Bv, 36, Dv), CLS dropped
        labels = batch["cell_labels"]  # (Bv, 36, 5)
        losses, hits = [], []
        for k, head in enumerate(self.heads):
            logits = head(hidden)  # (Bv, 36, C_k)
            losses.append(F.cross_entropy(logits.flatten(0, 1), labels[..., k].flatten()))
            hits.append(logits.argmax(-1) == labels[..., k])
        right = torch.stack(hits).all(0)  # (Bv, 36): every head right
        occupied = labels[..., 0] > 0
        return torch.stack(losses).mean(), right[occupied].float().mean()

    def _lm_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Mean per-example loss, per-example exact match, the dense word loss and the alignment loss, the batch
        run in ``length_chunks`` groups of similar length, each cut to its own longest row (right padding never
        changes a causal model's outputs at the rows' own positions, so the chunks only skip padded work)."""
        lengths = batch["attention_mask"].sum(1)  # (B,)
        has_image = (batch["input_ids"] == self.stream.encoder.image_token_id).any(1)  # (B,)
        image_row = has_image.long().cumsum(0) - 1  # (B,): each row's index into pixel_values
        order = torch.argsort(lengths, stable=True)
        losses = torch.zeros(len(lengths), device=lengths.device)
        exact = torch.zeros(len(lengths), dtype=torch.bool, device=lengths.device)
        dense, align = [], []
        projected: list[Tensor] = []  # the projector's output of each chunk's images, (n, 36, D)
        hook = self.model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: projected.append(out))
        try:
            for rows in order.tensor_split(self.hparams.length_chunks):
                if not len(rows):
                    continue
                width = int(lengths[rows].max())
                kwargs = {
                    "input_ids": batch["input_ids"][rows, :width],
                    "attention_mask": batch["attention_mask"][rows, :width],
                }
                with_image = rows[has_image[rows]]
                if len(with_image):
                    kwargs["pixel_values"] = batch["pixel_values"][image_row[with_image]]
                projected.clear()
                full = self.model(**kwargs).logits  # (b, t, V)
                if len(with_image):
                    words = batch["cell_words"][image_row[with_image]]  # (n, 36, 6)
                    if self.hparams.dense_weight:
                        image_ids = kwargs["input_ids"][has_image[rows]]
                        dense.append(self._dense_loss(full[has_image[rows]], image_ids, words))
                    if self.hparams.align_weight:
                        align.append(self._align_loss(projected[0], words))
                logits = full[:, :-1]  # (b, t-1, V)
                labels = batch["labels"][rows, 1:width]  # (b, t-1)
                token_loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
                supervised = labels != IGNORE
                losses[rows] = (token_loss * supervised).sum(1) / supervised.sum(1)
                exact[rows] = ((logits.argmax(-1) == labels) | ~supervised).all(1)
        finally:
            hook.remove()
        dense_loss = torch.stack(dense).mean() if dense else losses.new_zeros(())
        align_loss = torch.stack(align).mean() if align else losses.new_zeros(())
        return losses.mean(), exact, dense_loss, align_loss

    def _align_loss(self, projected: Tensor, cell_words: Tensor) -> Tensor:
        """Mean over occupied cells of 1 − cos(projected image token, mean input embedding of its object's words);
        the embeddings are the target only (detached): the projector moves towards the text, not the reverse."""
        embedding = self.model.get_input_embeddings().weight.detach()  # (V, D)
        valid = (cell_words != IGNORE).unsqueeze(-1)  # (n, 36, 6, 1)
        summed = (embedding[cell_words.clamp(min=0)] * valid).sum(2)  # (n, 36, D): the same cosine as their mean
        occupied = valid.squeeze(-1).any(-1)  # (n, 36)
        if not occupied.any():
            return projected.new_zeros(())
        return (1 - F.cosine_similarity(projected[occupied], summed[occupied], dim=-1)).mean()

    def _dense_loss(self, logits: Tensor, input_ids: Tensor, cell_words: Tensor) -> Tensor:
        """Mean of −log p(word) at the image token of each occupied cell over the words of its object (size,
        colour, pattern, shape, position): the image tokens' own next-token predictions are asked to name
        what they show."""
        at_image = input_ids == self.stream.encoder.image_token_id  # (b, t): 36 per row, in cell order
        logp = logits[at_image].log_softmax(-1).view(len(input_ids), NUM_CELLS, -1)  # (b, 36, V)
        valid = cell_words != IGNORE  # (b, 36, 6)
        picked = logp.gather(-1, cell_words.clamp(min=0))  # (b, 36, 6)
        return -(picked * valid).sum() / valid.sum().clamp(min=1)

    @property
    def restart_step(self) -> int:
        """First step of stage 3 (the warm restart); ``max_steps`` when there is none."""
        return self.trainer.max_steps - self.hparams.restart_steps

    @override
    def on_fit_start(self) -> None:
        self.stream.restart_step = self.restart_step if self.hparams.restart_steps else None
        self.stream.vision_in_stage2 = not self.hparams.freeze_tower

    @override
    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self.hparams.freeze_tower and self.global_step == self.stream.vision_steps:
            self.model.model.vision_tower.requires_grad_(False)  # as LLaVA: the tower stays as stage 1 left it
            self.heads.requires_grad_(False)
            log.info("stage 2: vision tower frozen at step %d", self.global_step)
        if self.hparams.restart_steps and self.global_step == self.restart_step:
            self.optimizers().optimizer.state.clear()  # fresh AdamW moments: a warm restart
            log.info("stage 3: warm restart at step %d", self.global_step)

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        with_vision = "vision_pixels" in batch  # not in stage 3
        if with_vision:
            vision_loss, cell_acc = self._vision_loss(batch)
            self.log("train/object_acc", cell_acc, prog_bar=True)
            self.log("train/vision_loss", vision_loss)
        if "input_ids" not in batch:
            return vision_loss
        lm_loss, exact, dense_loss, align_loss = self._lm_loss(batch)
        for i, task in enumerate(self.stream.tasks):
            chosen = batch["task"] == i
            if chosen.any():
                self.log(f"train_acc/{task}", exact[chosen].float().mean(), batch_size=int(chosen.sum()))
        self.log("train/lm_loss", lm_loss, prog_bar=True)
        if self.hparams.dense_weight:
            self.log("train/dense_loss", dense_loss)
            lm_loss = lm_loss + self.hparams.dense_weight * dense_loss
        if self.hparams.align_weight:
            self.log("train/align_loss", align_loss)
            lm_loss = lm_loss + self.hparams.align_weight * align_loss
        self.log("train/exact", exact.float().mean(), prog_bar=True)
        return lm_loss + self.hparams.aux_weight * vision_loss if with_vision else lm_loss

    @override
    def configure_optimizers(self):
        vision = [*self.model.model.vision_tower.parameters(), *self.heads.parameters()]
        vision_ids = {id(p) for p in vision}
        rest = [p for p in self.parameters() if id(p) not in vision_ids]
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": vision, "lr": 1.0}, {"params": rest, "lr": 1.0}], weight_decay=hp.weight_decay
        )
        stage1, stage3 = self.stream.vision_steps, self.restart_step
        if not 0 <= stage1 <= stage3 <= self.trainer.max_steps:
            raise ValueError(
                f"stages do not fit in max_steps={self.trainer.max_steps}: vision_steps={stage1}, "
                f"restart_steps={hp.restart_steps}"
            )

        def cycle(s: int, length: int, peak: float, warmup: int) -> float:
            """Linear warmup, then cosine from ``peak`` to ``peak * min_lr_ratio`` at ``length``."""
            if s < warmup:
                return peak * (s + 1) / warmup
            progress = min(1.0, (s - warmup) / max(1, length - warmup))
            return peak * (hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

        def stage23(step: int) -> float:
            if step >= stage3:
                return cycle(step - stage3, hp.restart_steps, hp.restart_lr, hp.restart_warmup_steps)
            return cycle(step - stage1, stage3 - stage1, hp.lr, hp.warmup_steps)

        def vision_lr(step: int) -> float:
            return hp.vision_lr * min(1.0, (step + 1) / 50) if step < stage1 else stage23(step)

        def rest_lr(step: int) -> float:
            return 0.0 if step < stage1 else stage23(step)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [vision_lr, rest_lr])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def on_train_end(self) -> None:
        self.save(self.hparams.out_dir)

    @rank_zero_only
    def save(self, out_dir: str) -> None:
        """``save_pretrained`` the model (safetensors), tokenizer and processor into ``out_dir``."""
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.processor.save_pretrained(path)
        log.info("saved the tiny LLaVA to %s", path)
