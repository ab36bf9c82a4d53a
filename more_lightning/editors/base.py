"""The editor protocol: what :class:`~more_lightning.module.OnlineEditModule` asks of any editor.

An editor is attached to a loaded model once (it may wrap modules or install hooks), gives the
module a ``torch.optim.Optimizer`` for gradient writers, and is told about each edit's start, its keys and
its end. Evaluation forwards always run through the model the editor left behind (its wrappers,
its hooks), so parameter-preserving editors fit too: :meth:`Editor.rewrite_query` changes the query the
module encodes (IKE's retrieved demonstrations), :meth:`Editor.forward_context` tells hooks which query a
forward is (GRACE's key position), :meth:`Editor.begin_edit` writes memory before any gradient step
(``steps_per_edit = 0``: an edit is that alone). The defaults leave the weight writers as they were. The
module never branches on the editor's name: everything editor-specific is a method here.

Parameter-preserving editors keep their memory as tensors in their optimizer's ``state`` (text as UTF-8
bytes, :func:`~more_lightning.editors.state.texts_to_tensors`), so the edit state file, the stream
checkpoint, ``single_edits`` restores and the journal's state hash cover it with no special case.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from more_lightning.contract import EditPoint

if TYPE_CHECKING:
    from more_lightning.backbones.base import ModelInputs
    from more_lightning.contract import EditEngine
    from more_lightning.data.records import Query


class Editor:
    """Base class; subclasses override what they need.

    Attributes:
        steps_per_edit: backward passes + ``optimizer.step()`` calls per edit request (0: the edit is
            :meth:`begin_edit` alone, no backward).
        key_positions: ``"text"`` or ``"target"``: where text modules' keys are pooled.
        pool_keys: hand :meth:`observe` one mean key per module (``False``: every key row).
    """

    steps_per_edit: int = 1
    key_positions: str = "text"
    pool_keys: bool = True

    def attach(self, model: nn.Module, edit_points: Sequence[EditPoint]) -> None:
        """Prepare ``model`` for editing (wrap modules, freeze the rest)."""
        raise NotImplementedError

    def configure_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose ``step()`` writes an edit."""
        raise NotImplementedError

    def apply_to_tensors(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply ``fn`` (the module's ``.to(device)``, ``.half()``, ...) to the editor's own tensors, as
        ``nn.Module._apply`` does to a module's: the editor is not a submodule of the LightningModule, so without
        this its parameters (GRACE's value, LiveEdit's expert, a memory's anchor) and networks (SERAC's, MEND's)
        would stay where :meth:`attach` made them when Lightning moves the model to its device. Parameters are
        changed in place (``p.data``), so an optimizer that holds them keeps holding them; modules are applied to;
        other tensor attributes are replaced; editors held as attributes are applied to in turn. The module calls it
        before :meth:`configure_optimizer` (Lightning moves the model first), so no optimizer state exists yet."""
        for name, value in list(vars(self).items()):
            if isinstance(value, nn.Parameter):
                applied = fn(value.data)
                if torch._has_compatible_shallow_copy_type(value.data, applied):  # CPU <-> CUDA, a dtype: in place
                    value.data = applied
                else:  # e.g. to the meta device: a new parameter, as nn.Module._apply makes one
                    setattr(self, name, nn.Parameter(applied, requires_grad=value.requires_grad))
            elif isinstance(value, nn.Module):
                value._apply(fn)
            elif isinstance(value, Tensor):
                setattr(self, name, fn(value))
            elif isinstance(value, Editor):
                value.apply_to_tensors(fn)

    def prepare(self, optimizer: torch.optim.Optimizer, engine: EditEngine) -> None:
        """Called once after :meth:`configure_optimizer`, before any edit, with the unedited model behind ``engine``.

        Editors that need statistics of the unedited model (AlphaEdit's retain keys) take them here, into
        ``optimizer.state`` so that they are saved and restored with the edit state.
        """

    def rewrite_query(self, query: Query, engine: EditEngine) -> Query:
        """The query the model is really asked, wherever the module encodes one (scoring, loss, callbacks, predict).

        Return ``query`` itself when nothing changes (the module then keeps an encoding it already has); a new
        :class:`~more_lightning.data.records.Query` (e.g. with demonstrations prepended) is encoded afresh.
        """
        return query

    def forward_context(self, inputs: ModelInputs) -> AbstractContextManager:
        """Entered around every forward the module runs (:meth:`EditEngine.logits`), with that forward's inputs:
        hooks the editor installed read what they need of the query (GRACE: the last prompt position)."""
        return nullcontext()

    def begin_edit(
        self,
        optimizer: torch.optim.Optimizer,
        engine: EditEngine,
        queries: dict[str, Query],
        inputs: dict[str, ModelInputs],
    ) -> None:
        """Called at the start of each edit's write, after θ_{t-1}'s references, before the first inner step.

        ``queries`` / ``inputs``: the edit's queries (``edit`` and whichever probes it has) and their encodings.
        Memory editors store the edit here (IKE) or open the entry the inner steps train (GRACE).
        """

    def key_modules(self) -> dict[str, tuple[nn.Module, str]]:
        """Modules whose input keys the editor needs, with their modality (empty: none)."""
        return {}

    def observe(self, optimizer: torch.optim.Optimizer, keys: dict[str, Tensor]) -> None:
        """This edit's keys, per module path: (n, d_in) rows (pooled: n = 1). Called once per edit."""

    def end_edit(self, optimizer: torch.optim.Optimizer) -> None:
        """Called after the last inner step of an edit."""

    def diagnostics(self, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, float]]:
        """The last edit's write diagnostics per edited module path (empty: the editor reports none).

        Called after :meth:`end_edit`, outside the timed editor step; numbers only (logged per edit).
        """
        return {}

    def state_metadata(self) -> dict[str, str]:
        """Settings that the saved tensors do not hold but that decide what they mean (the seed of fixed write
        bases, ...). Written into every edit state; loading a state whose values differ is an error."""
        return {}

    def written_modules(self) -> dict[str, nn.Module]:
        """Modules whose effective weight the editor changes (for analyses of ΔW)."""
        return {}

    def delta_weight(self, name: str) -> Tensor:
        """Current effective change of module ``name``'s weight, (d_out, d_in) float32."""
        raise NotImplementedError

    def state_bytes(self, optimizer: torch.optim.Optimizer) -> int:
        """Bytes of state the editor keeps (written parameters + optimizer statistics)."""
        total = 0
        for group in optimizer.param_groups:
            for p in group["params"]:
                total += p.numel() * p.element_size()
                for value in optimizer.state.get(p, {}).values():
                    if isinstance(value, Tensor):
                        total += value.numel() * value.element_size()
        return total


class DelegatingEditor(Editor):
    """An editor whose optimizer keeps the statistics and reports the writes (M-ORE, AlphaEdit).

    Its optimizer has ``observe(keys)``, ``end_edit()`` and ``edit_diagnostics()``; the protocol's hooks hand over.
    """

    def observe(self, optimizer: torch.optim.Optimizer, keys: dict[str, Tensor]) -> None:
        optimizer.observe(keys)

    def end_edit(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.end_edit()

    def diagnostics(self, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, float]]:
        return optimizer.edit_diagnostics()
