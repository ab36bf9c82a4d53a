"""Where the tiny LLaVA looks when it answers a VQA question of the embedded world.

``python benchmarks/world_attention.py --model models/tiny_llava --data data/embedded --split train``

For questions about scenes with two or more objects, takes every attention head's weights at the
position that predicts the first answer token and splits its mass over the 36 image tokens into:
the referent's cell (the object the question names), the other objects' cells, and the empty
cells (the three add up to the image mass). A head that finds the referent puts its mass on
``ref``; a head with its mass on ``empty`` reads the grid, not an object. Run by hand; prints one
table per question type.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import torch

from more_lightning.backbones.llava import LlavaBackbone
from more_lightning.world.benchmark import _draft
from more_lightning.world.evaluate import SPLITS, _image
from more_lightning.world.knowledge import build_knowledge
from more_lightning.world.pretrain import Encoder, pixel_values
from more_lightning.world.scenes import NUM_CELLS


@torch.no_grad()
def attention_split(model_dir: str, data_dir: str, split: str, qtypes: list[str], limit: int) -> dict:
    """{qtype: {(layer, head): (image mass, referent mass, other objects' mass, empty cells' mass)}}."""
    model, processor = LlavaBackbone(path=model_dir).load()
    model.set_attn_implementation("eager")  # attention weights are only returned by the eager kernel
    encoder, data, facts = Encoder(processor), Path(data_dir), build_knowledge()
    records = json.loads((data / f"vqa_{split}.json").read_text())
    truth = json.loads((data / "truth" / f"vqa_{split}.json").read_text())
    sums: dict[str, dict[tuple[int, int], torch.Tensor]] = defaultdict(lambda: defaultdict(lambda: torch.zeros(4)))
    counts: dict[str, int] = defaultdict(int)
    for i, (record, t) in enumerate(zip(records, truth, strict=True)):
        if t["qtype"] not in qtypes or counts[t["qtype"]] >= limit:
            continue
        draft = _draft("vqa", split, i, 0, facts)  # records are pure functions of their index
        scene, ref = draft.scene, draft.item.target
        if scene.count() < 2 or ref is None:
            continue
        ids = torch.tensor([encoder.prompt_ids(record["src"], True)])  # (1, T)
        image = pixel_values(_image(data, "images", record["image"]))[None]  # (1, 3, H, W)
        attentions = model(input_ids=ids, pixel_values=image, output_attentions=True).attentions
        cells = (ids[0] == encoder.image_token_id).nonzero().flatten()  # (36,) image-token positions
        others = [o.cell for o in scene.objects if o is not ref]
        empty = [c for c in range(NUM_CELLS) if c not in {o.cell for o in scene.objects}]
        for layer, att in enumerate(attentions):
            a = att[0, :, -1, cells]  # (H, 36): last prompt position -> image tokens
            for head in range(a.shape[0]):
                sums[t["qtype"]][(layer, head)] += torch.stack(
                    [a[head].sum(), a[head, ref.cell], a[head, others].sum(), a[head, empty].sum()]
                )
        counts[t["qtype"]] += 1
    return {q: {k: (v / counts[q]).tolist() for k, v in heads.items()} for q, heads in sums.items()}


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny_llava")
    parser.add_argument("--data", default="data/embedded")
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--qtypes", nargs="+", default=["colour", "shape", "pattern", "size", "position", "describe"])
    parser.add_argument("--limit", type=int, default=80, help="questions per type (scenes with ≥ 2 objects)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = attention_split(args.model, args.data, args.split, args.qtypes, args.limit)
    for qtype, heads in result.items():
        print(f"\n{qtype}: attention at the answer position, mass on image tokens")
        print("head   image   ref   others  empty")
        for (layer, head), (total, ref, other, empty) in sorted(heads.items()):
            print(f"L{layer}H{head}  {total:6.2f} {ref:6.2f} {other:7.2f} {empty:6.2f}")


if __name__ == "__main__":
    main()
