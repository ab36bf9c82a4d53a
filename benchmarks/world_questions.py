"""VQA accuracy of tiny LLaVA models on fresh scenes, per question type and number of objects.

    python benchmarks/world_questions.py --models models/tiny_llava [other model folders ...]

Asks ``--questions`` questions of each type about scenes drawn like the benchmark's (2–5 objects,
half of the images jittered) from their own seed, so they belong to neither benchmark split: the
sample for comparing pretraining recipes without looking at eval. Prints exact-match accuracy per
type, overall and by object count, where finding the named object matters more; then, per MME-like
category, ``--pairs`` fresh yes/no pairs (one *yes*, one *no* about one image, as the MME-like
suite asks): acc and acc+ (both answers of a pair right).
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict

import torch

from more_lightning.backbones.llava import LlavaBackbone
from more_lightning.metrics.mme import mme_scores
from more_lightning.world.benchmark import _vqa_question
from more_lightning.world.evaluate import greedy_answers
from more_lightning.world.pretrain import Encoder
from more_lightning.world.questions import MME_CATEGORIES, QTYPES, make_yes_no
from more_lightning.world.scenes import render, sample_scene


def fresh_questions(qtype: str, n: int, seed: str) -> list[tuple[str, object, str, int]]:
    """``n`` (question, image, answer, object count) tuples of ``qtype``; deterministic in ``seed``."""
    rng = random.Random(f"{seed}-{qtype}")
    items = []
    while len(items) < n:
        scene, item = _vqa_question(rng, qtype)  # the benchmark's rejection sampling
        image = render(scene, jitter=rng.random() < 0.5, seed=rng.randrange(2**31))
        items.append((item.question, image, item.answer, scene.count()))
    return items


def fresh_pairs(category: str, n: int, seed: str) -> list[tuple[object, tuple[tuple[str, str], ...]]]:
    """``n`` (image, ((question, "yes"), (question, "no"))) of an MME-like ``category``, drawn as the suite
    draws its scenes but from their own seed."""
    rng = random.Random(f"{seed}-yes-no-{category}")
    items = []
    while len(items) < n:
        scene = sample_scene(rng)
        pair = make_yes_no(scene, category, rng)
        if pair is not None:
            items.append((render(scene), tuple((q, a.lower()) for q, a in pair)))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["models/tiny_llava"])
    parser.add_argument("--qtypes", nargs="+", default=list(QTYPES), choices=QTYPES)
    parser.add_argument("--questions", type=int, default=300, help="questions per type")
    parser.add_argument("--pairs", type=int, default=100, help="yes/no pairs per MME-like category (0: none)")
    parser.add_argument("--seed", default="selection")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    items = {q: fresh_questions(q, args.questions, args.seed) for q in args.qtypes}
    pairs = {c: fresh_pairs(c, args.pairs, args.seed) for c in MME_CATEGORIES} if args.pairs else {}
    for path in args.models:
        model, processor = LlavaBackbone(path=path).load()
        encoder = Encoder(processor)
        print(path, flush=True)
        for qtype, questions in items.items():
            answers = greedy_answers(model.eval(), encoder, [(q, image) for q, image, _, _ in questions])
            by_count: dict[int, list[bool]] = defaultdict(list)
            for answer, (_, _, truth, count) in zip(answers, questions, strict=True):
                by_count[count].append(answer == truth)
            hits = [h for v in by_count.values() for h in v]
            parts = "  ".join(f"{n} obj: {100 * sum(v) / len(v):5.1f}" for n, v in sorted(by_count.items()))
            print(f"  {qtype:9s} {100 * sum(hits) / len(hits):5.1f} of {len(hits)}  |  {parts}", flush=True)
        for category, drawn in pairs.items():
            prompts = [(q, image) for image, pair in drawn for q, _ in pair]
            answers = greedy_answers(model.eval(), encoder, prompts, max_new_tokens=1)
            truths = [t for _, pair in drawn for _, t in pair]
            hits = torch.tensor([a == t for a, t in zip(answers, truths, strict=True)])
            scores = mme_scores(torch.arange(len(drawn)).repeat_interleave(2), hits)  # the two questions of image i
            acc, acc_plus = scores["acc"].item(), scores["acc_plus"].item()
            print(f"  yes/no {category:9s} acc {acc:5.1f}  acc+ {acc_plus:5.1f}  of {len(drawn)} pairs", flush=True)


if __name__ == "__main__":
    main()
