"""What the engine's parts agree on: edit points, the next-token shift, and what the stream module offers.

Backbones say *where* to edit (:class:`EditPoint`), editors write there, the module and the analysis
callbacks score next-token predictions (:func:`shift_for_loss`); none of them needs another's package
for these. :class:`EditEngine` is the typed contract of
:class:`~more_lightning.module.OnlineEditModule` as callbacks (which only observe) and editors that
need the unedited model once before the stream (AlphaEdit's retain keys) read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from more_lightning.backbones.base import Backbone, ModelInputs
    from more_lightning.data.records import Query
    from more_lightning.editors.base import Editor

Modality = Literal["image", "text"]


@dataclass(frozen=True)
class EditPoint:
    """One editable ``nn.Linear``: its module path and which modality its keys come from.

    ``image`` modules (the visual projector) see only visual features, so every row of their
    input is an image position; ``text`` modules sit in the language model and their keys are
    pooled over text (or target) positions of the token sequence.
    """

    path: str
    modality: Modality


def shift_for_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align next-token logits with the tokens they predict: (B, T-1, V) and (B, T-1)."""
    return logits[:, :-1], labels[:, 1:]


@runtime_checkable
class EditEngine(Protocol):
    """What an edit stream's module exposes to callbacks and editors (``OnlineEditModule`` satisfies it).

    Attributes:
        model: the loaded model, with whatever wrappers or hooks the editor installed.
        backbone: the model family (edit-point templates, prompt templates, ``target_prefix``).
        processor: the family's processor (``processor.tokenizer`` for answer token ids).
        edit_points: the modules the backbone declares editable.
        editor: the editor writing the stream (``written_modules``, ``delta_weight``, ``state_bytes``).
        last_timing: ``edit_seconds`` / ``editor_seconds`` of the most recent edit (empty before it).
    """

    model: nn.Module
    backbone: Backbone
    processor: object
    edit_points: Sequence[EditPoint]
    editor: Editor

    @property
    def device(self) -> torch.device: ...

    @property
    def last_timing(self) -> dict[str, float]: ...

    def encode_query(self, query: Query) -> ModelInputs:
        """``query`` tokenised by the backbone, on the model's device, floats in the model's dtype."""
        ...

    def logits(self, inputs: ModelInputs) -> Tensor:
        """(B, T, V) next-token logits of the model as the editor left it."""
        ...
