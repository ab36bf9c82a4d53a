"""Write the embedded world's editing benchmarks in the MMEdit schema, plus an MME-like yes/no suite.

``python -m more_lightning.world.benchmark --out data/embedded [--model models/tiny_llava]``

Layout under ``--out`` (image paths in records are relative to their root)::

    vqa_train.json  vqa_eval.json  caption_train_edit.json  caption_eval_edit.json
    images/<task>_<split>/00000.png          image (canonical render)
    images/<task>_<split>/00000_mloc.png     m_loc (an unrelated scene)
    images_rephrase/<task>_<split>/00000.png image_rephrase (the same scene, jittered)
    <file>.heldout.json                      held-out variants per record, which no loss ever sees:
    images_rephrase/<task>_<split>/00000_held.png   another re-render of the scene
    images/<task>_<split>/00000_mloc_held.png       another unrelated scene
    mme/<category>/images/0000.png + mme/<category>/questions_answers_YN/0000.txt
    truth/<file>.json                        ground truth per record (question type, answer, caption)

``pred`` is the model's greedy answer (the ground truth when no ``--model`` is given); ``alt`` is
a different answer of the same type, never equal to ``pred`` nor to the ground truth. ``loc`` is
a knowledge-base question, ``m_loc_q`` a question about an unrelated scene with its true answer.
Every record and every image is a pure function of ``--seed`` and its index: same seed ⇒ same bytes.
The held-out variants draw from their own random stream, so the records themselves are exactly those
of a benchmark written without companions. ``--stats`` prints the fidelity figures of every file
beside real E-VQA / E-IC (:mod:`more_lightning.world.stats`).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from more_lightning.data.schema import heldout_path, write_heldout, write_mmedit
from more_lightning.world.knowledge import Fact, build_knowledge
from more_lightning.world.questions import (
    ANSWERS,
    CAPTION_PROMPTS,
    MME_CATEGORIES,
    QTYPES,
    VqaItem,
    caption,
    counterfactual_scene,
    make_vqa,
    make_yes_no,
)
from more_lightning.world.scenes import Scene, render, sample_scene
from more_lightning.world.stats import fidelity, format_table

log = logging.getLogger(__name__)

IMAGE_ROOT = "images"
REPHRASE_ROOT = "images_rephrase"
FILES = {("vqa", "train"): "vqa_train", ("vqa", "eval"): "vqa_eval"}
FILES |= {("caption", "train"): "caption_train_edit", ("caption", "eval"): "caption_eval_edit"}


@dataclass
class Draft:
    """A record before ``pred`` / ``alt`` are known, with what it needs to choose them and draw its images."""

    record: dict[str, str]
    truth: dict[str, str]
    scene: Scene
    m_scene: Scene
    rng: random.Random
    held_out: dict[str, str]
    held_m_scene: Scene
    held_jitter: int  # seed of the held-out re-render, from the record's own second stream


def _vqa_question(rng: random.Random, qtype: str) -> tuple[Scene, VqaItem]:
    while True:  # rejection: the scene must hold a uniquely described object for this type
        scene = sample_scene(rng)
        item = make_vqa(scene, qtype, rng)
        if item is not None:
            return scene, item


def _draft(task: str, split: str, i: int, seed: int, facts: list[Fact]) -> Draft:
    rng = random.Random(f"{seed}-{task}-{split}-{i}")
    folder = f"{task}_{split}"
    if task == "vqa":
        scene, item = _vqa_question(rng, QTYPES[i % len(QTYPES)])
        src, rephrase, truth = item.question, item.rephrase, {"qtype": item.qtype, "answer": item.answer}
        held_rephrase = item.held_out_rephrase
    else:
        scene = sample_scene(rng)
        src, rephrase = rng.sample(CAPTION_PROMPTS, 2)
        truth = {"caption": caption(scene)}
        held_rephrase = ""
    fact = rng.choice(facts)
    m_scene, m_item = _vqa_question(rng, rng.choice(QTYPES))
    truth["m_loc_type"] = m_item.qtype
    record = {
        "src": src,
        "pred": "",
        "rephrase": rephrase,
        "alt": "",
        "image": f"{folder}/{i:05d}.png",
        "image_rephrase": f"{folder}/{i:05d}.png",
        "loc": fact.question(rng.randrange(3)),
        "loc_ans": fact.answer,
        "m_loc": f"{folder}/{i:05d}_mloc.png",
        "m_loc_q": m_item.question,
        "m_loc_a": m_item.answer,
    }
    held_out, held_m_scene, held_jitter = _held_out(task, folder, i, seed, facts, record, held_rephrase)
    return Draft(record, truth, scene, m_scene, rng, held_out, held_m_scene, held_jitter)


def _held_out(
    task: str, folder: str, i: int, seed: int, facts: list[Fact], record: dict[str, str], rephrase: str
) -> tuple[dict[str, str], Scene, int]:
    """The record's held-out variants (its companion entry), the scene of their unrelated image and the
    jitter seed of their re-render.

    A third phrasing (VQA: the template neither ``src`` nor ``rephrase`` uses; captions: a prompt
    neither uses), another knowledge question (another fact, so not a paraphrase of ``loc``), and
    another unrelated scene and question. Drawn from the record's own second stream.
    """
    rng = random.Random(f"{seed}-{task}-{folder}-{i}-held-out")
    if task != "vqa":
        rephrase = rng.choice([p for p in CAPTION_PROMPTS if p not in (record["src"], record["rephrase"])])
    fact = rng.choice([f for f in facts if all(f.question(k) != record["loc"] for k in range(3))])
    m_scene, m_item = _vqa_question(rng, rng.choice(QTYPES))
    held_out = {
        "rephrase": rephrase,
        "image_rephrase": f"{folder}/{i:05d}_held.png",
        "loc": fact.question(rng.randrange(3)),
        "loc_ans": fact.answer,
        "m_loc": f"{folder}/{i:05d}_mloc_held.png",
        "m_loc_q": m_item.question,
        "m_loc_a": m_item.answer,
    }
    return held_out, m_scene, rng.randrange(2**31)


def _truth(draft: Draft) -> str:
    return draft.truth["answer"] if "answer" in draft.truth else draft.truth["caption"]


def _alt(draft: Draft, pred: str) -> str:
    """A plausible wrong answer of the same type, different from ``pred`` and, where possible, from the truth.

    Only when the type has no third answer (size: small / large) and the model is wrong is the truth
    itself the alternative — still different from ``pred``, as every edit target must be.
    """
    if "qtype" in draft.truth:
        options = [a for a in ANSWERS[draft.truth["qtype"]] if a not in (pred, _truth(draft))]
        return draft.rng.choice(options or [_truth(draft)])
    while True:  # the caption of the scene with one object's colour or shape changed
        alt = caption(counterfactual_scene(draft.scene, draft.rng))
        if alt not in (pred, _truth(draft)):
            return alt


def write_split(
    out: Path,
    task: str,
    split: str,
    n: int,
    seed: int,
    facts: list[Fact],
    predict: Callable[[str, list[Draft]], list[str]] | None = None,
) -> list[dict[str, str]]:
    """Write one MMEdit file with its images and truth file; returns the records."""
    folder = f"{task}_{split}"
    for root in (IMAGE_ROOT, REPHRASE_ROOT):
        (out / root / folder).mkdir(parents=True, exist_ok=True)
    drafts = [_draft(task, split, i, seed, facts) for i in range(n)]
    preds = predict(task, drafts) if predict else [_truth(d) for d in drafts]
    for draft, pred in zip(drafts, preds, strict=True):
        rec = draft.record
        rec["pred"], rec["alt"] = pred, _alt(draft, pred)
        render(draft.scene).save(out / IMAGE_ROOT / rec["image"])
        rephrased = render(draft.scene, jitter=True, seed=draft.rng.randrange(2**31))
        rephrased.save(out / REPHRASE_ROOT / rec["image_rephrase"])
        render(draft.m_scene).save(out / IMAGE_ROOT / rec["m_loc"])
        held = draft.held_out  # drawn from the record's second stream (never draft.rng): records unchanged
        render(draft.scene, jitter=True, seed=draft.held_jitter).save(out / REPHRASE_ROOT / held["image_rephrase"])
        render(draft.held_m_scene).save(out / IMAGE_ROOT / held["m_loc"])
    name = FILES[(task, split)]
    write_mmedit(out / f"{name}.json", [d.record for d in drafts])
    write_heldout(heldout_path(out / f"{name}.json"), [d.held_out for d in drafts])
    (out / "truth").mkdir(exist_ok=True)
    (out / "truth" / f"{name}.json").write_text(json.dumps([d.truth for d in drafts], indent=1) + "\n")
    return [d.record for d in drafts]


def write_mme(out: Path, images_per_category: int, seed: int) -> int:
    """The MME-like suite in MME's layout; two questions per image (one Yes, one No). Returns #questions."""
    for category in MME_CATEGORIES:
        (out / "mme" / category / "images").mkdir(parents=True, exist_ok=True)
        (out / "mme" / category / "questions_answers_YN").mkdir(parents=True, exist_ok=True)
        for i in range(images_per_category):
            rng = random.Random(f"{seed}-mme-{category}-{i}")
            pair = None
            while pair is None:
                scene = sample_scene(rng)
                pair = make_yes_no(scene, category, rng)
            render(scene).save(out / "mme" / category / "images" / f"{i:04d}.png")
            lines = "".join(f"{q}\t{a}\n" for q, a in pair)
            (out / "mme" / category / "questions_answers_YN" / f"{i:04d}.txt").write_text(lines)
    return 2 * images_per_category * len(MME_CATEGORIES)


