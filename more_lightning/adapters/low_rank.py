"""The low-rank write interface ``W~ = W + scaling · B A`` (DESIGN §1), in peft's vocabulary.

``A`` (r × d_in) has orthonormal rows (``torch.nn.init.orthogonal_`` from a seeded generator) and
is frozen: a buffer, unless the ``freeze_A=False`` ablation makes it a parameter. ``B``
(d_out × r) starts at zero, so a freshly wrapped model computes exactly what the base model does.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


def _seed_for(seed: int, name: str) -> int:
    """A per-module seed: the same (seed, module path) always gives the same ``A``."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def orthonormal_rows(r: int, d: int, seed: int) -> Tensor:
    """(r, d) float32 matrix with orthonormal rows (requires r <= d)."""
    if not 0 < r <= d:
        raise ValueError(f"rank r={r} must satisfy 0 < r <= d_in={d}")
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(d, r, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(a)  # (d, r), orthonormal columns
    return q.T.contiguous().float()  # (r, d)


class LowRankLinear(nn.Module):
    """``y = base_layer(x) + scaling · (x Aᵀ) Bᵀ``.

    Args:
        base_layer: the wrapped ``nn.Linear`` (frozen here; its weight never changes unless merged).
        r: rank of the write space.
        alpha: ``scaling = alpha / r`` unless ``scaling`` is given explicitly.
        seed: seeds ``A``; combine with the module path via :func:`_seed_for` for distinct A's.
        freeze_A: keep ``A`` fixed (a buffer); ``False`` trains it (ablation).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        seed: int = 0,
        freeze_A: bool = True,
        scaling: float | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.scaling = alpha / r if scaling is None else scaling
        self.freeze_A = freeze_A
        self.merged = False
        d_out, d_in = base_layer.weight.shape
        device = base_layer.weight.device
        lora_A = orthonormal_rows(r, d_in, seed).to(device)  # (r, d_in)
        if freeze_A:
            self.register_buffer("lora_A", lora_A)
        else:
            self.lora_A = nn.Parameter(lora_A)
        # B is float32 whatever the model dtype: it is the editor's state.
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=device))  # (d_out, r)
        for p in base_layer.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        z = x.to(self.lora_A.dtype) @ self.lora_A.T  # (..., r)
        return out + (self.scaling * (z @ self.lora_B.T)).to(out.dtype)  # (..., d_out)

    def get_delta_weight(self) -> Tensor:
        """(d_out, d_in) ``scaling · B A`` in float32."""
        return self.scaling * self.lora_B @ self.lora_A

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the delta into ``base_layer.weight`` (for deployment); forward then skips the branch."""
        if not self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() + self.get_delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() - self.get_delta_weight()).to(w.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, freeze_A={self.freeze_A}"


def wrap_linear(
    model: nn.Module, path: str, r: int, alpha: float, seed: int = 0, freeze_A: bool = True
) -> LowRankLinear:
    """Replace the ``nn.Linear`` at ``path`` by a :class:`LowRankLinear` and return the wrapper.

    Wrapping is idempotent: an already wrapped module is returned as is. When ``r`` exceeds the
    module's input width the rank is capped at ``d_in`` (a warning says so) and ``scaling`` stays
    ``alpha / r`` as configured.
    """
    module = model.get_submodule(path)
    if isinstance(module, LowRankLinear):
        return module
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{path!r} is a {type(module).__name__}; only nn.Linear can be wrapped")
    rank = min(r, module.in_features)
    if rank < r:
        log.warning(
            "%s: rank %d exceeds d_in=%d; using r=%d (scaling stays alpha/r=%g)", path, r, rank, rank, alpha / r
        )
    wrapper = LowRankLinear(
        module, r=rank, alpha=alpha, seed=_seed_for(seed, path), freeze_A=freeze_A, scaling=alpha / r
    )
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, wrapper)
    return wrapper


def unwrap_linear(model: nn.Module, path: str, merge: bool = False) -> nn.Linear:
    """Put the wrapped ``nn.Linear`` back at ``path`` (the inverse of :func:`wrap_linear`) and return it.

    ``merge=True`` first folds ``scaling · B A`` into its weight; otherwise the weight is the base weight.
    """
    wrapper = model.get_submodule(path)
    if not isinstance(wrapper, LowRankLinear):
        raise TypeError(f"{path!r} is a {type(wrapper).__name__}, not a LowRankLinear")
    if merge:
        wrapper.merge()
    elif wrapper.merged:
        wrapper.unmerge()
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, wrapper.base_layer)
    return wrapper.base_layer
