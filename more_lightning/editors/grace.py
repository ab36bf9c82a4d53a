"""GRACE: a discrete key-value codebook at one language layer (Hartvigsen et al., 2023, "Aging with GRACE").

The model's weights are never written. A forward hook on one ``nn.Linear`` — by default the FFN output projection
(``down_proj`` / ``fc2``) of the deepest text edit point, the layer GRACE wraps in its own and EasyEdit's code — reads
the layer's **input** at the query's key position and looks it up in a codebook of entries
``(key k_i, value v_i, deferral radius ε_i, label y_i)``:

    j = argmin_i ‖h − k_i‖₂;   layer output ← v_j   if ‖h − k_j‖₂ ≤ ε_j,   else unchanged.

Key position: the last prompt position, i.e. the position whose next-token logits predict the first answer token
(under teacher forcing: one before the first supervised label; for a prompt alone, its last token). The layer's
input there depends only on the prompt (layers below, causal attention), so a query's key is the same whether it
is scored teacher-forced or answered greedily. On a hit, the value replaces the layer's output at that position
and every later one (``replace: after``, the answer positions; ``last``: that position only). A query whose key
is in no ball passes through the layer untouched: locality by construction.

Per edit (label y = the new answer's text, key k of the edit query, nearest entry j at distance d):
  * codebook empty, or d > ε_j + ε_init: a new entry (k, v, ε_init, y);
  * d ≤ ε_j + ε_init and y_j = y: expand, ε_j ← max(ε_j, d + τ), and entry j is the one trained (τ = 10⁻⁴ ‖k‖:
    the same query batched with others reaches the layer a few ulps away, and must still fall in the ball);
  * d ≤ ε_j + ε_init and y_j ≠ y: split, ε_j ← d / 2 and a new entry (k, v, d / 2, y) (d = 0: entry j is
    overwritten with the new label — the same key cannot answer two ways; keys within τ count as the same).
The trained entry's value starts at the layer's own output at the key (a new entry: the model's answer is
unchanged before the first step) and takes ``steps_per_edit`` Adam steps on the module's composite edit loss
(only the queries inside its ball have a gradient); its Adam state is reset per edit.

Simplified versus the paper: one edit per request, so no batched codebook updates; the label of an entry is the
answer text (not token ids of a classifier head); an expanded entry's value is trained further on the new edit
(GRACE keeps it); no ``num_pert`` augmentation; Euclidean distance on the raw layer input, ε in its units.

State: the codebook is tensors in the optimizer's ``state`` (``keys`` (N, d_in), ``values`` (N, d_out), ``eps``
(N,), labels as UTF-8 bytes), so the edit state file, checkpoints and ``single_edits`` carry it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from more_lightning.contract import EditPoint
from more_lightning.editors.base import Editor
from more_lightning.editors.memory import MemoryAdam
from more_lightning.editors.state import (
    texts_from_tensors,
    texts_to_tensors,
)

if TYPE_CHECKING:
    from more_lightning.backbones.base import ModelInputs
    from more_lightning.contract import EditEngine
    from more_lightning.data.records import Query

log = logging.getLogger(__name__)

CODEBOOK = ("keys", "values", "eps")  # float32 tensors of the codebook, one row per entry


def key_positions(inputs: ModelInputs) -> Tensor:
    """(B,) long: per row, the last prompt position (one before the first supervised label; without labels the
    last attended position)."""
    supervised = inputs.labels != -100  # (B, T)
    last = inputs.attention_mask.long().sum(dim=1) - 1  # (B,) right-padded rows
    first = supervised.long().argmax(dim=1) - 1  # (B,)
    return torch.where(supervised.any(dim=1), first, last)


#: keys closer than this fraction of the key's norm count as one key (the same query, batched or padded differently)
SAME_KEY = 1e-4


def distances(keys: Tensor, book: Tensor) -> Tensor:
    """Euclidean distances (B, N) of ``keys`` (B, d) to the codebook's keys (N, d), computed directly: the
    matrix-product shortcut ``cdist`` takes for more than 25 rows is off by rounding at distance 0 and at a radius."""
    return torch.cdist(keys, book, compute_mode="donot_use_mm_for_euclid_dist")


class GRACE(Editor):
    """A GRACE codebook on one language layer's FFN output projection.

    Args:
        lr: Adam learning rate of the trained value (1.0: GRACE's own edit_lr in EasyEdit).
        steps_per_edit: Adam steps per edit (GRACE runs 100; each step here is a forward and backward of the whole
            composite loss).
        epsilon: initial deferral radius ε_init of a new entry (Euclidean, in units of the layer's input).
        layer: which of the backbone's text edit points carries the codebook; ``-1`` = the last (deepest).
        replace: ``after``: the value replaces the layer output from the key position on; ``last``: there only.
    """

    def __init__(
        self,
        lr: float = 1.0,
        steps_per_edit: int = 10,
        epsilon: float = 1.0,
        layer: int = -1,
        replace: Literal["after", "last"] = "after",
    ) -> None:
        if not lr > 0:
            raise ValueError(f"GRACE: lr must be > 0, got {lr}")
        if steps_per_edit < 1:
            raise ValueError(f"GRACE: steps_per_edit must be >= 1, got {steps_per_edit}")
        if not epsilon > 0:
            raise ValueError(f"GRACE: epsilon must be > 0, got {epsilon}")
        if replace not in ("after", "last"):
            raise ValueError(f"GRACE: replace must be 'after' or 'last', got {replace!r}")
        self.lr, self.steps_per_edit, self.epsilon, self.layer = lr, steps_per_edit, epsilon, layer
        self.replace = replace
        self.path = ""
        self.value: nn.Parameter | None = None
        self.optimizer: MemoryAdam | None = None
        self.active = -1  # the entry trained during an edit (-1: none)
        self._where: tuple[Tensor, int, int] | None = None  # key positions (B,), B, T of the current forward
        self._capture: tuple[Tensor, Tensor] | None = None  # (key, raw output) of the last forward, when asked

    # --- attaching -------------------------------------------------------------------------------
    def attach(self, model: nn.Module, edit_points: Sequence[EditPoint]) -> None:
        text_points = [p for p in edit_points if p.modality == "text"]
        if not text_points:
            raise ValueError("GRACE needs at least one text edit point (backbone num_text_layers >= 1)")
        self.path = text_points[self.layer].path
        linear = model.get_submodule(self.path)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"GRACE: {self.path} is a {type(linear).__name__}, not an nn.Linear; check `layer`")
        for p in model.parameters():
            p.requires_grad_(False)
        self.value = nn.Parameter(torch.zeros(linear.out_features, device=linear.weight.device))
        linear.register_forward_hook(self._hook)
        widths = (linear.in_features, linear.out_features)
        log.info("GRACE codebook at %s (keys %d-wide, values %d-wide)", self.path, *widths)

    def configure_optimizer(self) -> torch.optim.Optimizer:
        if self.value is None:
            raise RuntimeError("attach() the editor to a model before configure_optimizer()")
        self.optimizer = MemoryAdam([self.value], CODEBOOK, lr=self.lr)
        return self.optimizer

    # --- the codebook ----------------------------------------------------------------------------
    def codebook(self) -> dict[str, Tensor]:
        """``keys`` (N, d_in), ``values`` (N, d_out), ``eps`` (N,) float32; empty before the first edit."""
        book = self.optimizer.memory if self.optimizer is not None else {}
        return {k: book[k] for k in CODEBOOK} if "keys" in book else {}

    def labels(self) -> list[str]:
        book = self.optimizer.memory
        return texts_from_tensors(book["label_bytes"], book["label_ends"]) if "label_bytes" in book else []

    def _store(self, keys: Tensor, values: Tensor, eps: Tensor, labels: list[str]) -> None:
        book = self.optimizer.memory
        book.update(keys=keys, values=values, eps=eps)
        book["label_bytes"], book["label_ends"] = texts_to_tensors(labels)

    @contextmanager
    def forward_context(self, inputs: ModelInputs) -> Iterator[None]:
        self._where = (key_positions(inputs), *inputs.input_ids.shape)
        try:
            yield
        finally:
            self._where = None

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if self._where is None:  # a forward outside the engine's logits(): no query to key on
            return None
        positions, B, T = self._where
        x, out = args[0], output
        flat = x.dim() == 2  # OPT runs its FFN on (B*T, d) rows
        if flat:
            x, out = x.view(B, T, -1), out.view(B, T, -1)
        rows = torch.arange(B, device=x.device)
        keys = x[rows, positions].float()  # (B, d_in)
        if self._capture is not None:
            self._capture = (keys.detach(), out[rows, positions].detach().float())  # (B, d_in), (B, d_out)
        book = self.codebook()
        if not book:
            return None
        dist = distances(keys, book["keys"])  # (B, N)
        nearest, index = dist.min(dim=1)  # (B,)
        hit = nearest <= book["eps"][index]  # (B,)
        if not bool(hit.any()):
            return None
        values = book["values"]  # (N, d_out)
        if self.active >= 0:  # the entry being trained: its value is the parameter (gradient flows into it)
            a = self.active
            values = torch.cat([values[:a], self.value[None], values[a + 1 :]])
        chosen = values[index].to(out.dtype)  # (B, d_out)
        steps = torch.arange(T, device=x.device)[None]  # (1, T)
        at = steps >= positions[:, None] if self.replace == "after" else steps == positions[:, None]  # (B, T)
        replaced = torch.where((at & hit[:, None])[..., None], chosen[:, None, :], out)  # (B, T, d_out)
        return replaced.reshape(output.shape) if flat else replaced

    # --- the edit --------------------------------------------------------------------------------
    @torch.no_grad()
    def key_of(self, engine: EditEngine, inputs: ModelInputs) -> tuple[Tensor, Tensor]:
        """The key (d_in,) of a query and the layer's own output (d_out,) there, from one forward."""
        self._capture = (torch.empty(0), torch.empty(0))
        try:
            engine.logits(inputs)
            key, out = self._capture
        finally:
            self._capture = None
        return key[0], out[0]

    def begin_edit(
        self,
        optimizer: torch.optim.Optimizer,
        engine: EditEngine,
        queries: dict[str, Query],
        inputs: dict[str, ModelInputs],
    ) -> None:
        key, raw = self.key_of(engine, inputs["edit"])
        label = queries["edit"].target if "edit" in queries else ""
        book, labels = self.codebook(), self.labels()
        device = key.device
        if not book:
            keys, values, eps = key.new_zeros(0, key.numel()), raw.new_zeros(0, raw.numel()), key.new_zeros(0)
        else:
            keys, values, eps = (book[k].clone() for k in CODEBOOK)
        new = True
        if labels:
            dist = distances(key[None], keys)[0]  # (N,)
            d, j = (float(v) for v in dist.min(dim=0))
            j = int(j)
            tol = SAME_KEY * max(float(key.norm()), 1.0)  # this close: the same key, seen through float noise
            if d <= float(eps[j]) + self.epsilon:
                if labels[j] == label:  # expand entry j to cover the new key (with the tolerance: a batched
                    eps[j] = max(float(eps[j]), d + tol)  # forward may see the key a few ulps farther away)
                    new, self.active = False, j
                elif d <= tol:  # the very same key: the newer edit overwrites the entry
                    labels[j], values[j] = label, raw
                    new, self.active = False, j
                else:  # split: both balls shrink to half the distance
                    eps[j] = d / 2
                    keys, values = torch.cat([keys, key[None]]), torch.cat([values, raw[None]])
                    eps, labels = torch.cat([eps, eps.new_tensor([d / 2])]), [*labels, label]
                    new, self.active = False, len(labels) - 1
        if new:
            keys, values = torch.cat([keys, key[None]]), torch.cat([values, raw[None]])
            eps, labels = torch.cat([eps, eps.new_tensor([self.epsilon])]), [*labels, label]
            self.active = len(labels) - 1
        self._store(keys.to(device), values.to(device), eps.to(device), labels)
        with torch.no_grad():
            self.value.copy_(values[self.active])
        self.optimizer.reset_moments()

    def end_edit(self, optimizer: torch.optim.Optimizer) -> None:
        book = self.optimizer.memory
        values = book["values"].clone()
        values[self.active] = self.value.detach()
        book["values"] = values
        self.active = -1
        self.optimizer.reset_moments()

    def diagnostics(self, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, float]]:
        book = self.codebook()
        eps = book["eps"] if book else torch.zeros(1)
        return {self.path: {"entries": float(eps.numel()), "mean_eps": float(eps.mean()) if eps.numel() else 0.0}}
