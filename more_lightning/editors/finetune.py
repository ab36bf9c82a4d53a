"""FT-L: naive sequential fine-tuning of one full weight matrix (a baseline).

Following the FT-L setting of the editing literature, it fine-tunes the FFN output projection of
the last edited language layer, the whole matrix, for a few Adam steps per edit; the Adam state is
reset at every edit (each edit is its own small fine-tuning run), the weights carry over.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from more_lightning.backbones.base import EditPoint
from more_lightning.editors.base import Editor

log = logging.getLogger(__name__)


class FTL(Editor):
    """Fine-tune the full weight of one language FFN output projection.

    Args:
        lr: Adam learning rate.
        steps_per_edit: Adam steps per edit.
        layer: which of the backbone's text edit points to tune; ``-1`` = the last (deepest) one.
        weight_decay: Adam weight decay.
    """

    def __init__(self, lr: float = 1e-3, steps_per_edit: int = 5, layer: int = -1, weight_decay: float = 0.0) -> None:
        if not lr > 0:
            raise ValueError(f"FTL: lr must be > 0, got {lr}")
        if steps_per_edit < 1:
            raise ValueError(f"FTL: steps_per_edit must be >= 1, got {steps_per_edit}")
        self.lr, self.steps_per_edit, self.layer, self.weight_decay = lr, steps_per_edit, layer, weight_decay
        self.name = ""
        self.module: nn.Linear | None = None
        self.initial_weight: Tensor | None = None

    def attach(self, model: nn.Module, edit_points: Sequence[EditPoint]) -> None:
        text_points = [p for p in edit_points if p.modality == "text"]
        if not text_points:
            raise ValueError("FTL needs at least one text edit point (backbone num_text_layers >= 1)")
        point = text_points[self.layer]
        for p in model.parameters():
            p.requires_grad_(False)
        self.name = point.path
        self.module = model.get_submodule(point.path)
        self.module.weight.requires_grad_(True)
        self.initial_weight = self.module.weight.detach().float().clone()
        log.info("FTL fine-tunes %s %s", point.path, tuple(self.module.weight.shape))

    def configure_optimizer(self) -> torch.optim.Optimizer:
        if self.module is None:
            raise RuntimeError("attach() the editor to a model before configure_optimizer()")
        return torch.optim.Adam([self.module.weight], lr=self.lr, weight_decay=self.weight_decay)

    def end_edit(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.state.clear()  # a fresh Adam per edit; the weights carry over

    def written_modules(self) -> dict[str, nn.Module]:
        return {self.name: self.module} if self.module is not None else {}

    def delta_weight(self, name: str) -> Tensor:
        return self.module.weight.detach().float() - self.initial_weight
