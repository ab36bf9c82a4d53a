"""Position accuracy of tiny LLaVA models on fresh scenes, by number of objects.

    python benchmarks/world_positions.py --models models/tiny_llava [other model folders ...]

Asks ``--questions`` position questions ("where is the red circle?") about scenes drawn like the
training stream's (1–3 objects, half of the images jittered) from their own seed, so they belong
to neither benchmark split: a larger sample than the train split's 200 position questions for
comparing pretraining recipes, without looking at eval. Prints exact-match accuracy overall and
for scenes of 1, 2 and 3 objects, where locating the named object matters more.
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
from more_lightning.world.scenes import render


def position_questions(n: int, seed: str) -> list[tuple[str, object, str, int]]:
    """``n`` (question, image, answer, object count) tuples; deterministic in ``seed``."""
    rng = random.Random(seed)
    items = []
    while len(items) < n:
        scene, item = _vqa_question(rng, "position")  # the benchmark's rejection sampling
        image = render(scene, jitter=rng.random() < 0.5, seed=rng.randrange(2**31))
        items.append((item.question, image, item.answer, scene.count()))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["models/tiny_llava"])
    parser.add_argument("--questions", type=int, default=1500)
    parser.add_argument("--seed", default="selection-positions")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    items = position_questions(args.questions, args.seed)
    for path in args.models:
        model, processor = LlavaBackbone(path=path).load()
        answers = greedy_answers(model.eval(), Encoder(processor), [(q, image) for q, image, _, _ in items])
        by_count: dict[int, list[bool]] = defaultdict(list)
        for answer, (_, _, truth, count) in zip(answers, items, strict=True):
            by_count[count].append(answer == truth)
        hits = [h for v in by_count.values() for h in v]
        parts = "  ".join(f"{n} obj: {100 * sum(v) / len(v):5.1f} ({len(v)})" for n, v in sorted(by_count.items()))
        print(f"{path}: position {100 * sum(hits) / len(hits):5.1f} of {len(hits)}  |  {parts}", flush=True)


if __name__ == "__main__":
    main()
