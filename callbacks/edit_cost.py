"""Per-edit cost: wall time, memory and the editor's state size against the edit index (paper fig. 7).

For every edit the callback reads the engine's own timing (``pl_module.last_timing``): the whole
edit (``edit_seconds``: encode, forwards, backward, write) and the editor's share
(``editor_seconds``: statistics update + write inside ``optimizer.step`` and ``end_edit``), so
``forward_backward_seconds = edit_seconds - editor_seconds``. ``step_seconds`` is the callback's own
clock from batch start to batch end, i.e. the training step plus the immediate evaluation and any
callback that runs before this one. Memory: the process's current RSS and its growth since the
stream started, the rise of the process's peak RSS during the edit (``ru_maxrss``), and on CUDA the
peak allocated during the edit above what was allocated when it began. ``state_bytes`` is
``editor.state_bytes(optimizer)``: for M-ORE it must stay flat in the edit index (DESIGN §1).

Per edit the callback keeps a handful of floats for the figure (≈ 60 bytes per edit).
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections import deque
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from callbacks.base import AnalysisCallback, integer_ticks, new_figure

log = logging.getLogger(__name__)

MB = 2**20


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak RSS of this process so far (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rolling_mean(values: deque) -> float:
    return sum(values) / len(values) if values else float("nan")


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs (0 for fewer than two points)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


class EditCost(AnalysisCallback):
    """Wall time (raw and rolling), memory and editor state bytes per edit.

    Args:
        every_k_edits: log every k-th edit (every edit is still timed and kept for the figure).
        rolling: number of edits in the rolling mean of the edit time.
        warmup_edits: edits excluded from the summary's means and slope (first-call overheads).
    """

    def __init__(self, every_k_edits: int = 1, rolling: int = 20, warmup_edits: int = 1) -> None:
        super().__init__(every_k_edits, "edit_cost")
        if rolling < 1:
            raise ValueError(f"EditCost: rolling must be >= 1, got {rolling}")
        if warmup_edits < 0:
            raise ValueError(f"EditCost: warmup_edits must be >= 0, got {warmup_edits}")
        self.rolling, self.warmup_edits = rolling, warmup_edits
        self.recent: deque = deque(maxlen=rolling)
        self.rows: list[dict[str, float]] = []
        self._start = 0.0
        self._start_rss = 0
        self._peak_before = 0
        self._cuda_before = 0

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_rss = current_rss_bytes()
        self.rows, self.recent = [], deque(maxlen=self.rolling)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)
            self._cuda_before = torch.cuda.memory_allocated(pl_module.device)
        self._peak_before = peak_rss_bytes()
        self._start = time.perf_counter()

    @staticmethod
    def _state_bytes(pl_module: LightningModule) -> int:
        optimizers = pl_module.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        return sum(pl_module.editor.state_bytes(getattr(o, "optimizer", o)) for o in optimizers)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        step_seconds = time.perf_counter() - self._start
        index = self.mark(batch, batch_idx)
        timing = getattr(pl_module, "last_timing", {}) or {}
        edit_seconds = float(timing.get("edit_seconds", step_seconds))
        editor_seconds = float(timing.get("editor_seconds", 0.0))
        self.recent.append(edit_seconds)
        rss = current_rss_bytes()
        row = {
            "edit": index,
            "edit_seconds": edit_seconds,
            "edit_seconds_rolling": rolling_mean(self.recent),
            "editor_seconds": editor_seconds,
            "forward_backward_seconds": edit_seconds - editor_seconds,
            "step_seconds": step_seconds,
            "rss_mb": rss / MB,
            "rss_growth_mb": (rss - self._start_rss) / MB,
            "peak_rss_increase_mb": (peak_rss_bytes() - self._peak_before) / MB,
            "state_bytes": float(self._state_bytes(pl_module)),
        }
        if pl_module.device.type == "cuda":
            row["cuda_peak_increase_mb"] = (torch.cuda.max_memory_allocated(pl_module.device) - self._cuda_before) / MB
        self.rows.append(row)
        if self.due(trainer, index):
            self.log_scalars(pl_module, {f"cost/{k}": v for k, v in row.items() if k != "edit"}, index)

    def summary(self) -> dict:
        rows = self.rows[self.warmup_edits :] or self.rows
        edits = [r["edit"] for r in rows]

        def mean(key: str) -> float:
            return sum(r[key] for r in rows) / len(rows)

        return {
            "num_edits": len(self.rows),
            "warmup_edits_excluded": len(self.rows) - len(rows),
            "mean_edit_seconds": mean("edit_seconds"),
            "mean_editor_seconds": mean("editor_seconds"),
            "mean_forward_backward_seconds": mean("forward_backward_seconds"),
            "edit_seconds_slope_per_100_edits": 100 * slope(edits, [r["edit_seconds"] for r in rows]),
            "state_bytes_first": self.rows[0]["state_bytes"],
            "state_bytes_last": self.rows[-1]["state_bytes"],
            "rss_growth_mb_last": self.rows[-1]["rss_growth_mb"],
        }

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.rows:
            self.publish(trainer, self.draw(), self.summary())

    def draw(self):
        """Time per edit (raw, rolling, split), memory per edit, editor state bytes per edit."""
        figure, (ax_t, ax_m, ax_s) = new_figure(3, 1, width=4.2, height=3.2)
        edits = [r["edit"] for r in self.rows]

        def col(key: str) -> list[float]:
            return [r[key] for r in self.rows]

        ax_t.plot(edits, col("edit_seconds"), ".", color="grey", ms=3, label="edit (raw)")
        ax_t.plot(edits, col("edit_seconds_rolling"), color="black", label=f"edit (rolling {self.rolling})")
        ax_t.plot(edits, col("forward_backward_seconds"), color="tab:blue", lw=0.8, label="forward/backward")
        ax_t.plot(edits, col("editor_seconds"), color="tab:orange", lw=0.8, label="editor stats + write")
        ax_t.set(title="wall time per edit", xlabel="edit index", ylabel="seconds", ylim=(0, None))
        ax_t.legend(fontsize=7)
        ax_m.plot(edits, col("rss_growth_mb"), label="RSS growth since start")
        ax_m.plot(edits, col("peak_rss_increase_mb"), label="peak RSS rise in edit")
        if "cuda_peak_increase_mb" in self.rows[0]:
            ax_m.plot(edits, col("cuda_peak_increase_mb"), label="CUDA peak above start of edit")
        ax_m.set(title="memory", xlabel="edit index", ylabel="MiB")
        ax_m.legend(fontsize=7)
        ax_s.plot(edits, [v / 1024 for v in col("state_bytes")], color="tab:green")
        ax_s.set(title="editor state", xlabel="edit index", ylabel="KiB", ylim=(0, None))
        integer_ticks(ax_t, ax_m, ax_s)
        return figure
