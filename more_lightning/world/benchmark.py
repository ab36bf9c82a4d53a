"""Write the embedded world's editing benchmarks in the MMEdit schema, plus an MME-like yes/no suite.

``python -m more_lightning.world.benchmark --out data/embedded [--model models/tiny_llava] [--long N [--only-long]]``

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

``--long N`` also writes the long stream split, ``vqa_long.json`` and ``caption_long_edit.json`` (with
companions and images under ``<task>_long/``): N edits per task, drawn like the others from a stream of
their own (split name ``long``) and pairwise distinct — a draw that repeats an earlier record's
(scene, ``src``, ``alt``) is skipped and the next draw index taken. ``truth/long_split.json`` holds the
settings it was drawn with (seed, knowledge, model weights' digest), so that a later build of the main
benchmark with other settings removes it rather than leaving it stale; ``--only-long`` writes the long
split alone and leaves every other file as it is.

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
import hashlib
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
    CAPTION_PROMPTS,
    MME_CATEGORIES,
    QTYPES,
    VqaItem,
    alternative,
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
#: The long stream split (``--long N``), not part of the default build.
LONG = "long"
LONG_FILES = {("vqa", LONG): "vqa_long", ("caption", LONG): "caption_long_edit"}
#: The settings the long split was drawn with, compared by every later build of the main benchmark.
LONG_STAMP = Path("truth") / "long_split.json"
#: The settings the main benchmark was drawn with: ``--if-missing`` rewrites a benchmark drawn otherwise.
MAIN_STAMP = Path("truth") / "main_split.json"
#: Version of the world's generator (scenes, questions, benchmark layout); part of every stamp.
WORLD_VERSION = 2


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
    draw: int  # the draw index: the record's random streams are keyed by it
    item: VqaItem | None = None  # the VQA question (None for captions)


#: The question types of VQA edits 0, 1, 2, ... in turn: describe questions are 4 in 10 edits, as their
#: answers (three words, 736 of them) are what makes the task as varied in its answers as E-VQA.
SCHEDULE: tuple[str, ...] = (*QTYPES, "describe", "describe", "describe")
#: Most objects in a caption edit's scene: captions stay about as long as E-IC's.
CAPTION_OBJECTS = 3
#: Fewest objects in the scene of an edit's VQA question: with one object every referent is trivial.
MIN_VQA_OBJECTS = 2


def _vqa_question(rng: random.Random, qtype: str) -> tuple[Scene, VqaItem]:
    while True:  # rejection: the scene must hold a uniquely described object for this type
        scene = sample_scene(rng, min_objects=MIN_VQA_OBJECTS)
        item = make_vqa(scene, qtype, rng)
        if item is not None:
            return scene, item


def _draft(task: str, split: str, i: int, seed: int, facts: list[Fact]) -> Draft:
    rng = random.Random(f"{seed}-{task}-{split}-{i}")
    folder = f"{task}_{split}"
    item = None
    if task == "vqa":
        scene, item = _vqa_question(rng, SCHEDULE[i % len(SCHEDULE)])
        src, rephrase, truth = item.question, item.rephrase, {"qtype": item.qtype, "answer": item.answer}
        held_rephrase = item.held_out_rephrase
    else:
        scene = sample_scene(rng, max_objects=CAPTION_OBJECTS)
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
        "image": "",
        "image_rephrase": "",
        "loc": fact.question(rng.randrange(3)),
        "loc_ans": fact.answer,
        "m_loc": "",
        "m_loc_q": m_item.question,
        "m_loc_a": m_item.answer,
    }
    held_out, held_m_scene, held_jitter = _held_out(task, folder, i, seed, facts, record, held_rephrase)
    draft = Draft(record, truth, scene, m_scene, rng, held_out, held_m_scene, held_jitter, i, item)
    _place(draft, folder, i)
    return draft


def _place(draft: Draft, folder: str, slot: int) -> None:
    """Name the draft's images after its position ``slot`` in the file (``<folder>/<slot:05d>...png``)."""
    draft.record["image"] = draft.record["image_rephrase"] = f"{folder}/{slot:05d}.png"
    draft.record["m_loc"] = f"{folder}/{slot:05d}_mloc.png"
    draft.held_out["image_rephrase"] = f"{folder}/{slot:05d}_held.png"
    draft.held_out["m_loc"] = f"{folder}/{slot:05d}_mloc_held.png"


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
        "image_rephrase": "",  # named by _place
        "loc": fact.question(rng.randrange(3)),
        "loc_ans": fact.answer,
        "m_loc": "",
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
    if draft.item is not None:
        return alternative(draft.item, (pred, _truth(draft)), draft.rng) or _truth(draft)
    while True:  # the caption of the scene with one object's colour or shape changed
        alt = caption(counterfactual_scene(draft.scene, draft.rng))
        if alt not in (pred, _truth(draft)):
            return alt


