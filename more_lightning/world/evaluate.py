"""Competence report of a model on the embedded benchmark's eval split (or its train split).

``python -m more_lightning.world.evaluate --model models/tiny_llava --data data/embedded [--split train]``

Prints VQA accuracy per question type (exact match of the greedy answer), on the text and image
rephrases and, where the benchmark wrote a held-out companion, on its held-out rephrase and
re-render; caption token accuracy (teacher forced) and exact match, knowledge-base accuracy
(``loc``), multimodal-locality accuracy (``m_loc``), MME-like acc / acc+ per category, and how many
records have ``alt == pred`` (must be 0). Ground truth comes from the ``truth/`` files the
benchmark writes beside the MMEdit files. ``--split train`` reports the same figures on the train
split's records (the MME-like suite has one split and is always included): that is the split to
compare pretraining recipes on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from more_lightning.backbones.llava import LlavaBackbone
from more_lightning.data.schema import heldout_path
from more_lightning.metrics.mme import mme_scores
from more_lightning.world.pretrain import IGNORE, Encoder, pixel_values

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("eval", "train")
#: A query for batched decoding: (prompt, image or None).
Prompt = tuple[str, Image.Image | None]


def _buckets(encoder: Encoder, prompts: list[Prompt]) -> dict[tuple[int, bool], list[int]]:
    """Indices of ``prompts`` grouped by (prompt length, has image): each group batches unpadded."""
    groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
    for i, (prompt, image) in enumerate(prompts):
        groups[(len(encoder.prompt_ids(prompt, image is not None)), image is not None)].append(i)
    return groups


def _model_kwargs(encoder: Encoder, prompts: list[Prompt], rows: list[int]) -> dict[str, Tensor]:
    with_image = prompts[rows[0]][1] is not None
    ids = torch.tensor([encoder.prompt_ids(prompts[i][0], with_image) for i in rows])  # (B, Tp)
    kwargs = {"input_ids": ids}
    if with_image:
        kwargs["pixel_values"] = torch.stack([pixel_values(prompts[i][1]) for i in rows])  # (B, 3, H, W)
    return kwargs


@torch.no_grad()
def greedy_answers(
    model: nn.Module, encoder: Encoder, prompts: list[Prompt], max_new_tokens: int = 4, batch_size: int = 256
) -> list[str]:
    """Greedy decoding of each prompt until ``</s>`` (or ``max_new_tokens``), as a space-joined string.

    Prompts are batched by equal length, so no padding is needed and every row sees exactly the
    input :meth:`LlavaBackbone.encode` builds for it.
    """
    eos = encoder.tokenizer.eos_token_id
    answers = [""] * len(prompts)
    for rows_all in _buckets(encoder, prompts).values():
        for start in range(0, len(rows_all), batch_size):
            rows = rows_all[start : start + batch_size]
            kwargs = _model_kwargs(encoder, prompts, rows)
            ids = kwargs.pop("input_ids")
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
                **kwargs,
            )
            new = out[:, ids.shape[1] :]  # (B, t): generated tokens, ``</s>``-padded after the end
            for row, tokens in zip(rows, new.tolist(), strict=True):
                tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
                answers[row] = " ".join(encoder.tokenizer.convert_ids_to_tokens(tokens))
    return answers


@torch.no_grad()
def token_hits(model: nn.Module, encoder: Encoder, prompts: list[Prompt], targets: list[str]) -> list[tuple[int, int]]:
    """Teacher-forced (correct, total) target tokens per query (``</s>`` excluded, like the engine)."""
    out: list[tuple[int, int]] = [(0, 0)] * len(prompts)
    for rows in _buckets(encoder, prompts).values():
        for start in range(0, len(rows), 256):
            chunk = rows[start : start + 256]
            kwargs = _model_kwargs(encoder, prompts, chunk)
            prompt_ids = kwargs.pop("input_ids")
            target_ids = [encoder.target_ids(targets[i])[:-1] for i in chunk]
            width = max(len(t) for t in target_ids)
            pad = [t + [IGNORE] * (width - len(t)) for t in target_ids]
            labels = torch.tensor(pad)  # (B, Tt)
            full = torch.cat([prompt_ids, labels.clamp(min=0)], 1)  # (B, Tp + Tt)
            logits = model(input_ids=full, attention_mask=torch.ones_like(full), **kwargs).logits
            guess = logits[:, prompt_ids.shape[1] - 1 : -1].argmax(-1)  # (B, Tt)
            hits = ((guess == labels) & (labels != IGNORE)).sum(1)
            for row, h, t in zip(chunk, hits.tolist(), target_ids, strict=True):
                out[row] = (h, len(t))
    return out


def _load_split(data: Path, name: str) -> tuple[list[dict], list[dict]]:
    records = json.loads((data / f"{name}.json").read_text())
    truth = json.loads((data / "truth" / f"{name}.json").read_text())
    return records, truth


def _image(data: Path, root: str, rel: str) -> Image.Image:
    with Image.open(data / root / rel) as im:
        return im.convert("RGB")


def _mme(data: Path) -> list[tuple[str, str, Image.Image, str, str]]:
    """(category, image id, image, question, answer) of every MME-like question."""
    from more_lightning.data.mme import read_mme

    return [
        (it.category, it.image_id, _image(it.image.parent, ".", it.image.name), it.question, ("no", "yes")[it.answer])
        for it in read_mme(data / "mme")
    ]


def _pct(hits: list[bool]) -> float:
    return 100.0 * sum(hits) / max(1, len(hits))


def evaluate(model_dir: str, data_dir: str, threads: int = 1, split: str = "eval") -> dict[str, float]:
    """All competence figures of the report, as ``{name: percent}`` (plus ``alt_eq_pred`` counts)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    torch.set_num_threads(threads)
    model, processor = LlavaBackbone(path=model_dir).load()
    encoder = Encoder(processor)
    data = Path(data_dir)
    report: dict[str, float] = {}

    records, truth = _load_split(data, f"vqa_{split}")
    images = [_image(data, "images", r["image"]) for r in records]
    rephrased = [_image(data, "images_rephrase", r["image_rephrase"]) for r in records]
    queries = {
        "vqa": [(r["src"], im) for r, im in zip(records, images, strict=True)],
        "vqa_text_rephrase": [(r["rephrase"], im) for r, im in zip(records, images, strict=True)],
        "vqa_image_rephrase": [(r["src"], im) for r, im in zip(records, rephrased, strict=True)],
    }
    companion = heldout_path(data / f"vqa_{split}.json")
    if companion.is_file():  # the held-out variants: a third template, another re-render
        held = json.loads(companion.read_text(encoding="utf-8"))
        held_images = [_image(data, "images_rephrase", h["image_rephrase"]) for h in held]
        queries["vqa_held_out_rephrase"] = [(h["rephrase"], im) for h, im in zip(held, images, strict=True)]
        queries["vqa_held_out_image"] = [(r["src"], im) for r, im in zip(records, held_images, strict=True)]
    for name, prompts in queries.items():
        answers = greedy_answers(model, encoder, prompts)
        by_type: dict[str, list[bool]] = defaultdict(list)
        for a, t in zip(answers, truth, strict=True):
            by_type[t["qtype"]].append(a == t["answer"])
        for qtype, hits in sorted(by_type.items()):
            report[f"{name}/{qtype}"] = _pct(hits)
        report[f"{name}/all"] = _pct([h for hits in by_type.values() for h in hits])
    report["vqa/alt_eq_pred"] = sum(r["alt"] == r["pred"] for r in records)

    caps, cap_truth = _load_split(data, f"caption_{split}_edit")
    cap_images = [_image(data, "images", r["image"]) for r in caps]
    for name, prompts in {
        "caption": [(r["src"], im) for r, im in zip(caps, cap_images, strict=True)],
        "caption_image_rephrase": [(r["src"], _image(data, "images_rephrase", r["image_rephrase"])) for r in caps],
    }.items():
        hits = token_hits(model, encoder, prompts, [t["caption"] for t in cap_truth])
        report[f"{name}/token_acc"] = 100.0 * sum(h for h, _ in hits) / sum(n for _, n in hits)
        report[f"{name}/exact"] = _pct([h == n for h, n in hits])
    report["caption/alt_eq_pred"] = sum(r["alt"] == r["pred"] for r in caps)

    loc = [(r["loc"], r["loc_ans"]) for r in records + caps]
    answers = greedy_answers(model, encoder, [(q, None) for q, _ in loc])
    report["knowledge/acc"] = _pct([a == t for a, (_, t) in zip(answers, loc, strict=True)])
    m_loc = [(r["m_loc_q"], _image(data, "images", r["m_loc"]), r["m_loc_a"]) for r in records + caps]
    answers = greedy_answers(model, encoder, [(q, im) for q, im, _ in m_loc])
    report["m_loc/acc"] = _pct([a == t for a, (_, _, t) in zip(answers, m_loc, strict=True)])

    items = _mme(data)
    answers = greedy_answers(model, encoder, [(q, im) for _, _, im, q, _ in items], max_new_tokens=1)
    answered = [(c, image_id, a == truth) for (c, image_id, _, _, truth), a in zip(items, answers, strict=True)]
    for category in sorted({c for c, _, _ in answered}):
        chosen = [(image_id, hit) for c, image_id, hit in answered if c == category]
        scores = mme_scores([image_id for image_id, _ in chosen], torch.tensor([hit for _, hit in chosen]))
        report[f"mme/{category}/acc"] = scores["acc"].item()
        report[f"mme/{category}/acc_plus"] = scores["acc_plus"].item()
    return report


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny_llava", help="folder of the pretrained tiny LLaVA")
    parser.add_argument("--data", default="data/embedded", help="folder the benchmark command wrote")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--split", choices=SPLITS, default="eval", help="which split's records to report on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    report = evaluate(args.model, args.data, args.threads, args.split)
    for name, value in report.items():
        log.info("%-40s %7.2f", name, value)
    log.info("evaluated in %.1f s", time.perf_counter() - start)


if __name__ == "__main__":
    main()
