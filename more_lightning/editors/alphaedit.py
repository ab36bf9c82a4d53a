"""AlphaEdit: locate-then-edit with a null-space projection (Fang et al. 2025; paper A.5–A.6), a baseline.

Edited: the FFN output projections ``W`` (d_out × d) of the backbone's last text layers. Before the
stream the retain keys ``K0`` — the inputs of each edited module at every position (text and image) of
queries from the E-VQA and E-IC **train** records (the question with the model's own answer, and the
text-locality pair) — give the null-space projector

    P = U Uᵀ,   U = eigenvectors of K0ᵀK0 / n whose eigenvalue is below ``nullspace_threshold``   (d × d)

so that ``P k0 ≈ 0`` for every retain key. Per edit, with this edit's keys ``K`` (n × d, rows at the target
positions of the edit tuple's queries), their target outputs ``W k + r`` and the keys of every earlier
edit accumulated as ``C = Σ Kpᵀ Kp`` (d × d), the write is AlphaEdit's closed form (its eq. 14):

    ΔW = argmin_{Δ = D P} ‖Δ Kᵀ − Rᵀ‖² + l2 ‖Δ‖² + ‖Δ Kpᵀ‖²  =  Rᵀ K P ((C + KᵀK) P + l2 I)⁻¹      (d_out × d)

with ``R`` (n × d_out) the residuals. ``ΔW k0 = 0`` whenever ``P k0 = 0``: the update cannot move a
retain key's output, and ``C`` keeps later edits from undoing earlier ones. After the edit ``C += KᵀK``.

Value targets. AlphaEdit (like MEMIT) finds each key's target output by optimising a shift of the
last edited layer's output for ~25 gradient steps and spreads the residual over the layers. Here the
engine's composite loss drives it: at each of the ``steps_per_edit`` inner steps the target of key ``k``
is where one gradient step ``-value_lr · G`` (``G = ∂L_edit/∂W``) would take its output, ``r = -value_lr · G k``,
and the constrained solve above realises that change; the inner steps play the value optimisation's part.

Cost: an edit solves one d × d system per module, O(d³ + n d²), and the state is P and C, O(d²) per module:
both independent of the number of edits t (``C`` folds every earlier key in; no key list grows).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from more_lightning.contract import EditEngine, EditPoint
from more_lightning.data.records import Query
from more_lightning.data.schema import load_image, read_mmedit
from more_lightning.editors.base import DelegatingEditor
from more_lightning.editors.state import keep_stats_dtype
from more_lightning.keys import KeyCapture

log = logging.getLogger(__name__)


def null_space_projector(cov: Tensor, threshold: float) -> Tensor:
    """``P = U Uᵀ`` over the eigenvectors of the symmetric ``cov`` (d × d) whose eigenvalue is below ``threshold``."""
    values, vectors = torch.linalg.eigh(cov)  # ascending; vectors (d, d) as columns
    U = vectors[:, values < threshold]  # (d, m): the (near) null space of the retain keys
    return U @ U.T


def null_space_write(R: Tensor, K: Tensor, P: Tensor, C: Tensor, l2: float) -> Tensor:
    """AlphaEdit's update ``ΔW = Rᵀ K P ((C + KᵀK) P + l2 I)⁻¹`` (Fang et al. 2025, eq. 14).

    Args:
        R: (n, d_out) residuals: the output change wanted at each key.
        K: (n, d) this edit's keys as rows.
        P: (d, d) null-space projector of the retain keys.
        C: (d, d) ``Σ Kpᵀ Kp`` over the keys of earlier edits.
        l2: weight of ``‖ΔW‖²``.

    Returns:
        (d_out, d) ``ΔW``, the minimiser over ``ΔW = D P`` of ``‖ΔW Kᵀ − Rᵀ‖² + l2 ‖ΔW‖² + Σ_p ‖ΔW kp‖²``.
    """
    eye = torch.eye(K.shape[1], dtype=K.dtype, device=K.device)
    lhs = P @ (C + K.T @ K) + l2 * eye  # (d, d)
    return torch.linalg.solve(lhs, P @ K.T @ R).T  # (d_out, d)


class AlphaEditOptimizer(torch.optim.Optimizer):
    """Writes each edited weight with :func:`null_space_write`; one param group per module, ``params = [W]``.

    ``state[W]`` holds ``P`` (d × d, set by :meth:`set_retain_keys`), ``C`` (d × d) and ``num_keys`` (edit keys
    folded into C), in ``stats_dtype`` whatever the model's dtype.
    """

    STATS = ("P", "C")

    def __init__(
        self,
        modules: Sequence[tuple[str, nn.Linear]],
        value_lr: float,
        l2: float,
        nullspace_threshold: float,
        stats_dtype: torch.dtype = torch.float32,
    ) -> None:
        if not modules:
            raise ValueError("AlphaEditOptimizer: no modules to edit")
        groups = [{"params": [m.weight], "name": name} for name, m in modules]
        super().__init__(groups, {})
        self.value_lr, self.l2, self.threshold, self.stats_dtype = value_lr, l2, nullspace_threshold, stats_dtype
        self._keys: dict[str, Tensor] = {}  # this edit's keys per module, (n, d)
        self._deltas: dict[str, Tensor] = {}  # this edit's summed ΔW per module, for diagnostics
        for group in self.param_groups:
            W = group["params"][0]
            d = W.shape[1]
            state = self.state[W]
            state["P"] = torch.eye(d, dtype=stats_dtype, device=W.device)  # no retain keys yet: no constraint
            state["C"] = torch.zeros(d, d, dtype=stats_dtype, device=W.device)
            state["num_keys"] = torch.zeros((), dtype=torch.long)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but P and C keep ``stats_dtype`` (torch would cast them to the weight's dtype)."""
        super().load_state_dict(state_dict)
        keep_stats_dtype(self, state_dict, self.STATS, self.stats_dtype)

    @torch.no_grad()
    def set_retain_keys(self, covariances: dict[str, Tensor]) -> None:
        """``P`` of each module from its retain-key second moment ``K0ᵀK0 / n`` (d × d)."""
        for group in self.param_groups:
            W = group["params"][0]
            cov = covariances[group["name"]].to(device=W.device, dtype=torch.float64)
            self.state[W]["P"] = null_space_projector(cov, self.threshold).to(self.stats_dtype)

    @torch.no_grad()
    def observe(self, keys: dict[str, Tensor]) -> None:
        self._keys = {name: k.to(self.stats_dtype) for name, k in keys.items() if k.numel()}
        self._deltas = {}

    @torch.no_grad()
    def step(self, closure=None):
        """One constrained write per module: residuals ``R = -value_lr · K Gᵀ``, then :func:`null_space_write`."""
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            W, name = group["params"][0], group["name"]
            K = self._keys.get(name)
            if W.grad is None or K is None:
                continue
            state = self.state[W]
            K = K.to(W.device)
            R = -self.value_lr * K @ W.grad.to(self.stats_dtype).T  # (n, d_out)
            delta = null_space_write(R, K, state["P"], state["C"], self.l2)  # (d_out, d)
            W.add_(delta.to(W.dtype))
            self._deltas[name] = self._deltas.get(name, 0) + delta
        return loss

    @torch.no_grad()
    def end_edit(self) -> None:
        """Fold this edit's keys into ``C`` so that later edits keep them."""
        for group in self.param_groups:
            K = self._keys.get(group["name"])
            if K is not None:
                state = self.state[group["params"][0]]
                K = K.to(state["C"].device)
                state["C"] += K.T @ K
                state["num_keys"] += K.shape[0]
        self._keys = {}

    def edit_diagnostics(self) -> dict[str, dict[str, float]]:
        """Per module: ``delta_norm`` ‖ΔW‖_F of the last edit, ``nullspace_dim`` rank of P, ``num_keys`` in C."""
        out = {}
        for group in self.param_groups:
            state = self.state[group["params"][0]]
            delta = self._deltas.get(group["name"])
            out[group["name"]] = {
                "delta_norm": float(delta.norm()) if delta is not None else 0.0,
                "nullspace_dim": float(torch.diagonal(state["P"]).sum().round()),  # trace of a projector = its rank
                "num_keys": float(state["num_keys"]),
            }
        return out