def _complete(task: str, drafts: list[Draft], predict: Callable[[str, list[Draft]], list[str]] | None) -> None:
    """Fill in ``pred`` (the model's answer, else the truth) and then ``alt`` of every draft."""
    preds = predict(task, drafts) if predict else [_truth(d) for d in drafts]
    for draft, pred in zip(drafts, preds, strict=True):
        draft.record["pred"], draft.record["alt"] = pred, _alt(draft, pred)


def edit_key(draft: Draft) -> tuple[str, str, str]:
    """What makes an edit distinct: the scene as drawn (its canonical ``repr``), the question and the target."""
    return repr(draft.scene), draft.record["src"], draft.record["alt"]


def _distinct_drafts(
    task: str,
    split: str,
    n: int,
    seed: int,
    facts: list[Fact],
    predict: Callable[[str, list[Draft]], list[str]] | None,
) -> tuple[list[Draft], int]:
    """The first ``n`` draws (draw indices 0, 1, ...) whose :func:`edit_key` no earlier kept draw has.

    Draws are completed (``pred``, ``alt``) in rounds — first ``n``, then as many as are still
    missing — and kept in draw order, so the result is a pure function of the arguments. Each kept
    draft's images are named after its position in the file and its truth entry records its
    ``draw``. Returns the drafts and the number of draws skipped as duplicates.
    """
    folder = f"{task}_{split}"
    kept: list[Draft] = []
    seen: set[tuple[str, str, str]] = set()
    draws = 0
    while len(kept) < n:
        batch = [_draft(task, split, i, seed, facts) for i in range(draws, draws + n - len(kept))]
        draws += len(batch)
        _complete(task, batch, predict)
        for draft in batch:
            key = edit_key(draft)
            if key not in seen:
                seen.add(key)
                _place(draft, folder, len(kept))
                draft.truth["draw"] = draft.draw
                kept.append(draft)
    return kept, draws - n


def write_split(
    out: Path,
    task: str,
    split: str,
    n: int,
    seed: int,
    facts: list[Fact],
    predict: Callable[[str, list[Draft]], list[str]] | None = None,
    distinct: bool = False,
) -> list[dict[str, str]]:
    """Write one MMEdit file with its images, companion and truth file; returns the records.

    Record ``i`` is draw ``i``; with ``distinct`` (the long split) a draw repeating an earlier
    record's edit is skipped instead (:func:`_distinct_drafts`).
    """
    folder = f"{task}_{split}"
    for root in (IMAGE_ROOT, REPHRASE_ROOT):
        (out / root / folder).mkdir(parents=True, exist_ok=True)
    name = (FILES | LONG_FILES)[(task, split)]
    if distinct:
        drafts, skipped = _distinct_drafts(task, split, n, seed, facts, predict)
        log.info("%s: %d distinct edits, %d duplicate draws skipped", name, n, skipped)
    else:
        drafts = [_draft(task, split, i, seed, facts) for i in range(n)]
        _complete(task, drafts, predict)
    for draft in drafts:
        rec = draft.record
        render(draft.scene).save(out / IMAGE_ROOT / rec["image"])
        rephrased = render(draft.scene, jitter=True, seed=draft.rng.randrange(2**31))
        rephrased.save(out / REPHRASE_ROOT / rec["image_rephrase"])
        render(draft.m_scene).save(out / IMAGE_ROOT / rec["m_loc"])
        held = draft.held_out  # drawn from the record's second stream (never draft.rng): records unchanged
        render(draft.scene, jitter=True, seed=draft.held_jitter).save(out / REPHRASE_ROOT / held["image_rephrase"])
        render(draft.held_m_scene).save(out / IMAGE_ROOT / held["m_loc"])
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


