"""Key capture: the inputs ("keys") of edited modules, pooled at the right positions.

A forward hook on each module accumulates the sum and count of its input rows during the
forwards that run inside :meth:`KeyCapture.record`. Image modules (the visual projector) only ever
see visual features, so all their rows count; text modules count only the positions the current
query marks (text tokens, or the positions that predict the target). A module never receives
another modality's keys: no mixed-modality summaries.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class KeyCapture:
    """Collects, per module path, the keys of the forwards run inside :meth:`record`.

    Args:
        modules: module path -> (module, modality) with modality ``"image"`` or ``"text"``.
        pool: keep a running mean (one row per module) rather than every key row.
    """

    def __init__(self, modules: dict[str, tuple[nn.Module, str]], pool: bool = True) -> None:
        self.modules = modules
        self.pool = pool
        self._mask: Tensor | None = None
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}
        self._rows: dict[str, list[Tensor]] = {}

    def reset(self) -> None:
        self._sums, self._counts, self._rows = {}, {}, {}

    def _hook(self, name: str, modality: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0].detach()  # (..., d_in)
            if modality == "text":
                if self._mask is None:
                    return
                if x.shape[:-1] != self._mask.shape:
                    raise RuntimeError(
                        f"{name}: input of shape {tuple(x.shape)} does not match the position mask "
                        f"{tuple(self._mask.shape)}; is it really a language-model module?"
                    )
                rows = x[self._mask]  # (n, d_in)
            else:
                rows = x.reshape(-1, x.shape[-1])  # (n, d_in): every row is a visual position
            if rows.shape[0] == 0:
                return
            rows = rows.float()
            if self.pool:
                self._sums[name] = self._sums.get(name, 0) + rows.sum(dim=0)
                self._counts[name] = self._counts.get(name, 0) + rows.shape[0]
            else:
                self._rows.setdefault(name, []).append(rows)

        return hook

    @contextmanager
    def record(self, text_positions: Tensor | None) -> Iterator[None]:
        """Capture keys of the forwards inside; ``text_positions`` (B, T) bool marks text-module positions."""
        self._mask = text_positions
        handles = [m.register_forward_hook(self._hook(n, mod)) for n, (m, mod) in self.modules.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._mask = None

    def keys(self) -> dict[str, Tensor]:
        """Module path -> (n, d_in) keys: the pooled mean (n = 1) or all rows."""
        if self.pool:
            return {n: (s / self._counts[n]).unsqueeze(0) for n, s in self._sums.items()}
        return {n: torch.cat(rows) for n, rows in self._rows.items()}
