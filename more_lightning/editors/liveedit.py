"""LiveEdit: one low-rank expert per edit at a language layer, routed by visual and textual relevance (Chen et al.,
2025, "Lifelong Knowledge Editing for Vision Language Models with Low-Rank Mixture-of-Experts", CVPR).

The model's weights are never written. A forward hook on one ``nn.Linear`` — by default the FFN output projection
(``down_proj`` / ``fc2``) of the deepest text edit point; its output is what the decoder layer adds to the residual
stream, where the authors' code adds its experts — reads two routing keys of the query from the layer's **input**
``x`` (B, T, d_in):

    visual key  v = mean of x over the query's image positions        (none for a text-only query)
    textual key t = x at the last prompt position (GRACE's key: the position that predicts the first answer token)

and adds the routed experts' low-rank deltas to the layer's output:

    y = x Wᵀ + Σ_i g_i · x A_iᵀ B_iᵀ,          A_i (r, d_in), B_i (d_out, r)

at every position of the sequence (``span: all``, as the authors' code adds its residual) or from the key position on
(``span: after``). Routing, for a query against expert i (keys v_i, t_i of the edit that made it):
  1. hard filter by visual relevance: h_i = cos(v, v_i) ≥ ``visual_threshold`` when both have an image; a query
     without an image passes only the experts of edits without one (every expert of an image edit is visually
     irrelevant to a text-only question), and an image query never passes those;
  2. soft routing by textual relevance, s_i = cos(t, t_i): the experts with h_i and s_i ≥ ``text_threshold`` are
     routed, g_i = softmax_i(s_i / ``temperature``) over them; every other g_i = 0.
A query that no expert passes gets nothing added: its forward is the unedited model's, bit for bit (locality by
construction, tested).

Per edit: the edit query's keys (one forward of the current model; the keys sit upstream of the experts, so they are
the unedited model's), a new expert (A from a seeded normal N(0, 1/d_in), B = 0, so the model is unchanged before the
first step) appended to the memory, then ``steps_per_edit`` Adam steps on (A, B) alone against the engine's composite
edit loss (L_rel + L_gen + L_loc, every probe routed as at inference, so the expert learns alongside the experts it
is mixed with); Adam's moments are reset per edit and the older experts stay frozen.

Simplified versus the paper and the authors' code (qizhou000/LiveEdit, ``editor/vllm_editors/liveedit/liveedit.py``,
followed as published in the fork Wang-Z-W/LiveEdit-MultiGPU; BLIP-2 settings from its
``records/liveedit/blip2-opt-2.7b/EVQA/config.yaml``):
  * Expert generation: the authors meta-train generators (``moegen_c`` / ``moegen_r``, cross-attention over the edit's
    layer-l_e representations) that emit an expert in one forward; here each expert is trained by a few Adam steps on
    the edit itself, GRACE-style, which needs no training stage and no train-split data. Their expert is a ReLU
    low-rank MLP on the layer-normed decoder-layer output, relu(LN(h) Cᵀ) R · scale, added to the residual stream;
    here it is a linear LoRA delta on the FFN output projection (no LayerNorm, no ReLU, no scale: B carries it).
  * Routing features: theirs are learned (two cross-attention extractors, 4 query embeddings of width 1024) and the
    hard filter compares against a learned, query-dependent "visual prototype" similarity instead of a fixed
    threshold; here the features are the layer's own input (mean over image positions; the key position) compared
    by cosine against fixed thresholds chosen on the train split.
  * Soft weights: theirs are softmax(s) · sigmoid(s) over every visually relevant expert (small but nonzero for
    textually far ones); here softmax over those above ``text_threshold`` and exactly zero for the rest.
  * One edit per request (no batched edits).

State and cost: per expert A (r·d_in), B (d_out·r), v (d_in), t (d_in) float32 and one flag, kept as stacked tensors
in the optimizer's ``state`` (``lora_A`` (N, r, d_in), ``lora_B`` (N, d_out, r), ``visual_keys`` (N, d_in),
``text_keys`` (N, d_in), ``with_image`` (N,) bool), so the edit state file, checkpoints and ``single_edits`` carry
it; the memory and the routing cost (two (N, d_in) cosine products per forward) grow with the number of edits N,
the delta costs O(k r (d_in + d_out)) per position for the k routed experts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from more_lightning.contract import EditPoint
from more_lightning.editors.base import Editor
from more_lightning.editors.grace import key_positions
from more_lightning.editors.memory import MemoryAdam

if TYPE_CHECKING:
    from more_lightning.backbones.base import ModelInputs
    from more_lightning.contract import EditEngine
    from more_lightning.data.records import Query

log = logging.getLogger(__name__)

MEMORY = ("lora_A", "lora_B", "visual_keys", "text_keys")  # float32 tensors of the expert memory, one row per expert


@dataclass
class QueryKeys:
    """Routing keys of a batch of queries: ``visual`` (B, d_in) (zeros where ``with_image`` is False), ``with_image``
    (B,) bool, ``text`` (B, d_in)."""

    visual: Tensor
    with_image: Tensor
    text: Tensor


def route(
    keys: QueryKeys,
    memory: dict[str, Tensor],
    visual_threshold: float,
    text_threshold: float,
    temperature: float,
) -> Tensor:
    """(B, N) float32 gates g of N experts for B queries: hard visual filter, then a softmax over the textually
    relevant experts (zero for the rest; a row with no routed expert is all zeros)."""
    cos_v = F.normalize(keys.visual.float(), dim=-1) @ F.normalize(memory["visual_keys"], dim=-1).T  # (B, N)
    q_img, e_img = keys.with_image[:, None], memory["with_image"][None].bool()  # (B, 1), (1, N)
    hard = (q_img & e_img & (cos_v >= visual_threshold)) | (~q_img & ~e_img)  # (B, N)
    sim = F.normalize(keys.text.float(), dim=-1) @ F.normalize(memory["text_keys"], dim=-1).T  # (B, N)
    routed = hard & (sim >= text_threshold)  # (B, N)
    logits = torch.where(routed, sim / temperature, torch.full_like(sim, float("-inf")))
    gates = torch.softmax(logits, dim=-1)  # rows with no routed expert: nan
    return torch.where(routed, gates, torch.zeros_like(gates))


def mixture_delta(x: Tensor, lora_A: Tensor, lora_B: Tensor, gates: Tensor) -> Tensor:
    """Σ g_i x A_iᵀ B_iᵀ (B, T, d_out); x (B, T, d_in), lora_A (N, r, d_in), lora_B (N, d_out, r), gates (B, N)."""
    low = torch.einsum("btd,nrd->btnr", x, lora_A)  # (B, T, N, r)
    return torch.einsum("btnr,nor,bn->bto", low, lora_B, gates)  # (B, T, d_out)


class LiveEdit(Editor):
    """A memory of routed low-rank experts on one language layer's FFN output projection.

    Args:
        rank: rank r of every expert (LiveEdit: 4).
        lr: Adam learning rate of the new expert's A and B.
        steps_per_edit: Adam steps per edit (each a forward and backward of the whole composite loss).
        layer: which of the backbone's text edit points carries the experts; ``-1`` = the last (deepest).
        visual_threshold: hard filter: the least cosine between the query's and the expert's visual keys.
        text_threshold: soft routing: the least cosine between textual keys for an expert to be routed at all.
        temperature: softmax temperature of the soft weights over the routed experts' textual cosines.
        span: ``all``: the delta is added at every position (the authors'); ``after``: from the key position on.
        seed: seed of the experts' initial A (expert i draws from ``seed + i``).
    """

    def __init__(
        self,
        rank: int = 4,
        lr: float = 0.05,
        steps_per_edit: int = 10,
        layer: int = -1,
        visual_threshold: float = 0.98,
        text_threshold: float = 0.9,
        temperature: float = 0.05,
        span: Literal["all", "after"] = "all",
        seed: int = 0,
    ) -> None:
        if rank < 1:
            raise ValueError(f"LiveEdit: rank must be >= 1, got {rank}")
        if not lr > 0:
            raise ValueError(f"LiveEdit: lr must be > 0, got {lr}")
        if steps_per_edit < 1:
            raise ValueError(f"LiveEdit: steps_per_edit must be >= 1, got {steps_per_edit}")
        for name, value in (("visual_threshold", visual_threshold), ("text_threshold", text_threshold)):
            if not -1.0 <= value <= 1.0:
                raise ValueError(f"LiveEdit: {name} is a cosine similarity, in [-1, 1]; got {value}")
        if not temperature > 0:
            raise ValueError(f"LiveEdit: temperature must be > 0, got {temperature}")
        if span not in ("all", "after"):
            raise ValueError(f"LiveEdit: span must be 'all' or 'after', got {span!r}")
        self.rank, self.lr, self.steps_per_edit, self.layer = rank, lr, steps_per_edit, layer
        self.visual_threshold, self.text_threshold, self.temperature = visual_threshold, text_threshold, temperature
        self.span, self.seed = span, seed
        self.path = ""
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.optimizer: MemoryAdam | None = None
        self.active = -1  # the expert trained during an edit (-1: none)
        self._inputs: ModelInputs | None = None  # the current forward's inputs (set by forward_context)
        self._capture: QueryKeys | None = None  # keys of the last forward, when asked
        self.last_gates: Tensor | None = None  # (B, N) gates of the last forward through the hook (diagnostics, tests)

    # --- attaching -------------------------------------------------------------------------------
    def attach(self, model: nn.Module, edit_points: Sequence[EditPoint]) -> None:
        text_points = [p for p in edit_points if p.modality == "text"]
        if not text_points:
            raise ValueError("LiveEdit needs at least one text edit point (backbone num_text_layers >= 1)")
        if not -len(text_points) <= self.layer < len(text_points):
            raise ValueError(
                f"LiveEdit: layer {self.layer} is not among the backbone's {len(text_points)} text edit points; "
                "set `layer` within them or raise the backbone's num_text_layers"
            )
        self.path = text_points[self.layer].path
        linear = model.get_submodule(self.path)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"LiveEdit: {self.path} is a {type(linear).__name__}, not an nn.Linear; check `layer`")
        for p in model.parameters():
            p.requires_grad_(False)
        device = linear.weight.device
        self.lora_A = nn.Parameter(torch.zeros(self.rank, linear.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, self.rank, device=device))
        linear.register_forward_hook(self._hook)
        log.info("LiveEdit experts (rank %d) at %s", self.rank, self.path)

    def configure_optimizer(self) -> torch.optim.Optimizer:
        if self.lora_A is None:
            raise RuntimeError("attach() the editor to a model before configure_optimizer()")
        self.optimizer = MemoryAdam([self.lora_A, self.lora_B], MEMORY, lr=self.lr)
        return self.optimizer

    # --- the memory ------------------------------------------------------------------------------
    def experts(self) -> dict[str, Tensor]:
        """``lora_A`` (N, r, d_in), ``lora_B`` (N, d_out, r), ``visual_keys`` / ``text_keys`` (N, d_in) float32,
        ``with_image`` (N,) bool; empty before the first edit."""
        memory = self.optimizer.memory if self.optimizer is not None else {}
        return {k: memory[k] for k in (*MEMORY, "with_image")} if "lora_A" in memory else {}

    def gates(self, keys: QueryKeys, memory: dict[str, Tensor]) -> Tensor:
        """(B, N) gates of the memory's experts for queries with ``keys`` (:func:`route`, this editor's settings)."""
        return route(keys, memory, self.visual_threshold, self.text_threshold, self.temperature)

    @contextmanager
    def forward_context(self, inputs: ModelInputs) -> Iterator[None]:
        self._inputs = inputs
        try:
            yield
        finally:
            self._inputs = None

    def query_keys(self, x: Tensor, inputs: ModelInputs) -> QueryKeys:
        """The routing keys of the queries ``inputs`` from the hooked layer's input ``x`` (B, T, d_in)."""
        image = inputs.image_mask.to(x.device)  # (B, T)
        counts = image.sum(dim=1)  # (B,)
        visual = (x.float() * image[..., None]).sum(dim=1) / counts.clamp(min=1)[:, None]  # (B, d_in)
        rows = torch.arange(x.shape[0], device=x.device)
        text = x[rows, key_positions(inputs).to(x.device)].float()  # (B, d_in)
        return QueryKeys(visual=visual, with_image=counts > 0, text=text)

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if self._inputs is None:  # a forward outside the engine's logits(): no query to route
            return None
        inputs = self._inputs
        B, T = inputs.input_ids.shape
        x, out = args[0], output
        flat = x.dim() == 2  # OPT runs its FFN on (B*T, d) rows
        if flat:
            x, out = x.view(B, T, -1), out.view(B, T, -1)
        keys = self.query_keys(x.detach(), inputs)
        if self._capture is not None:
            self._capture = keys
        memory = self.experts()
        self.last_gates = None
        if not memory:
            return None
        lora_A, lora_B = memory["lora_A"], memory["lora_B"]
        if self.active >= 0:  # the expert being trained: its factors are the parameters (gradient flows into them)
            a = self.active
            lora_A = torch.cat([lora_A[:a], self.lora_A[None], lora_A[a + 1 :]])
            lora_B = torch.cat([lora_B[:a], self.lora_B[None], lora_B[a + 1 :]])
        gates = self.gates(keys, memory)  # (B, N)
        self.last_gates = gates.detach()
        used = gates.sum(dim=0) > 0  # (N,) experts routed for any row
        if not bool(used.any()):
            return None
        delta = mixture_delta(x.float(), lora_A[used], lora_B[used], gates[:, used])  # (B, T, d_out)
        at = inputs.attention_mask.to(x.device).bool()  # (B, T)
        if self.span == "after":
            steps = torch.arange(T, device=x.device)[None]  # (1, T)
            at = at & (steps >= key_positions(inputs).to(x.device)[:, None])
        at = at & (gates.sum(dim=1) > 0)[:, None]  # rows with no routed expert stay exactly as they were
        edited = torch.where(at[..., None], out + delta.to(out.dtype), out)  # (B, T, d_out)
        return edited.reshape(output.shape) if flat else edited

    # --- the edit --------------------------------------------------------------------------------
    @torch.no_grad()
    def keys_of(self, engine: EditEngine, inputs: ModelInputs) -> QueryKeys:
        """The routing keys of a query (one row), from one forward of the current model."""
        self._capture = QueryKeys(torch.empty(0), torch.empty(0), torch.empty(0))
        try:
            engine.logits(inputs)
            keys = self._capture
        finally:
            self._capture = None
        return keys

    def begin_edit(
        self,
        optimizer: torch.optim.Optimizer,
        engine: EditEngine,
        queries: dict[str, Query],
        inputs: dict[str, ModelInputs],
    ) -> None:
        keys = self.keys_of(engine, inputs["edit"])
        memory, n = self.experts(), 0
        device = self.lora_A.device
        generator = torch.Generator().manual_seed(self.seed + (len(memory["lora_A"]) if memory else 0))
        d_in = self.lora_A.shape[1]
        with torch.no_grad():
            self.lora_A.copy_(torch.randn(self.lora_A.shape, generator=generator) / d_in**0.5)
            self.lora_B.zero_()
        new = {
            "lora_A": self.lora_A.detach()[None],
            "lora_B": self.lora_B.detach()[None],
            "visual_keys": keys.visual.to(device),
            "text_keys": keys.text.to(device),
            "with_image": keys.with_image.to(device),
        }
        if memory:
            n = len(memory["lora_A"])
            new = {k: torch.cat([memory[k], v.to(memory[k].dtype)]) for k, v in new.items()}
        else:
            new = {k: v.clone() for k, v in new.items()}
        self.optimizer.memory.update(new)
        self.active = n
        self.optimizer.reset_moments()

    def end_edit(self, optimizer: torch.optim.Optimizer) -> None:
        memory = self.optimizer.memory
        for name, param in (("lora_A", self.lora_A), ("lora_B", self.lora_B)):
            stacked = memory[name].clone()
            stacked[self.active] = param.detach()
            memory[name] = stacked
        self.active = -1
        self.optimizer.reset_moments()

    def diagnostics(self, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, float]]:
        memory = self.experts()
        return {self.path: {"experts": float(len(memory["lora_A"])) if memory else 0.0}}