def model_digest(model: str | None) -> str | None:
    """SHA-256 over the names and bytes of the files in the model folder (``None`` without a model)."""
    if model is None:
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(model).rglob("*") if p.is_file()):
        digest.update(path.relative_to(model).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def draw_settings(
    seed: int = 0, num_entities: int = 200, knowledge_seed: int = 0, model: str | None = None
) -> dict[str, int | str | None]:
    """What every record depends on besides its index: the seed, the knowledge base and the model's weights."""
    return {
        "world": WORLD_VERSION,
        "seed": seed,
        "num_entities": num_entities,
        "knowledge_seed": knowledge_seed,
        "model": model_digest(model),
    }


def _remove_split(out: Path, task: str, split: str) -> None:
    """Delete one split's file, companion, truth file and image folders (whichever exist)."""
    name = (FILES | LONG_FILES)[(task, split)]
    for root in (IMAGE_ROOT, REPHRASE_ROOT):
        shutil.rmtree(out / root / f"{task}_{split}", ignore_errors=True)
    for path in (out / f"{name}.json", heldout_path(out / f"{name}.json"), out / "truth" / f"{name}.json"):
        path.unlink(missing_ok=True)


def _remove_long(out: Path) -> None:
    (out / LONG_STAMP).unlink(missing_ok=True)  # first: a half-removed long split never looks complete
    for task, split in LONG_FILES:
        _remove_split(out, task, split)


def long_split_stamp(out: str | Path) -> dict | None:
    """The settings and sizes the long split under ``out`` was written with (``None``: absent or incomplete)."""
    out = Path(out)
    stamp = out / LONG_STAMP
    if not stamp.is_file() or not all((out / f"{name}.json").is_file() for name in LONG_FILES.values()):
        return None
    return json.loads(stamp.read_text())


def _drop_stale_long(out: Path, settings: dict) -> None:
    """Remove a long split drawn with other ``settings`` than the main benchmark now being written (or unstamped)."""
    stamp = long_split_stamp(out)
    present = (out / LONG_STAMP).exists() or any(
        (out / f"{name}.json").exists() or (out / IMAGE_ROOT / f"{task}_{split}").exists()
        for (task, split), name in LONG_FILES.items()
    )
    if not present:
        return
    if stamp is not None and stamp["settings"] == settings:
        log.info("kept the long split (%d edits per task): drawn with the same settings", stamp["records"])
        return
    drawn = stamp["settings"] if stamp else "unknown settings (incomplete)"
    log.warning(
        "removed the long split, drawn with %s while the benchmark is now drawn with %s; write it again with "
        "--long N --only-long",
        drawn,
        settings,
    )
    _remove_long(out)


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
    num_long: int = 0,
    write_main: bool = True,
) -> dict[str, int]:
    """Write the benchmark under ``out``; returns the number of records per file (and of MME questions).

    ``write_main``: the train and eval splits of both tasks and the MME suite; ``num_long`` > 0: the long
    split, ``num_long`` distinct edits per task, and its stamp (:data:`LONG_STAMP`). Each split written
    replaces its own files and image folders only; every other file is left as it is, except that
    a main build without the long split removes a long split drawn with other settings (or unstamped).
    """
    if not write_main and num_long < 1:
        raise ValueError("nothing to write: without the main benchmark, num_long must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if write_main or not (out / ".gitignore").exists():
        (out / ".gitignore").write_text("# generated by python -m more_lightning.world.benchmark\n*\n")
    settings = draw_settings(seed, num_entities, knowledge_seed, model)
    facts = build_knowledge(num_entities, knowledge_seed)
    predict = ModelPredict(model, threads) if model else None
    sizes = {}
    if write_main:
        (out / MAIN_STAMP).unlink(missing_ok=True)  # first: a half-written benchmark never looks complete
        shutil.rmtree(out / "mme", ignore_errors=True)
        for task, split in FILES:
            _remove_split(out, task, split)
        if num_long < 1:
            _drop_stale_long(out, settings)
        for task in ("vqa", "caption"):
            for split, n in (("train", num_train), ("eval", num_eval)):
                sizes[FILES[(task, split)]] = len(write_split(out, task, split, n, seed, facts, predict))
        sizes["mme_questions"] = write_mme(out, mme_images, seed)
        (out / MAIN_STAMP).write_text(json.dumps({"settings": settings, "sizes": sizes}, indent=1) + "\n")
    if num_long > 0:
        _remove_long(out)
        for task, split in LONG_FILES:
            records = write_split(out, task, split, num_long, seed, facts, predict, distinct=True)
            sizes[LONG_FILES[(task, split)]] = len(records)
        draws = {
            name: max(t["draw"] for t in json.loads((out / "truth" / f"{name}.json").read_text())) + 1
            for name in LONG_FILES.values()
        }
        stamp = {"records": num_long, "draws": draws, "settings": settings}
        (out / LONG_STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    return sizes


def _has_main(out: Path, settings: dict) -> bool:
    """Whether ``out`` holds the complete main benchmark drawn with ``settings`` (world version, seed,
    knowledge base, model weights)."""
    stamp = out / MAIN_STAMP
    if not stamp.is_file() or not all((out / f"{name}.json").is_file() for name in FILES.values()):
        return False
    return json.loads(stamp.read_text())["settings"] == settings and (out / "mme").is_dir()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the embedded world's MMEdit-schema benchmarks and MME suite.")
    parser.add_argument("--out", default="data/embedded", help="output folder")
    parser.add_argument("--model", default=None, help="tiny LLaVA folder for `pred` (default: pred = ground truth)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=1000, help="records per task in the train split")
    parser.add_argument("--num-eval", type=int, default=1000, help="records per task in the eval split")
    parser.add_argument("--mme-images", type=int, default=100, help="images per MME category (2 questions each)")
    parser.add_argument("--long", type=int, default=0, metavar="N", help="also write the long split, N edits per task")
    parser.add_argument("--only-long", action="store_true", help="write the long split alone (needs --long N)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for --model (1: see ENVIRONMENT)")
    parser.add_argument(
        "--if-missing",
        action="store_true",
        help="write only the requested parts that are missing: the main benchmark when it is absent, incomplete or "
        "was written by another world version or with another seed, knowledge base or model, the long split when it "
        "is absent or was written with another N, world version, seed, knowledge base or model",
    )
    parser.add_argument("--stats", action="store_true", help="print every file's fidelity figures beside real ones")
    args = parser.parse_args(argv)
    if args.only_long and args.long < 1:
        parser.error("--only-long needs --long N with N >= 1")
    if args.long < 0:
        parser.error("--long must be at least 0")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    write_main, num_long = not args.only_long, args.long
    if args.if_missing and write_main and _has_main(out, draw_settings(args.seed, model=args.model)):
        log.info("%s already holds the benchmark drawn with these settings and model", out)
        write_main = False
    if args.if_missing and num_long:
        stamp = long_split_stamp(out)
        if stamp and stamp["records"] == num_long and stamp["settings"] == draw_settings(args.seed, model=args.model):
            log.info("%s already holds the long split (%d edits per task)", out, num_long)
            num_long = 0
    if write_main or num_long:
        start = time.perf_counter()
        sizes = build_benchmark(
            args.out,
            args.model,
            args.seed,
            args.num_train,
            args.num_eval,
            args.mme_images,
            threads=args.threads,
            num_long=num_long,
            write_main=write_main,
        )
        log.info("wrote %s to %s in %.1f s", sizes, args.out, time.perf_counter() - start)
    if args.stats:
        log.info("%s", fidelity_report(out))


def fidelity_report(out: Path) -> str:
    """The ``--stats`` table: :func:`~more_lightning.world.stats.fidelity` of every file (the long split's
    too, when present) beside the real ones."""
    rows = {}
    for name in [*FILES.values(), *(LONG_FILES.values() if long_split_stamp(out) else ())]:
        records = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
        rows[f"{name}.json"] = fidelity(records)
    return "\n" + format_table(rows)


if __name__ == "__main__":
    main()
