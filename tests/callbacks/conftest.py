"""One short edit stream with every analysis callback on, shared by the callback tests.

The stream runs on a random tiny LLaVA whose tokenizer also knows "yes" and "no" (for the MME
callback) over the MMEdit fixtures; a second run without callbacks, same seed, gives the weights the
callbacks must leave bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from tests.conftest import FIXTURE_WORDS, FIXTURES, MMEDIT

NUM_EDITS = 4
EVERY = 2


@dataclass
class StreamRun:
    log_dir: Path
    callbacks: dict[str, lightning.Callback]
    module: lightning.LightningModule
    scalars: dict[str, list[tuple[int, float]]]  # TensorBoard tag -> [(step, value)]
    images: list[str]  # TensorBoard image tags


@pytest.fixture(scope="session")
def yes_no_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny LLaVA like ``tiny_llava_dir`` whose vocabulary also holds the MME answers."""
    from more_lightning.world.tiny_llava import TinyLlavaSpec, build_model, build_processor, build_tokenizer

    folder = tmp_path_factory.mktemp("tiny_llava_yes_no")
    spec = TinyLlavaSpec(
        image_size=32, patch_size=16, vision_hidden=32, text_hidden=64, text_layers=2, text_intermediate=96
    )
    tokenizer = build_tokenizer([*FIXTURE_WORDS, "yes", "no", "there", "in", "image", "please", "answer", "or"])
    build_model(tokenizer, spec, seed=0).save_pretrained(folder)
    build_processor(tokenizer, spec).save_pretrained(folder)
    return folder


def run_stream(model_dir: Path, out_dir: Path, callbacks: list) -> lightning.LightningModule:
    """A ``NUM_EDITS``-edit M-ORE stream over the E-VQA fixture; returns the module."""

    lightning.seed_everything(0, verbose=False)
    threads = torch.get_num_threads()
    # One thread: on a shared 2-core machine a 2-thread forward of this tiny model is ~50x slower (spin-waits).
    torch.set_num_threads(1)
    try:
        return _fit(model_dir, out_dir, callbacks)
    finally:
        torch.set_num_threads(threads)


def _fit(model_dir: Path, out_dir: Path, callbacks: list) -> lightning.LightningModule:
    from more_lightning.backbones.llava import LlavaBackbone
    from more_lightning.data.datamodule import EditStreamDataModule
    from more_lightning.editors.more import MORE
    from more_lightning.module import OnlineEditModule

    module = OnlineEditModule(
        LlavaBackbone(path=str(model_dir), num_text_layers=2), MORE(r=16, alpha=32, eta=1, lam=1, prior="public")
    )
    data = EditStreamDataModule(
        data_file=str(MMEDIT / "vqa_eval.json"),
        image_root=str(MMEDIT / "coco"),
        rephrase_root=str(MMEDIT / "rephrase"),
        num_edits=NUM_EDITS,
    )
    trainer = lightning.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=TensorBoardLogger(out_dir, name="stream"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data)
    return module


def read_events(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    scalars = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags["scalars"]}
    return scalars, list(tags["images"])


@pytest.fixture(scope="session")
def stream_run(yes_no_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> StreamRun:
    from callbacks import CrossModalStatistics, EditCost, GeneralCapability, Interference, RepresentationShift

    callbacks = {
        "representation_shift": RepresentationShift(every_k_edits=EVERY, num_samples=3),
        "interference": Interference(every_k_edits=EVERY, window=3, top_k=0.05, track_edits=2),
        "cross_modal": CrossModalStatistics(every_k_edits=EVERY, num_samples=2),
        "edit_cost": EditCost(every_k_edits=1, rolling=2),
        "general_capability": GeneralCapability(
            every_k_edits=EVERY, mme_root=str(FIXTURES / "mme"), categories=["existence", "artwork"]
        ),
    }
    module = run_stream(yes_no_llava_dir, tmp_path_factory.mktemp("runs"), list(callbacks.values()))
    log_dir = Path(module.trainer.log_dir)
    scalars, images = read_events(log_dir)
    return StreamRun(log_dir, callbacks, module, scalars, images)


@pytest.fixture(scope="session")
def plain_weights(yes_no_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final state of the same stream without any callback."""
    module = run_stream(yes_no_llava_dir, tmp_path_factory.mktemp("plain"), [])
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}