class AlphaEdit(DelegatingEditor):
    """AlphaEdit on the FFN output projections of the backbone's text edit points (the image ones are skipped).

    Args:
        retain_files: MMEdit files (the **train** splits of E-VQA and E-IC) whose records give the retain keys K0.
        image_root: image root of ``retain_files`` (holds what their ``image`` fields name).
        rephrase_root: image-rephrase root of ``retain_files``.
        retain_records: records read from each retain file (its first ones).
        value_lr: step size of the value targets (``r = -value_lr · G k``).
        l2: weight of ``‖ΔW‖²`` in the solve (AlphaEdit's ``L2``).
        nullspace_threshold: eigenvalues of ``K0ᵀK0 / n`` below this span the null space (AlphaEdit: 2e-2).
        steps_per_edit: inner value steps + constrained writes per edit.
        stats_dtype: ``"float32"`` or ``"float64"`` for P and C.
    """

    key_positions = "target"
    pool_keys = False

    def __init__(
        self,
        retain_files: list[str],
        image_root: str,
        rephrase_root: str,
        retain_records: int = 100,
        value_lr: float = 1.0,
        l2: float = 10.0,
        nullspace_threshold: float = 2e-2,
        steps_per_edit: int = 1,
        stats_dtype: str = "float32",
    ) -> None:
        for key, value in {"value_lr": value_lr, "l2": l2, "nullspace_threshold": nullspace_threshold}.items():
            if not value > 0:
                raise ValueError(f"AlphaEdit: {key} must be > 0, got {value}")
        if steps_per_edit < 1:
            raise ValueError(f"AlphaEdit: steps_per_edit must be >= 1, got {steps_per_edit}")
        if retain_records < 1 or not retain_files:
            raise ValueError(
                "AlphaEdit needs retain keys: set `retain_files` (the E-VQA and E-IC train files) and "
                f"`retain_records` >= 1 (got {retain_records})"
            )
        if stats_dtype not in ("float32", "float64"):
            raise ValueError(f"AlphaEdit: stats_dtype must be 'float32' or 'float64', got {stats_dtype!r}")
        self.retain_files, self.image_root, self.rephrase_root = list(retain_files), image_root, rephrase_root
        self.retain_records = retain_records
        self.value_lr, self.l2, self.nullspace_threshold = value_lr, l2, nullspace_threshold
        self.steps_per_edit = steps_per_edit
        self.stats_dtype = getattr(torch, stats_dtype)
        self.modules: dict[str, nn.Linear] = {}
        self.initial_weights: dict[str, Tensor] = {}

    def attach(self, model: nn.Module, edit_points: Sequence[EditPoint]) -> None:
        points = [p for p in edit_points if p.modality == "text"]
        if not points:
            raise ValueError("AlphaEdit needs at least one text edit point (backbone num_text_layers >= 1)")
        for p in model.parameters():
            p.requires_grad_(False)
        self.modules = {p.path: model.get_submodule(p.path) for p in points}
        for path, module in self.modules.items():
            module.weight.requires_grad_(True)
            self.initial_weights[path] = module.weight.detach().float().clone()
        log.info("AlphaEdit edits %s", list(self.modules))

    def configure_optimizer(self) -> AlphaEditOptimizer:
        if not self.modules:
            raise RuntimeError("attach() the editor to a model before configure_optimizer()")
        modules = list(self.modules.items())
        return AlphaEditOptimizer(modules, self.value_lr, self.l2, self.nullspace_threshold, self.stats_dtype)

    def retain_queries(self) -> list[Query]:
        """Per retain record: its question with the model's own answer (``src``, ``pred``, ``image``) and its
        text-locality pair (``loc``, ``loc_ans``)."""
        queries = []
        for path in self.retain_files:
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"AlphaEdit retain file {path!r} not found: set `--model.init_args.editor.init_args.retain_files` "
                    "to the E-VQA and E-IC train files"
                )
            for r in read_mmedit(path, self.image_root, self.rephrase_root, limit=self.retain_records):
                queries += [Query(r.src, r.pred, load_image(r.image)), Query(r.loc, r.loc_ans, None)]
        return queries

    @torch.no_grad()
    def retain_covariances(self, engine: EditEngine) -> dict[str, Tensor]:
        """``K0ᵀK0 / n`` (d × d, float64) per edited module, over every position of the retain queries."""
        capture = KeyCapture({path: (m, "text") for path, m in self.modules.items()}, pool=False)
        sums = {path: 0 for path in self.modules}
        counts = dict.fromkeys(self.modules, 0)
        for query in self.retain_queries():
            inputs = engine.encode_query(query)
            capture.reset()
            with capture.record(inputs.positions("all")):
                engine.logits(inputs)
            for path, rows in capture.keys().items():  # (n, d) float32
                rows = rows.double()
                sums[path] = sums[path] + rows.T @ rows
                counts[path] += rows.shape[0]
        return {path: sums[path] / max(counts[path], 1) for path in self.modules}

    def prepare(self, optimizer: AlphaEditOptimizer, engine: EditEngine) -> None:
        optimizer.set_retain_keys(self.retain_covariances(engine))
        for name, diag in optimizer.edit_diagnostics().items():
            log.info("AlphaEdit %s: null space of the retain keys has dimension %d", name, diag["nullspace_dim"])

    def key_modules(self) -> dict[str, tuple[nn.Module, str]]:
        return {path: (module, "text") for path, module in self.modules.items()}

    def written_modules(self) -> dict[str, nn.Module]:
        return dict(self.modules)

    def delta_weight(self, name: str) -> Tensor:
        return self.modules[name].weight.detach().float() - self.initial_weights[name]
