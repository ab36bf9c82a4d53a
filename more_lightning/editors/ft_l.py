"""FT-L: naive sequential fine-tuning of one full weight matrix (a baseline), and the Adam fine-tuning it shares.

Following the FT-L setting of the editing literature, it fine-tunes the FFN output projection of
the last edited language layer, the whole matrix, for a few Adam steps per edit; the Adam state is
reset at every edit (each edit is its own small fine-tuning run), the weights carry over.
:class:`AdamFineTune` is that protocol for any set of parameters; FT-M (``editors/ft_m.py``) tunes
the vision side with it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from more_lightning.contract import EditPoint
from more_lightning.editors.base import Editor

log = logging.getLogger(__name__)


class AdamFineTune(Editor):
    """Per-edit Adam fine-tuning of the parameters :meth:`select` picks; everything else is frozen.

    Args:
        lr: Adam learning rate.
        steps_per_edit: Adam steps per edit.
        weight_decay: Adam weight decay.
    """

    def __init__(self, lr: float = 1e-3, steps_per_edit: int = 5, weight_decay: float = 0.0) -> None:
        name = type(self).__name__
        if not lr > 0:
            raise ValueError(f"{name}: lr must be > 0, got {lr}")
        if steps_per_edit < 1:
            raise ValueError(f"{name}: steps_per_edit must be >= 1, got {steps_per_edit}")
        self.lr, self.steps_per_edit, self.weight_decay = lr, steps_per_edit, weight_decay
        self.params: list[nn.Parameter] = []
        #: the nn.Linear modules whose weight is tuned, by path, and their weights before the first edit
        self.linears: dict[str, nn.Linear] = {}
        self.initial_weights: dict[str, Tensor] = {}

    def select(self, model: nn.Module, edit_points: Sequence[EditPoint]) -> dict[str, list[str]]:
        """Module path -> names of its parameters to tune (``"weight"``, ``"bias"``, ...)."""
        raise NotImplementedError

    def attach(self, model: nn.Module, edit_points: Sequence[EditPoint]) -> None:
        chosen = self.select(model, edit_points)
        for p in model.parameters():
            p.requires_grad_(False)
        self.params, self.linears, self.initial_weights = [], {}, {}
        for path, names in chosen.items():
            module = model.get_submodule(path)
            for name in names:
                param = module.get_parameter(name)
                if not param.requires_grad:  # a parameter named twice (a block and one of its linears) is tuned once
                    param.requires_grad_(True)
                    self.params.append(param)
            tuned = [(path, module)] if isinstance(module, nn.Linear) and "weight" in names else []
            if not isinstance(module, nn.Linear):  # a block (e.g. the Q-Former): its linears, for ΔW analyses
                tuned = [(f"{path}.{n}", m) for n, m in module.named_modules() if isinstance(m, nn.Linear) and n]
            for linear_path, linear in tuned:
                self.linears[linear_path] = linear
                self.initial_weights[linear_path] = linear.weight.detach().float().clone()
        count = sum(p.numel() for p in self.params)
        log.info("%s fine-tunes %s (%d parameters)", type(self).__name__, sorted(chosen), count)

    def configure_optimizer(self) -> torch.optim.Optimizer:
        if not self.params:
            raise RuntimeError("attach() the editor to a model before configure_optimizer()")
        return torch.optim.Adam(self.params, lr=self.lr, weight_decay=self.weight_decay)

    def end_edit(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.state.clear()  # a fresh Adam per edit; the weights carry over

    def written_modules(self) -> dict[str, nn.Module]:
        return dict(self.linears)

    def delta_weight(self, name: str) -> Tensor:
        return self.linears[name].weight.detach().float() - self.initial_weights[name]


class FTL(AdamFineTune):
    """Fine-tune the full weight of one language FFN output projection.

    Args:
        lr: Adam learning rate.
        steps_per_edit: Adam steps per edit.
        layer: which of the backbone's text edit points to tune; ``-1`` = the last (deepest) one.
        weight_decay: Adam weight decay.
    """

    def __init__(self, lr: float = 1e-3, steps_per_edit: int = 5, layer: int = -1, weight_decay: float = 0.0) -> None:
        super().__init__(lr=lr, steps_per_edit=steps_per_edit, weight_decay=weight_decay)
        self.layer = layer

    def select(self, model: nn.Module, edit_points: Sequence[EditPoint]) -> dict[str, list[str]]:
        text_points = [p for p in edit_points if p.modality == "text"]
        if not text_points:
            raise ValueError("FTL needs at least one text edit point (backbone num_text_layers >= 1)")
        return {text_points[self.layer].path: ["weight"]}
