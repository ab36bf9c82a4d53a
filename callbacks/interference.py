"""Inter-edit interference: how much the updates of different edits share directions and coordinates.

For each written module ``l`` the per-edit update is ``ΔW_t = D_t - D_{t-1}`` with ``D_t`` the
editor's effective weight change after edit ``t`` (``editor.delta_weight(path)``, (d_out, d_in)).
Two edits ``i < j`` interfere when their updates point the same way or touch the same weights:

    cos(i, j)     = <ΔW_i, ΔW_j>_F / (‖ΔW_i‖_F ‖ΔW_j‖_F)
    overlap(i, j) = |top_k(ΔW_i) ∩ top_k(ΔW_j)| / min(|top_k(ΔW_i)|, |top_k(ΔW_j)|)

(``top_k`` = indices of the k largest ``|entries|``, zeros excluded). Aggregated by lag ``j - i``
they give the *entanglement horizon*: the number of consecutive lags 1, 2, ... over which the mean
``|cos|`` stays at or above ``horizon_threshold``. The paper's claim (figs. 3/6) is that naive
fine-tuning collapses into a shared "edit core" (high cosine and overlap at every lag) while M-ORE's
stay near zero. Sequential forgetting re-measures the first ``track_edits`` edits' reliability
(teacher-forced token accuracy on the edit input) every k edits.

Memory is bounded by a **fixed window** of the last ``window`` edits, whatever the stream length.
Per written module the callback keeps: one float32 copy of ``D_{t-1}`` (d_out · d_in) to difference
against; ``window`` update vectors — the full ``ΔW_t`` (d_out · d_in floats) by default, or, with
``sketch_size = m``, a seeded two-sided Gaussian **random-projection sketch** ``L ΔW_t Rᵀ``
(m² floats; ``L`` (m, d_out) and ``R`` (m, d_in) with N(0, 1/m) entries, fixed per module, so
``<L X Rᵀ, L Y Rᵀ>`` is an unbiased estimate of ``<X, Y>``); ``window`` top-k index sets (≤ k int64);
and O(window) lag accumulators. Lag statistics therefore cover every pair of edits at most
``window - 1`` apart over the whole stream; the matrices drawn are those of the last window. The
forgetting history adds ``track_edits`` floats per measurement point.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from callbacks.base import AnalysisCallback, integer_ticks, new_figure, observing
from more_lightning.contract import EditEngine

log = logging.getLogger(__name__)


# --- the math: small pure functions ----------------------------------------------------------------
def gaussian_sketch_factors(d_out: int, d_in: int, m: int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded ``L`` (m, d_out) and ``R`` (m, d_in) with i.i.d. N(0, 1/m) entries."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(m, d_out, generator=generator) / math.sqrt(m)
    right = torch.randn(m, d_in, generator=generator) / math.sqrt(m)
    return left, right


def sketch(delta: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """Two-sided random projection ``vec(L ΔW Rᵀ)``: (d_out, d_in) → (m²,)."""
    return (left @ delta @ right.T).flatten()  # (m, m) -> (m²,)


def top_k_support(delta: Tensor, k: int) -> Tensor:
    """Sorted flat indices of the ``k`` largest ``|entries|`` of ``delta``, zero entries excluded.

    Returned as int32 when the indices fit (halves the window's memory), else int64.
    """
    flat = delta.flatten().abs()
    k = min(k, flat.numel())
    values, indices = torch.topk(flat, k)
    indices = torch.sort(indices[values > 0]).values
    return indices.int() if flat.numel() < 2**31 else indices


def support_overlap(a: Tensor, b: Tensor) -> float:
    """``|a ∩ b| / min(|a|, |b|)`` for two index sets; NaN when either is empty."""
    if a.numel() == 0 or b.numel() == 0:
        return float("nan")
    return float(torch.isin(a, b).sum()) / min(a.numel(), b.numel())


def overlap_matrix(supports: list[Tensor]) -> Tensor:
    """(n, n) pairwise :func:`support_overlap` of n index sets."""
    n = len(supports)
    out = torch.full((n, n), float("nan"))
    for i in range(n):
        for j in range(i, n):
            out[i, j] = out[j, i] = support_overlap(supports[i], supports[j])
    return out


def cosine_matrix(vectors: Tensor) -> Tensor:
    """(n, n) cosine similarities of the rows of ``vectors`` (n, D); NaN for a zero row."""
    norms = vectors.norm(dim=1)  # (n,)
    unit = vectors / norms.clamp_min(torch.finfo(vectors.dtype).tiny).unsqueeze(1)
    out = unit @ unit.T
    zero = norms == 0
    out[zero, :] = float("nan")
    out[:, zero] = float("nan")
    return out


def lag_profile(matrix: Tensor) -> Tensor:
    """Mean of ``matrix[i, i + lag]`` for lag = 1 .. n-1 (NaNs ignored): (n-1,)."""
    n = matrix.shape[0]
    return torch.stack([torch.nanmean(torch.diagonal(matrix, offset=lag)) for lag in range(1, n)])


def entanglement_horizon(abs_cosine_by_lag: Tensor, threshold: float) -> int:
    """Number of consecutive lags 1, 2, ... whose mean ``|cos|`` is ≥ ``threshold`` (NaN ends the run)."""
    horizon = 0
    for value in abs_cosine_by_lag.tolist():
        if not value >= threshold:
            break
        horizon += 1
    return horizon


# --- online state --------------------------------------------------------------------------------
@dataclass
class _ModuleWindow:
    """Per written module: the previous cumulative ΔW, the window, and lag accumulators."""

    previous: Tensor  # (d_out, d_in) float32, D_{t-1}
    factors: tuple[Tensor, Tensor] | None  # sketch L, R or None (exact)
    size: int
    edits: deque = field(default_factory=deque)  # edit indices in the window
    vectors: deque = field(default_factory=deque)  # (D,) update vectors (ΔW or its sketch)
    supports: deque = field(default_factory=deque)  # top-k index sets
    cos_sum: Tensor | None = None  # (size,) by lag
    abs_cos_sum: Tensor | None = None
    cos_count: Tensor | None = None
    overlap_sum: Tensor | None = None
    overlap_count: Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("cos_sum", "abs_cos_sum", "cos_count", "overlap_sum", "overlap_count"):
            setattr(self, name, torch.zeros(self.size, dtype=torch.float64))

    def push(self, index: int, step: Tensor, k: int) -> dict[str, float]:
        """Add edit ``index``'s update; accumulate its lags to the window; return its lag-1 / window means."""
        vector = (step.flatten() if self.factors is None else sketch(step, *self.factors)).cpu()  # (D,)
        support = top_k_support(step, k).cpu()
        while len(self.edits) >= self.size:  # the window holds this edit and the `size - 1` before it
            self.edits.popleft()
            self.vectors.popleft()
            self.supports.popleft()
        cos, ovl = [], []
        norm = vector.norm()
        for j, other, other_support in zip(self.edits, self.vectors, self.supports, strict=True):
            lag = index - j
            c = float(vector @ other / (norm * other.norm())) if norm > 0 and other.norm() > 0 else float("nan")
            o = support_overlap(support, other_support)
            if not math.isnan(c):
                self.cos_sum[lag] += c
                self.abs_cos_sum[lag] += abs(c)
                self.cos_count[lag] += 1
            if not math.isnan(o):
                self.overlap_sum[lag] += o
                self.overlap_count[lag] += 1
            cos.append((lag, c))
            ovl.append((lag, o))
        self.edits.append(index)
        self.vectors.append(vector)
        self.supports.append(support)
        return {
            "cosine_lag1": next((c for lag, c in cos if lag == 1), float("nan")),
            "overlap_lag1": next((o for lag, o in ovl if lag == 1), float("nan")),
            "abs_cosine_window": _nanmean([abs(c) for _, c in cos]),
            "overlap_window": _nanmean([o for _, o in ovl]),
        }

    def profiles(self) -> dict[str, Tensor]:
        """Stream-wide means by lag 1 .. size-1 (NaN where no pair was seen)."""
        lag = slice(1, self.size)
        return {
            "cosine": (self.cos_sum / self.cos_count)[lag],
            "abs_cosine": (self.abs_cos_sum / self.cos_count)[lag],
            "overlap": (self.overlap_sum / self.overlap_count)[lag],
        }


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def _finite(scalars: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in scalars.items() if not math.isnan(v)}


class Interference(AnalysisCallback):
    """Cosine / top-k overlap of per-edit updates across edits, by lag, and sequential forgetting.

    Args:
        every_k_edits: log scalars and re-measure forgetting every k edits (ΔW is read after every edit).
        window: keep the last ``window`` edits' updates per module (lags up to ``window - 1``).
        top_k: coordinates per update for the overlap; a float in (0, 1] is a fraction of d_out · d_in.
        sketch_size: ``m`` for an m × m random-projection sketch of each update; None keeps ΔW exactly.
        track_edits: re-measure the reliability of the first this many edits (0: no forgetting curve).
        horizon_threshold: mean ``|cos|`` at or above which a lag counts as entangled.
        seed: seeds the sketch factors.
    """

    def __init__(
        self,
        every_k_edits: int = 10,
        window: int = 32,
        top_k: int | float = 0.01,
        sketch_size: int | None = None,
        track_edits: int = 8,
        horizon_threshold: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(every_k_edits, "interference")
        if window < 2:
            raise ValueError(f"Interference: window must be >= 2, got {window}")
        if not top_k > 0 or (isinstance(top_k, float) and top_k > 1):
            raise ValueError(f"Interference: top_k must be an int >= 1 or a fraction in (0, 1], got {top_k}")
        if sketch_size is not None and sketch_size < 1:
            raise ValueError(f"Interference: sketch_size must be >= 1 or null, got {sketch_size}")
        if track_edits < 0:
            raise ValueError(f"Interference: track_edits must be >= 0, got {track_edits}")
        self.window, self.top_k, self.sketch_size = window, top_k, sketch_size
        self.track_edits, self.horizon_threshold, self.seed = track_edits, horizon_threshold, seed
        self.modules: dict[str, _ModuleWindow] = {}
        self.immediate_rel: dict[int, float] = {}  # stream index -> reliability right after its edit
        self.forgetting: list[tuple[int, dict[int, float]]] = []  # (edit index, {stream index: rel})

    def _k(self, numel: int) -> int:
        return max(1, round(self.top_k * numel)) if isinstance(self.top_k, float) else int(self.top_k)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.modules = {}
        for i, path in enumerate(sorted(pl_module.editor.written_modules())):
            current = pl_module.editor.delta_weight(path).detach().float()  # (d_out, d_in)
            factors = None
            if self.sketch_size is not None:
                left, right = gaussian_sketch_factors(*current.shape, self.sketch_size, self.seed + i)
                factors = (left.to(current.device), right.to(current.device))
            self.modules[path] = _ModuleWindow(current.clone(), factors, self.window)
        self.immediate_rel, self.forgetting = {}, []
        budget = self.memory_bytes()
        log.info(
            "Interference: window of %d edits over %d modules, at most %.1f MiB",
            self.window,
            len(self.modules),
            budget / 2**20,
        )
        if budget > 2**30 and self.sketch_size is None:
            log.warning(
                "Interference keeps up to %.1f GiB of exact ΔW for a window of %d edits; set the callback's "
                "`sketch_size` (e.g. 64) to keep an m x m random-projection sketch instead, or lower `window`",
                budget / 2**30,
                self.window,
            )

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        index = self.mark(batch, batch_idx)
        per_module = []
        for path, state in self.modules.items():
            current = pl_module.editor.delta_weight(path).detach().float()
            step = current - state.previous  # (d_out, d_in) ΔW_t
            state.previous = current.clone()
            per_module.append(state.push(index, step, self._k(step.numel())))
        if index - 1 < self.track_edits:
            self.immediate_rel[index - 1] = self._reliability(pl_module, batch)
        if not self.due(trainer, index):
            return
        scalars = {f"interference/{k}": _nanmean([m[k] for m in per_module]) for k in per_module[0]}
        scalars["interference/horizon"] = float(self.horizon())
        if self.immediate_rel:
            retained = self._remeasure(trainer, pl_module)
            self.forgetting.append((index, retained))
            scalars["interference/forgetting/retained_rel"] = sum(retained.values()) / len(retained)
            scalars["interference/forgetting/drop"] = sum(self.immediate_rel[i] - retained[i] for i in retained) / len(
                retained
            )
        self.log_scalars(pl_module, _finite(scalars), index)

    def memory_bytes(self) -> int:
        """Upper bound of the callback's ΔW memory over all modules, in bytes.

        Per module: ``4·d_out·d_in`` (D_{t-1}) + sketch factors ``4·m·(d_out + d_in)`` + ``window`` ×
        (``4·d_out·d_in`` exact or ``4·m²`` sketched + ``4·k`` top-k indices).
        """
        total = 0
        for state in self.modules.values():
            numel = state.previous.numel()
            vector = numel if state.factors is None else self.sketch_size**2
            factors = 0 if state.factors is None else sum(4 * f.numel() for f in state.factors)
            index_bytes = 4 if numel < 2**31 else 8
            total += 4 * numel + factors + self.window * (4 * vector + index_bytes * self._k(numel))
        return total

    # --- forgetting ------------------------------------------------------------------------------
    @staticmethod
    def _reliability(pl_module: EditEngine, batch) -> float:
        """Teacher-forced token accuracy (%) of the edit target on the edit input, observed only."""
        from more_lightning.contract import shift_for_loss
        from more_lightning.metrics.accuracy import token_accuracy

        with observing(pl_module.model):
            query = pl_module.encode_query(batch.edit)
            logits, labels = shift_for_loss(pl_module.logits(query), query.labels)
            return 100 * float(token_accuracy(logits.float(), labels)[0])

    def _remeasure(self, trainer: Trainer, pl_module: EditEngine) -> dict[int, float]:
        dataset = trainer.train_dataloader.dataset
        return {i: self._reliability(pl_module, dataset[i]) for i in sorted(self.immediate_rel)}

    # --- summaries -------------------------------------------------------------------------------
    def profiles(self) -> dict[str, Tensor]:
        """Stream-wide lag profiles averaged over modules: cosine, abs_cosine, overlap, each (window-1,)."""
        per = [m.profiles() for m in self.modules.values()]
        return {k: torch.nanmean(torch.stack([p[k] for p in per]), dim=0) for k in per[0]} if per else {}

    def horizon(self) -> int:
        profiles = self.profiles()
        return entanglement_horizon(profiles["abs_cosine"], self.horizon_threshold) if profiles else 0

    def window_matrices(self) -> tuple[list[int], Tensor, Tensor]:
        """Edit indices of the last window and its cosine / overlap matrices, averaged over modules."""
        states = list(self.modules.values())
        edits = list(states[0].edits)
        cos = torch.stack([cosine_matrix(torch.stack(list(s.vectors))) for s in states])
        ovl = torch.stack([overlap_matrix(list(s.supports)) for s in states])
        return edits, torch.nanmean(cos, dim=0), torch.nanmean(ovl, dim=0)

    def summary(self) -> dict:
        profiles = {k: v.tolist() for k, v in self.profiles().items()}
        per_module = {
            path: {k: _nanmean(v[:1].tolist()) for k, v in state.profiles().items()}
            for path, state in self.modules.items()
        }
        return {
            "window": self.window,
            "sketch_size": self.sketch_size,
            "lag_profile": profiles,
            "mean_over_lags": {k: _nanmean(v) for k, v in profiles.items()},
            "lag1_per_module": per_module,
            "horizon": self.horizon(),
            "horizon_threshold": self.horizon_threshold,
            "forgetting": {
                "immediate_rel": self.immediate_rel,
                "history": [{"edit": t, "rel": rel} for t, rel in self.forgetting],
            },
        }

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.modules or not self.last_edit:
            return
        self.publish(trainer, self.draw(), self.summary())

    def draw(self):
        """2 × 2: window cosine matrix, window overlap matrix, lag profiles, forgetting curves."""
        figure, (ax_cos, ax_ovl, ax_lag, ax_fgt) = new_figure(2, 2, width=5.0, height=4.0)
        edits, cos, ovl = self.window_matrices()
        extent = (edits[0] - 0.5, edits[-1] + 0.5, edits[-1] + 0.5, edits[0] - 0.5)
        for ax, matrix, title, vmin in ((ax_cos, cos, "cosine of ΔW_i, ΔW_j", -1), (ax_ovl, ovl, "top-k overlap", 0)):
            image = ax.imshow(
                matrix.numpy(), vmin=vmin, vmax=1, cmap="coolwarm" if vmin < 0 else "viridis", extent=extent
            )
            ax.set(title=f"{title} (last {len(edits)} edits)", xlabel="edit j", ylabel="edit i")
            figure.colorbar(image, ax=ax, shrink=0.8)
        profiles = self.profiles()
        lags = list(range(1, self.window))
        for key, style in (("cosine", "-"), ("abs_cosine", "--"), ("overlap", ":")):
            ax_lag.plot(lags, profiles[key].numpy(), style, marker=".", label=key)
        ax_lag.axhline(self.horizon_threshold, color="grey", lw=0.8)
        ax_lag.set(title=f"by lag (horizon {self.horizon()})", xlabel="lag j - i", ylim=(-1.05, 1.05))
        ax_lag.legend(fontsize=8)
        for i in sorted(self.immediate_rel):
            points = [(i + 1, self.immediate_rel[i])] + [(t, rel[i]) for t, rel in self.forgetting if i in rel]
            ax_fgt.plot(*zip(*points, strict=True), marker=".", label=f"edit {i + 1}")
        ax_fgt.set(title="sequential forgetting", xlabel="edit index", ylabel="reliability (%)", ylim=(-5, 105))
        if self.immediate_rel:
            ax_fgt.legend(fontsize=7, ncols=2)
        integer_ticks(ax_cos, ax_ovl, y=True)
        integer_ticks(ax_lag, ax_fgt)
        return figure
