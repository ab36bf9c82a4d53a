"""What every analysis callback shares: when to measure, where to log, how to observe without touching.

An analysis callback *observes* an edit stream (STYLE §6): its forwards run under ``torch.no_grad``
with every module put in eval mode and each module's own train/eval flag restored afterwards (a
blanket ``model.train()`` would flip modules the engine keeps in eval mode). Scalars go to every
logger against the **edit index** (``batch.index + 1``; 0 = before the stream), because
``trainer.global_step`` counts optimizer steps, not edits. Figures are drawn once at the end of the
stream with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch),
sent to TensorBoard when a ``TensorBoardLogger`` is attached, and saved as ``<run dir>/<name>.png``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)


@contextmanager
def observing(model: nn.Module) -> Iterator[None]:
    """Run the body under ``torch.no_grad`` with every module in eval mode; restore each module's mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def edit_index(batch: Any, batch_idx: int) -> int:
    """1-based index of the edit just made (the step scalars are logged against)."""
    index = getattr(batch, "index", None)
    return (batch_idx if index is None else int(index)) + 1


def layer_template(backbone: Any) -> str:
    """Path template of a language decoder layer, read off the backbone's FFN-output template.

    ``model.language_model.layers.{i}.mlp.down_proj`` (LLaVA) -> ``model.language_model.layers.{i}``;
    ``language_model.model.decoder.layers.{i}.fc2`` (BLIP-2-OPT) -> ``language_model.model.decoder.layers.{i}``.
    """
    template = getattr(backbone, "text_module", "")
    if "{i}" not in template:
        raise ValueError(
            f"cannot derive the decoder-layer path from the backbone's text_module {template!r}; "
            "set the callback's layer / module template settings explicitly"
        )
    return template.split("{i}")[0] + "{i}"


def token_rows(x: Tensor, mask: Tensor) -> Tensor | None:
    """Rows of a module's input/output ``x`` at the (B, T) positions ``mask``: (n, d).

    ``x`` is (B, T, d), or (B·T, d) where a model flattens tokens inside a layer (OPT's FFN); None if
    ``x`` is not a token sequence of this query (e.g. a vision-tower activation).
    """
    if x.shape[:-1] == mask.shape:
        return x[mask]
    if x.ndim == 2 and x.shape[0] == mask.numel():
        return x[mask.reshape(-1)]
    return None


def output_tensor(output: Any) -> Tensor:
    """A module's main output (decoder layers and attention blocks may return tuples)."""
    return output[0] if isinstance(output, tuple) else output


def run_dir(trainer: Trainer) -> Path:
    """The run folder: the logger's ``log_dir`` (e.g. ``runs/name/version_0``), else ``default_root_dir``."""
    folder = trainer.log_dir if trainer.log_dir else trainer.default_root_dir
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path


def tensorboard(trainer: Trainer):
    """The ``SummaryWriter`` of the first TensorBoard logger, or None."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


class AnalysisCallback(Callback):
    """Base class: scheduling by edit index, scalar logging, figure and JSON output.

    Args:
        every_k_edits: measure after every k-th edit (and after the last one).
        name: file stem of the PNG / JSON in the run folder and prefix of the figure's tag.
    """

    def __init__(self, every_k_edits: int, name: str) -> None:
        if every_k_edits < 1:
            raise ValueError(f"{type(self).__name__}: every_k_edits must be >= 1, got {every_k_edits}")
        self.every_k_edits = every_k_edits
        self.name = name
        self.last_edit = 0

    def mark(self, batch: Any, batch_idx: int) -> int:
        """Record and return the 1-based index of the edit that just finished."""
        self.last_edit = edit_index(batch, batch_idx)
        return self.last_edit

    def due(self, trainer: Trainer, index: int) -> bool:
        """Whether edit ``index`` (1-based) is a measurement point: every k-th edit and the last one."""
        total = trainer.num_training_batches
        last = isinstance(total, int) and index >= total
        return index % self.every_k_edits == 0 or last

    @staticmethod
    def log_scalars(pl_module: LightningModule, scalars: dict[str, float], step: int) -> None:
        for logger in pl_module.loggers:
            logger.log_metrics(scalars, step=step)

    def publish(self, trainer: Trainer, figure: Figure, summary: dict | None = None) -> Path | None:
        """Send ``figure`` to TensorBoard (tag ``<name>/figure``) and save PNG (+ JSON summary) in the run folder."""
        if not trainer.is_global_zero:
            return None
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from PIL import Image

        canvas = FigureCanvasAgg(figure)
        canvas.draw()  # render once; TensorBoard and the PNG share the pixels
        rgb = np.asarray(canvas.buffer_rgba())[..., :3]  # (H, W, 3) uint8
        writer = tensorboard(trainer)
        if writer is not None:
            writer.add_image(f"{self.name}/figure", rgb, global_step=self.last_edit, dataformats="HWC")
            writer.flush()
        folder = run_dir(trainer)
        png = folder / f"{self.name}.png"
        Image.fromarray(rgb).save(png, optimize=True)
        if summary is not None:
            (folder / f"{self.name}.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        log.info("%s: figure written to %s", type(self).__name__, png)
        return png


def new_figure(ncols: int, nrows: int = 1, width: float = 4.0, height: float = 3.2) -> tuple[Figure, list]:
    """A matplotlib ``Figure`` (object API, Agg canvas) and its axes as a flat list."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * ncols, height * nrows), dpi=80, layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False)
    return figure, [ax for row in axes for ax in row]


def integer_ticks(*axes, y: bool = False) -> None:
    """Integer-only ticks on the x axis (edit indices, lags, layers) and optionally the y axis."""
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if y:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
