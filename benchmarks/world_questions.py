"""VQA accuracy of tiny LLaVA models on fresh scenes, per question type and number of objects.

    python benchmarks/world_questions.py --models models/tiny_llava [other model folders ...]

Asks ``--questions`` questions of each type about scenes drawn like the benchmark's (2–5 objects,
half of the images jittered) from their own seed, so they belong to neither benchmark split: the
sample for comparing pretraining recipes without looking at eval. Prints exact-match accuracy per
type, overall and by object count, where finding the named object matters more.
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict

import torch

from more_lightning.backbones.llava import LlavaBackbone
from more_lightning.world.benchmark import _vqa_question
from more_lightning.world.evaluate import greedy_answers
from more_lightning.world.pretrain import Encoder
from more_lightning.world.questions import QTYPES
from more_lightning.world.scenes import render


def fresh_questions(qtype: str, n: int, seed: str) -> list[tuple[str, object, str, int]]:
    """``n`` (question, image, answer, object count) tuples of ``qtype``; deterministic in ``seed``."""
    rng = random.Random(f"{seed}-{qtype}")
    items = []
    while len(items) < n:
        scene, item = _vqa_question(rng, qtype)  # the benchmark's rejection sampling
        image = render(scene, jitter=rng.random() < 0.5, seed=rng.randrange(2**31))
        items.append((item.question, image, item.answer, scene.count()))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["models/tiny_llava"])
    parser.add_argument("--qtypes", nargs="+", default=list(QTYPES), choices=QTYPES)
    parser.add_argument("--questions", type=int, default=300, help="questions per type")
    parser.add_argument("--seed", default="selection")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    items = {q: fresh_questions(q, args.questions, args.seed) for q in args.qtypes}
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


if __name__ == "__main__":
    main()