class ModelPredict:
    """``pred`` = the model's greedy answer to ``src`` on the canonical image."""

    def __init__(self, model_dir: str, threads: int = 1) -> None:
        import torch

        from more_lightning.backbones.llava import LlavaBackbone
        from more_lightning.world.pretrain import Encoder

        torch.set_num_threads(threads)
        self.model, processor = LlavaBackbone(path=model_dir).load()
        self.encoder = Encoder(processor)

    def __call__(self, task: str, drafts: list[Draft]) -> list[str]:
        from more_lightning.world.evaluate import greedy_answers

        prompts = [(d.record["src"], render(d.scene)) for d in drafts]
        return greedy_answers(self.model, self.encoder, prompts, max_new_tokens=4 if task == "vqa" else 32)


def build_benchmark(
    out: str | Path,
    model: str | None = None,
    seed: int = 0,
    num_train: int = 1000,
    num_eval: int = 1000,
    mme_images: int = 100,
    num_entities: int = 200,
    knowledge_seed: int = 0,
    threads: int = 1,
) -> dict[str, int]:
    """Write every file of the benchmark under ``out`` (replacing what was there); returns sizes."""
    out = Path(out)
    for sub in (IMAGE_ROOT, REPHRASE_ROOT, "mme", "truth"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("# generated by python -m more_lightning.world.benchmark\n*\n")
    facts = build_knowledge(num_entities, knowledge_seed)
    predict = ModelPredict(model, threads) if model else None
    sizes = {}
    for task in ("vqa", "caption"):
        for split, n in (("train", num_train), ("eval", num_eval)):
            sizes[FILES[(task, split)]] = len(write_split(out, task, split, n, seed, facts, predict))
    sizes["mme_questions"] = write_mme(out, mme_images, seed)
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the embedded world's MMEdit-schema benchmarks and MME suite.")
    parser.add_argument("--out", default="data/embedded", help="output folder")
    parser.add_argument("--model", default=None, help="tiny LLaVA folder for `pred` (default: pred = ground truth)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=1000, help="records per task in the train split")
    parser.add_argument("--num-eval", type=int, default=1000, help="records per task in the eval split")
    parser.add_argument("--mme-images", type=int, default=100, help="images per MME category (2 questions each)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for --model (1: see ENVIRONMENT)")
    parser.add_argument("--if-missing", action="store_true", help="do nothing when the four files and mme/ exist")
    parser.add_argument("--stats", action="store_true", help="print every file's fidelity figures beside real ones")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    if args.if_missing and all((out / f"{n}.json").is_file() for n in FILES.values()) and (out / "mme").is_dir():
        log.info("%s already holds the benchmark; remove it to regenerate", out)
        if args.stats:
            log.info("%s", fidelity_report(out))
        return
    start = time.perf_counter()
    sizes = build_benchmark(
        args.out, args.model, args.seed, args.num_train, args.num_eval, args.mme_images, threads=args.threads
    )
    log.info("wrote %s to %s in %.1f s", sizes, args.out, time.perf_counter() - start)
    if args.stats:
        log.info("%s", fidelity_report(out))


def fidelity_report(out: Path) -> str:
    """The ``--stats`` table: :func:`~more_lightning.world.stats.fidelity` of every file beside the real ones."""
    rows = {}
    for name in FILES.values():
        records = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
        rows[f"{name}.json"] = fidelity(records)
    return "\n" + format_table(rows)


if __name__ == "__main__":
    main()
