"""FT-M: sequential fine-tuning of the vision-side module (a baseline; paper A.5, MMEdit's setting).

Per edit a few Adam steps on every parameter of the vision-side adaptation module — LLaVA's
``multi_modal_projector``, BLIP-2's ``language_projection`` (the backbone's ``image`` edit points),
plus the Q-Former or any other block a config names — with the Adam state reset at every edit and
the weights carried over, exactly as FT-L does for its language layer. The language model is never
written, so text-only queries (T-Loc) answer exactly as before.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from more_lightning.contract import EditPoint
from more_lightning.editors.ft_l import AdamFineTune


class FTM(AdamFineTune):
    """Fine-tune all parameters (weights and biases) of the vision-side modules.

    Args:
        lr: Adam learning rate.
        steps_per_edit: Adam steps per edit.
        modules: module paths to tune (e.g. ``[language_projection, qformer]`` for BLIP-2); default: the
            backbone's image edit points (its ``projector_modules``).
        weight_decay: Adam weight decay.
    """

    def __init__(
        self, lr: float = 1e-3, steps_per_edit: int = 5, modules: list[str] | None = None, weight_decay: float = 0.0
    ) -> None:
        super().__init__(lr=lr, steps_per_edit=steps_per_edit, weight_decay=weight_decay)
        self.modules = None if modules is None else list(modules)

    def select(self, model: nn.Module, edit_points: Sequence[EditPoint]) -> dict[str, list[str]]:
        paths = self.modules if self.modules is not None else [p.path for p in edit_points if p.modality == "image"]
        if not paths:
            raise ValueError(
                "FTM has no vision-side module to tune: set the backbone's `projector_modules` or the editor's "
                "`modules` (e.g. [model.multi_modal_projector])"
            )
        chosen = {}
        for path in paths:
            try:
                module = model.get_submodule(path)
            except AttributeError as err:
                raise ValueError(
                    f"FTM: module {path!r} does not exist in {type(model).__name__}; check the editor's `modules`"
                ) from err
            chosen[path] = [name for name, _ in module.named_parameters()]
            if not chosen[path]:
                raise ValueError(f"FTM: module {path!r} has no parameters to tune; check the editor's `modules`")
        return chosen
