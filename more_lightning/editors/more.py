"""M-ORE: Modality-decoupled Online Recursive Editing (DESIGN §1; paper eq. 7–13).

Each edited module ``l`` gets a fixed orthonormal write basis ``A_l`` (r × d_in) and an editable
``B_l`` (d_out × r); its own preconditioner ``P_l = (I + S_l)^{-1}`` (r × r) lives in the
optimizer's ``state``. Per edit, with the pooled projected key ``z = A_l k̄`` of this edit's buffer:

    S_t = S_{t-1} + z zᵀ,  S_0 = λ I                                   (eq. 10)
    P_t = P_{t-1} - P_{t-1} z zᵀ P_{t-1} / (1 + zᵀ P_{t-1} z)            (eq. 13, Sherman–Morrison)
    B  ← B - η G P_t,      G = ∂L_edit/∂B   (d_out × r)                 (eq. 12)

which is the minimiser of ‖ΔB + η G‖²_F + Tr(ΔB S_t ΔBᵀ) (eq. 11). Projector and text modules
never share statistics: each module's P sees only its own keys.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from more_lightning.adapters.low_rank import LowRankLinear, wrap_linear
from more_lightning.contract import EditPoint
from more_lightning.editors.base import DelegatingEditor
from more_lightning.editors.state import keep_stats_dtype

log = logging.getLogger(__name__)

Prior = Literal["paper", "public"]
WriteWith = Literal["current", "previous"]


def sherman_morrison(P: Tensor, z: Tensor, denom_offset: float = 1.0) -> Tensor:
    """``P - (P z)(P z)ᵀ / (c + zᵀ P z)`` for symmetric ``P`` (r × r) and ``z`` (r,).

    With ``c = 1`` this is eq. 13: if ``P = (I + S)^{-1}`` then the result is ``(I + S + z zᵀ)^{-1}``.
    With ``c = λ`` and ``P = λ (λ I + S)^{-1}`` it gives ``λ (λ I + S + z zᵀ)^{-1}`` (public-code form).
    """
    u = P @ z  # (r,)
    return P - torch.outer(u, u) / (denom_offset + z @ u)


def woodbury(P: Tensor, Z: Tensor, denom_offset: float = 1.0) -> Tensor:
    """``n`` rank-one updates of :func:`sherman_morrison` at once: ``P - P Zᵀ (c I + Z P Zᵀ)⁻¹ Z P``.

    ``Z`` (n, r) holds the keys as rows; equal to folding them in one by one (Woodbury identity), with one
    n × n solve instead of n sequential updates (``pool: false`` feeds every key row of an edit).
    """
    U = Z @ P  # (n, r); P symmetric, so (P Zᵀ)ᵀ
    inner = denom_offset * torch.eye(Z.shape[0], dtype=P.dtype, device=P.device) + U @ Z.T  # (n, n)
    return P - U.T @ torch.linalg.solve(inner, U)


def key_spectrum(P: Tensor, lam: float, prior: Prior) -> Tensor:
    """Eigenvalues of the key statistics S = Σ z zᵀ behind a preconditioner P, ascending, clipped at 0.

    paper: P = ((1 + λ) I + S)⁻¹ ⇒ s = 1/μ − 1 − λ;  public: P = λ (λ I + S)⁻¹ ⇒ s = λ/μ − λ (μ: P's eigenvalues).
    """
    mu = torch.linalg.eigvalsh(P.double())
    s = 1.0 / mu - 1.0 - lam if prior == "paper" else lam / mu - lam
    return s.clamp_min(0.0)


def effective_rank(s: Tensor) -> float:
    """exp of the entropy of the normalised spectrum ``s`` (1 for one direction, len(s) for a flat one; 0 if empty)."""
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def closed_form_write(G: Tensor, P: Tensor, eta: float) -> Tensor:
    """``ΔB = -η G P`` (eq. 12): G (d_out × r), P (r × r) → (d_out × r)."""
    return -eta * (G @ P)


@dataclass(frozen=True)
class MORESettings:
    """M-ORE's write hyperparameters, validated once; :class:`MORE` builds them, :class:`MOREOptimizer` reads them."""

    eta: float = 0.1
    """Step size η of text modules (eq. 12)."""
    lam: float = 2000.0
    """λ of text modules: the prior ``S_0 = λ I`` (eq. 10)."""
    image_eta: float | None = None
    """η of image (projector) modules; ``None``: ``eta``."""
    image_lam: float | None = None
    """λ of image (projector) modules; ``None``: ``lam``."""
    prior: Prior = "paper"
    """``"paper"``: ``P = (I + S)^{-1}``, ``S_0 = λ I`` (eq. 10–13). ``"public"``: the authors' code, ``P_0 = I``
    and ``P ← P - u uᵀ / (λ + zᵀ u)``, i.e. ``P = λ (λ I + S)^{-1}``."""
    write_with: WriteWith = "current"
    """``"current"`` writes with ``P_t`` (P already holds this edit's key, paper); ``"previous"`` writes with
    ``P_{t-1}`` and folds the key in at the edit's end (public code)."""
    pool: bool = True
    """One pooled key per edit (rank-one update); ``False`` feeds every key row to S."""
    top_k: int | None = None
    """Write only the ``top_k`` modules with the largest gradient norm per step (``None``: all)."""
    stats_dtype: str = "float64"
    """``"float64"`` or ``"float32"``: dtype of ``P`` whatever the model's dtype."""
    precondition: bool = True
    """``False`` makes ``P = I`` (plain low-rank fine-tuning, "LoRA-FT")."""

    def __post_init__(self) -> None:
        for key in ("eta", "lam", "image_eta", "image_lam"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"M-ORE: {key} must be > 0, got {value}")
        if self.prior not in ("paper", "public"):
            raise ValueError(f"M-ORE: prior must be 'paper' or 'public', got {self.prior!r}")
        if self.write_with not in ("current", "previous"):
            raise ValueError(f"M-ORE: write_with must be 'current' or 'previous', got {self.write_with!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"M-ORE: top_k must be >= 1 or None, got {self.top_k}")
        if self.stats_dtype not in ("float32", "float64"):
            raise ValueError(f"M-ORE: stats_dtype must be 'float32' or 'float64', got {self.stats_dtype!r}")

    def eta_for(self, modality: str) -> float:
        return self.image_eta if modality == "image" and self.image_eta is not None else self.eta

    def lam_for(self, modality: str) -> float:
        return self.image_lam if modality == "image" and self.image_lam is not None else self.lam

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.stats_dtype)


class MOREOptimizer(torch.optim.Optimizer):
    """Closed-form preconditioned writer; one param group per edited module.

    Args:
        adapters: ``(module path, adapter, modality)`` per edited module.
        settings: the write hyperparameters (η, λ per modality, prior, write order, pooling, top-k, P's dtype,
            preconditioning); default :class:`MORESettings`'s.
    """

    def __init__(
        self, adapters: Sequence[tuple[str, LowRankLinear, str]], settings: MORESettings | None = None
    ) -> None:
        settings = MORESettings() if settings is None else settings
        if not adapters:
            raise ValueError("MOREOptimizer: no modules to edit")
        groups = []
        for name, adapter, modality in adapters:
            params = [adapter.lora_B] + ([adapter.lora_A] if isinstance(adapter.lora_A, nn.Parameter) else [])
            groups.append(
                {
                    "params": params,
                    "name": name,
                    "modality": modality,
                    "eta": settings.eta_for(modality),
                    "lam": settings.lam_for(modality),
                }
            )
        defaults = {"eta": settings.eta, "lam": settings.lam}
        super().__init__(groups, defaults)
        self.adapters = {name: adapter for name, adapter, _ in adapters}
        self.settings = settings
        self._pending: dict[str, Tensor] = {}
        # this edit's tensors for :meth:`edit_diagnostics`, kept by reference (no work in the timed write)
        self._edit_keys: dict[str, Tensor] = {}  # projected keys Z
        self._first_grads: dict[str, Tensor] = {}  # G at the first inner step
        self._first_writes: dict[str, Tensor] = {}  # ΔB of the first inner step
        self._edit_deltas: dict[str, list[Tensor]] = {}  # every ΔB of this edit
        self._first_step = True
        self._A: dict[str, Tensor] = {}  # A in stats_dtype, per module (A is fixed unless trained)
        if settings.precondition:  # P exists from the start, so state_dict() is complete before the first edit
            for group in self.param_groups:
                self._state(group)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but P keeps ``stats_dtype`` (torch would cast it to B's dtype)."""
        super().load_state_dict(state_dict)
        keep_stats_dtype(self, state_dict, ("P",), self.settings.dtype)

    # --- statistics ----------------------------------------------------------------------------
    def _state(self, group: dict) -> dict:
        B = group["params"][0]
        state = self.state[B]
        if "P" not in state:
            r = B.shape[1]
            eye = torch.eye(r, dtype=self.settings.dtype, device=B.device)
            # paper: P_0 = (I + λI)^{-1};  public code: P_0 = I (= λ (λ I)^{-1})
            state["P"] = eye / (1.0 + group["lam"]) if self.settings.prior == "paper" else eye
            state["num_keys"] = torch.zeros((), dtype=torch.long)
            state["num_writes"] = torch.zeros((), dtype=torch.long)
        return state

    def _fold_keys(self, group: dict, keys: Tensor) -> None:
        """Rank-one Sherman–Morrison update(s) of the group's P with keys (n, d_in)."""
        state = self._state(group)
        A = self._stats_A(group["name"])  # (r, d_in)
        keys = keys.to(device=A.device, dtype=self.settings.dtype)
        if self.settings.pool:
            keys = keys.mean(dim=0, keepdim=True)  # (1, d_in)
        Z = keys @ A.T  # (n, r) projected keys
        self._edit_keys[group["name"]] = Z
        offset = 1.0 if self.settings.prior == "paper" else group["lam"]
        P = sherman_morrison(state["P"], Z[0], offset) if Z.shape[0] == 1 else woodbury(state["P"], Z, offset)
        state["P"] = 0.5 * (P + P.T)  # keep exactly symmetric against round-off drift
        state["num_keys"] += Z.shape[0]

    def _stats_A(self, name: str) -> Tensor:
        A = self.adapters[name].lora_A
        if isinstance(A, nn.Parameter):  # trained (freeze_A: false): follow it
            return A.detach().to(self.settings.dtype)
        if name not in self._A:
            self._A[name] = A.detach().to(self.settings.dtype)
        return self._A[name]

    @torch.no_grad()
    def observe(self, keys: dict[str, Tensor]) -> None:
        """This edit's keys per module path, (n, d_in) each (n = 1 when already pooled).

        ``write_with="current"`` folds them into P now (so this edit's writes use ``P_t``);
        ``"previous"`` defers that to :meth:`end_edit`.
        """
        self._edit_keys, self._first_grads, self._first_writes, self._edit_deltas = {}, {}, {}, {}
        self._first_step = True  # a new edit starts here
        if not self.settings.precondition:
            return
        for group in self.param_groups:
            k = keys.get(group["name"])
            if k is None or k.numel() == 0:
                continue
            if self.settings.write_with == "current":
                self._fold_keys(group, k)
            else:
                self._pending[group["name"]] = k.detach()

    @torch.no_grad()
    def end_edit(self) -> None:
        for group in self.param_groups:
            k = self._pending.pop(group["name"], None)
            if k is not None:
                self._fold_keys(group, k)

    @torch.no_grad()
    def edit_diagnostics(self) -> dict[str, dict[str, float]]:
        """The last edit's write, per module path (call after :meth:`end_edit`).

        ``grad_norm`` ‖G‖_F at the edit's first step; ``delta_norm`` ‖ΔB‖_F of the whole edit (0: not
        written, e.g. left out by ``top_k``); ``removed_share`` 1 − ‖GP‖/‖G‖ at the first step (0 for
        LoRA-FT); ``z_sq`` ‖z‖² of the edit's projected key and ``z_sq_over_lam`` = ``z_sq`` / λ; and the
        occupancy of the key statistics S = Σ z zᵀ after the edit, from P's eigenvalues μ (paper prior
        P = ((1+λ) I + S)⁻¹: s = 1/μ − 1 − λ; public P = λ(λ I + S)⁻¹: s = λ/μ − λ): ``s_above_lam`` (how
        many eigenvalues of S exceed λ), ``s_max``, ``effective_rank`` exp(entropy of s / Σ s).
        """
        diagnostics = {}
        for group in self.param_groups:
            name = group["name"]
            diag = {}
            if name in self._edit_keys:  # ‖z‖² (mean over rows when not pooled)
                diag["z_sq"] = float(self._edit_keys[name].pow(2).sum(dim=1).mean())
                diag["z_sq_over_lam"] = diag["z_sq"] / group["lam"]
            if name in self._first_grads:
                g_norm = diag["grad_norm"] = float(self._first_grads[name].double().norm())
                if name in self._first_writes:  # the share of the raw step -ηG that P removed: 1 - ‖GP‖ / ‖G‖
                    delta_norm = float(self._first_writes[name].norm())
                    diag["removed_share"] = 1.0 - delta_norm / (group["eta"] * g_norm) if g_norm else 0.0
            deltas = self._edit_deltas.get(name)
            diag["delta_norm"] = float(torch.stack(deltas).sum(0).norm()) if deltas else 0.0
            if self.settings.precondition:
                s = key_spectrum(self._state(group)["P"], group["lam"], self.settings.prior)
                diag["s_above_lam"] = float((s > group["lam"]).sum())
                diag["s_max"] = float(s.max())
                diag["effective_rank"] = effective_rank(s)
            diagnostics[name] = diag
        return diagnostics

    # --- the write -----------------------------------------------------------------------------
    def _selected(self) -> list[dict]:
        groups = [g for g in self.param_groups if g["params"][0].grad is not None]
        if self.settings.top_k is None or len(groups) <= self.settings.top_k:
            return groups
        norms = torch.stack([g["params"][0].grad.float().norm() for g in groups])
        keep = set(torch.topk(norms, self.settings.top_k).indices.tolist())
        return [g for i, g in enumerate(groups) if i in keep]

    @torch.no_grad()
    def step(self, closure=None):
        """One closed-form write ``B ← B - η G P`` per selected module (eq. 12)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        first, self._first_step = self._first_step, False
        if first:
            grads = {g["name"]: g["params"][0].grad for g in self.param_groups}
            self._first_grads = {name: grad for name, grad in grads.items() if grad is not None}
        for group in self._selected():
            B = group["params"][0]
            G = B.grad.to(self.settings.dtype)  # (d_out, r)
            if self.settings.precondition:
                state = self._state(group)
                delta = closed_form_write(G, state["P"], group["eta"])
                state["num_writes"] += 1
            else:  # LoRA-FT: P = I, nothing to keep
                delta = -group["eta"] * G
            if first:
                self._first_writes[group["name"]] = delta
            self._edit_deltas.setdefault(group["name"], []).append(delta)
            B.add_(delta.to(B.dtype))
            if len(group["params"]) > 1:  # freeze_A=False ablation: A follows its plain gradient
                A = group["params"][1]
                if A.grad is not None:
                    A.add_(A.grad, alpha=-group["eta"])
        return loss


class MORE(DelegatingEditor):
    """The M-ORE editor: wraps each edit point in a :class:`LowRankLinear` and writes with
    :class:`MOREOptimizer`.

    Args:
        r: rank of the write space (capped at a module's input width).
        alpha: ``scaling = alpha / r``.
        eta, lam: η and λ of text modules; ``image_eta`` / ``image_lam`` for the projector.
        prior: ``"paper"`` (S_0 = λ I) or ``"public"`` (P_0 = I, 1/λ scaling).
        write_with: ``"current"`` (P_t, paper) or ``"previous"`` (P_{t-1}, public code).
        pool: rank-one pooled key per edit; ``False``: every key enters S.
        freeze_A: keep A fixed (paper); ``False`` trains it (ablation).
        top_k: write only the top-k modules by gradient norm per step.
        steps_per_edit: inner closed-form writes per edit (P fixed within the edit).
        key_positions: ``"text"`` or ``"target"`` positions for text modules' keys.
        seed: seeds the write bases A.
        stats_dtype: ``"float64"`` or ``"float32"`` for P.

    ``eta`` … ``top_k`` and ``stats_dtype`` become one :class:`MORESettings` (validated there).
    """

    precondition: bool = True

    def __init__(
        self,
        r: int = 64,
        alpha: float = 128.0,
        eta: float = 0.1,
        lam: float = 2000.0,
        image_eta: float | None = None,
        image_lam: float | None = None,
        prior: Prior = "paper",
        write_with: WriteWith = "current",
        pool: bool = True,
        freeze_A: bool = True,
        top_k: int | None = None,
        steps_per_edit: int = 1,
        key_positions: str = "text",
        seed: int = 0,
        stats_dtype: str = "float64",
    ) -> None:
        if r < 1:
            raise ValueError(f"r must be >= 1, got {r}")
        if steps_per_edit < 1:
            raise ValueError(f"steps_per_edit must be >= 1, got {steps_per_edit}")
        if key_positions not in ("text", "target"):
            raise ValueError(f"key_positions must be 'text' or 'target', got {key_positions!r}")
        self.r, self.alpha, self.seed, self.freeze_A = r, alpha, seed, freeze_A
        self.settings = MORESettings(
            eta=eta,
            lam=lam,
            image_eta=image_eta,
            image_lam=image_lam,
            prior=prior,
            write_with=write_with,
            pool=pool,
            top_k=top_k,
            stats_dtype=stats_dtype,
            precondition=self.precondition,
        )
        self.steps_per_edit = steps_per_edit
        self.key_positions = key_positions
        self.pool_keys = pool
        self.adapters: list[tuple[str, LowRankLinear, str]] = []

    def attach(self, model: nn.Module, edit_points: Sequence[EditPoint]) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        self.adapters = [
            (pt.path, wrap_linear(model, pt.path, self.r, self.alpha, self.seed, self.freeze_A), pt.modality)
            for pt in edit_points
        ]
        log.info("%s edits %d modules: %s", type(self).__name__, len(self.adapters), [n for n, _, _ in self.adapters])

    def configure_optimizer(self) -> MOREOptimizer:
        if not self.adapters:
            raise RuntimeError("attach() the editor to a model before configure_optimizer()")
        return MOREOptimizer(self.adapters, self.settings)

    def key_modules(self) -> dict[str, tuple[nn.Module, str]]:
        if not self.precondition:
            return {}
        return {name: (adapter, modality) for name, adapter, modality in self.adapters}

    def written_modules(self) -> dict[str, nn.Module]:
        return {name: adapter for name, adapter, _ in self.adapters}

    def state_metadata(self) -> dict[str, str]:
        # a frozen A is rebuilt from (seed, r) and never saved: B means nothing under other bases
        return {"write_bases": f"seed={self.seed} r={self.r}"} if self.freeze_A else {}

    def delta_weight(self, name: str) -> Tensor:
        return self.written_modules()[name].get_delta_weight().detach()
