"""Where a pretraining step's time goes: drawing the batch against training on it.

    python benchmarks/pretrain_step.py [--steps 30] [--threads 2]

Builds the stage-2 and stage-3 streams exactly as ``configs/tiny_llava_pretrain.yaml`` and
``configs/tiny_llava_pretrain_stage3.yaml`` configure them (their ``data.init_args`` and the model's
``length_chunks`` / ``dense_weight``), then times, per stage, ``--steps`` batches drawn from the stream
and ``--steps`` training steps on them (forward, backward and AdamW on a fresh tiny LLaVA with the tower
frozen, as in stages 2–3). Prints seconds per batch, per step and the share of a step the stream takes:
the stream runs in the training process, so its time adds to every step's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from more_lightning.world.pretrain import PretrainDataModule, PretrainModule
from more_lightning.world.tiny_llava import build_model

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "stage 2": ROOT / "configs" / "tiny_llava_pretrain.yaml",
    "stage 3": ROOT / "configs" / "tiny_llava_pretrain_stage3.yaml",
}
MODEL_ARGS = ("length_chunks", "dense_weight", "align_weight")


def _stage(config: Path, stage3: bool) -> tuple[PretrainDataModule, PretrainModule]:
    spec = yaml.safe_load(config.read_text())
    # past the object ramp: scenes of up to five objects, as over most of stage 2
    data_args = {**spec["data"]["init_args"], "vision_steps": 0, "object_ramp_steps": 0}
    dm = PretrainDataModule(**data_args)
    dm.stream.vision_in_stage2 = False  # the tower is frozen: no attribute batch
    dm.stream.restart_step = 0 if stage3 else None
    model_args = {k: v for k, v in spec["model"]["init_args"].items() if k in MODEL_ARGS}
    module = PretrainModule("unused", **model_args)
    module.model, module.stream = build_model(dm.tokenizer, dm.spec), dm.stream
    module.model.model.vision_tower.requires_grad_(False)
    return dm, module


def _train(module: PretrainModule, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    """One step of stages 2–3: the answers' loss plus the weighted dense and alignment losses."""
    loss, _, dense, align = module._lm_loss(batch)
    (loss + module.hparams.dense_weight * dense + module.hparams.align_weight * align).backward()
    optimizer.step()
    optimizer.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'':8} {'batch (s)':>10} {'step (s)':>10} {'stream share':>13}")
    for name, config in CONFIGS.items():
        dm, module = _stage(config, stage3=name == "stage 3")
        stream = iter(dm.stream)
        next(stream)  # caches warm
        start = time.perf_counter()
        batches = [next(stream) for _ in range(args.steps)]
        per_batch = (time.perf_counter() - start) / args.steps
        params = [p for p in module.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        _train(module, optimizer, batches[0])  # first-call overheads
        start = time.perf_counter()
        for batch in batches:
            _train(module, optimizer, batch)
        per_step = (time.perf_counter() - start) / args.steps
        share = per_batch / (per_batch + per_step)
        print(f"{name:8} {per_batch:10.3f} {per_step:10.3f} {share:13.0%}")


if __name__ == "__main__":
    main()
