"""Helpers for stream tests: a callback that tests hand to ``cli.py`` subprocesses (``--trainer.callbacks+=...``)
and the config of a small stream."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file

import cli


class KillAfterEdit(Callback):
    """SIGKILLs its own process right after edit ``edit`` (1-based), as ``kill -9`` would: no cleanup runs."""

    def __init__(self, edit: int) -> None:
        self.edit = edit

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.edit:
            os.kill(os.getpid(), signal.SIGKILL)


def stream_config(
    path: Path,
    model_dir: Path,
    data: Path,
    *,
    data_file: str = "vqa_eval.json",
    num_edits: int = 3,
    editor: str = "{r: 16, alpha: 32, eta: 1.0, lam: 1.0, prior: public}",
    editor_class: str = "more_lightning.editors.more.MORE",
    save_every: int = 0,
    name: str = "lightning_logs",
) -> Path:
    """Write a CLI config for an M-ORE stream (or ``editor_class``'s) on a tiny LLaVA over MMEdit-schema files in
    ``data``; returns it.

    Runs go under ``<path's folder>/runs/<name>/version_N``.
    """
    path.write_text(
        f"""
seed_everything: 0
model:
  class_path: more_lightning.module.OnlineEditModule
  init_args:
    task: evqa
    save_every: {save_every}
    backbone:
      class_path: more_lightning.backbones.llava.LlavaBackbone
      init_args: {{path: {model_dir}, num_text_layers: 2}}
    editor:
      class_path: {editor_class}
      init_args: {editor}
data:
  class_path: more_lightning.data.datamodule.EditStreamDataModule
  init_args:
    data_file: {data / data_file}
    image_root: {data / "coco"}
    rephrase_root: {data / "rephrase"}
    num_edits: {num_edits}
trainer:
  max_epochs: 1
  accelerator: cpu
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {path.parent / "runs"}, name: {name}}}
"""
    )
    return path


class FailAfterEdit(Callback):
    """Raises after edit ``edit`` (1-based) is complete: the stream stops between two edits and saves what it did."""

    def __init__(self, edit: int) -> None:
        self.edit = edit

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.edit:
            raise RuntimeError(f"stopped after edit {self.edit}")


def stopped_and_resumed_equals_whole(tmp: Path, model_dir: Path, data: Path, editor_class: str, editor: str) -> None:
    """A 3-edit stream stopped after edit 2 and resumed with ``--ckpt_path last`` ends with the same edit state and
    scores as the stream run whole (the editor's memory travels through the checkpoint)."""
    runs = {}
    for name in ("whole", "stopped"):
        config = stream_config(
            tmp / f"{name}.yaml", model_dir, data, editor=editor, editor_class=editor_class, save_every=1, name=name
        )
        runs[name] = (config, tmp / "runs" / name / "version_0")
    cli.main(["fit", "--config", str(runs["whole"][0])])
    stop = ["--trainer.callbacks+=tests.stream_helpers.FailAfterEdit", "--trainer.callbacks.init_args.edit", "2"]
    with pytest.raises(RuntimeError, match="stopped after edit 2"):
        cli.main(["fit", "--config", str(runs["stopped"][0]), *stop])
    cli.main(["fit", "--config", str(runs["stopped"][0]), "--ckpt_path", "last"])
    whole, resumed = (load_file(run / "edit_state.safetensors") for _, run in runs.values())
    assert whole.keys() == resumed.keys() and whole
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    scores = [json.loads((run / "metrics.json").read_text()) for _, run in runs.values()]
    assert scores[0]["retention"] == scores[1]["retention"] and scores[0]["immediate"] == scores[1]["immediate"]
