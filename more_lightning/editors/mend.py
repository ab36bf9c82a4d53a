"""MEND: Model Editor Networks with gradient Decomposition (Mitchell et al. 2022; paper A.5), a baseline.

Edited: the FFN output projections ``W`` (d_out × d_in) of the backbone's text edit points (the last text
layers it declares). Over the tokens of a pass, the gradient of a loss with respect to a linear layer's
weight is a sum of rank-one outer products (Mitchell et al. 2022, eq. 1):

    ∇_W L = Σ_i δ_i u_iᵀ,   u_i = the layer's input at token i (d_in),  δ_i = ∂L/∂(W u_i) (d_out)

MEND feeds every pair through a small trained network ``g`` and writes the pseudo-gradient it returns:

    (ũ_i, δ̃_i) = g_l(u_i, δ_i),     W ← W − α_l Σ_i δ̃_i ũ_iᵀ                                   (d_out × d_in)

with ``α_l`` a learned step size per layer. ``g`` standardises ``x = [u; δ]`` (d_in + d_out) with the running
mean / std of meta-training, applies its layer's scale and shift (layers of one shape share ``g``, as in
MEND), then ``n_hidden + 1`` residual low-rank layers ``x ← x + act(x V Uᵀ + b)`` with ``U = 0``, ``b = 0`` at
initialisation: an untrained ``g`` is the identity, and an untrained MEND (no statistics yet) writes one plain
gradient step ``W ← W − α ∇_W L``.

Meta-training (:mod:`more_lightning.editors.mend_train`) is its own ``fit`` on the **train** split; it writes
the networks and step sizes to a safetensors file that :class:`MEND` loads. In a stream the gradient is that
of the engine's composite loss (the five queries of the edit; at an edit's first step ``L_loc`` has zero
gradient), the same loss the networks were meta-trained on.

Cost per edit: O(n (d_in + d_out) rank) for the networks and O(n d_in d_out) for the write, n the tokens of
the edit's queries; the state is the networks (fixed) and W: both independent of the number of edits t.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from more_lightning.contract import EditPoint
from more_lightning.editors.base import DelegatingEditor
from more_lightning.editors.state import networks_file_metadata, save_networks_file

log = logging.getLogger(__name__)

#: ``format`` metadata of an editor-network file.
NETWORKS_FORMAT = "more-lightning MEND networks v1"
#: how to make the file a stream config names
META_TRAIN_HINT = "meta-train them with `python cli.py fit --config configs/<backbone>_mend_train.yaml`"


def rank_one_gradient(u: Tensor, delta: Tensor) -> Tensor:
    """``Σ_i δ_i u_iᵀ`` (d_out × d_in) from inputs ``u`` (n, d_in) and output gradients ``delta`` (n, d_out)."""
    return delta.T @ u


class GradientFactors:
    """The rank-one factors ``(u_i, δ_i)`` of each module's weight gradient, caught during backward passes.

    A forward hook keeps each module's input of a pass that builds a graph and hangs a hook on its output
    that, when a backward pass reaches it, stores the pair (rows over every position of the pass). Pairs of
    a graph that is never differentiated are never stored.

    Args:
        modules: module path -> the ``nn.Linear``.
    """

    def __init__(self, modules: dict[str, nn.Linear]) -> None:
        self.modules = modules
        self._pairs: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self._handles: list = []

    def clear(self) -> None:
        self._pairs = {}

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            u = args[0].detach().reshape(-1, args[0].shape[-1])  # (n, d_in)

            def store(grad: Tensor) -> None:
                self._pairs.setdefault(name, []).append((u, grad.detach().reshape(-1, grad.shape[-1])))

            output.register_hook(store)

        return hook

    def install(self) -> None:
        """Hook the modules until :meth:`remove`."""
        self._handles += [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def record(self) -> Iterator[None]:
        """Hook the modules for the forwards inside (their backward may come after)."""
        self.install()
        try:
            yield
        finally:
            self.remove()

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Module path -> ``(u, δ)``: (n, d_in) inputs and (n, d_out) output gradients, every stored row."""
        return {
            name: (torch.cat([u for u, _ in pairs]), torch.cat([d for _, d in pairs]))
            for name, pairs in self._pairs.items()
        }


class LowRankResidual(nn.Module):
    """``x ← x + act(x V Uᵀ + b)`` (MEND's ``LRLinear`` with ``init="id"``); ``U = 0``: the identity at init.

    Args:
        dim: width of ``x``.
        rank: inner rank of ``V Uᵀ``.
        relu: apply a ReLU to the branch (hidden layers) or not (the last layer).
    """

    def __init__(self, dim: int, rank: int, relu: bool) -> None:
        super().__init__()
        self.V = nn.Parameter(torch.randn(dim, rank) / dim**0.5)  # (dim, rank)
        self.U = nn.Parameter(torch.zeros(dim, rank))  # (dim, rank)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        branch = (x @ self.V) @ self.U.T + self.bias  # (n, dim)
        return x + (branch.clamp(min=0) if self.relu else branch)


class EditorNetwork(nn.Module):
    """``g: (u, δ) -> (ũ, δ̃)`` for layers of one shape; ``mode`` picks the layer's scale and shift.

    Running mean / variance of ``x = [u; δ]`` are buffers, updated from every batch of rows in training mode
    and used as they stand otherwise (before any update: mean 0, std 1).

    Args:
        d_in, d_out: the edited layers' input and output widths.
        rank: rank of each residual layer.
        n_hidden: hidden (ReLU) layers; one linear residual layer follows them.
        n_modes: layers sharing this network (one scale and shift each).
    """

    def __init__(self, d_in: int, d_out: int, rank: int, n_hidden: int = 1, n_modes: int = 1) -> None:
        super().__init__()
        dim = d_in + d_out
        self.d_in = d_in
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))  # Σ (x - mean)²
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))
        self.layers = nn.ModuleList(LowRankResidual(dim, rank, relu=i < n_hidden) for i in range(n_hidden + 1))

    @torch.no_grad()
    def update_stats(self, x: Tensor) -> None:
        """Merge the rows ``x`` (n, dim) into the running mean and variance (Chan et al.'s parallel update)."""
        x = x.double()
        n, mean = x.shape[0], x.mean(0)
        total = self.count + n
        shift = mean - self.mean
        self.m2 += ((x - mean) ** 2).sum(0) + shift**2 * self.count * n / total
        self.mean += shift * n / total
        self.count.copy_(total)

    def standardise(self, x: Tensor) -> Tensor:
        if self.count < 2:
            return x
        std = (self.m2 / (self.count - 1)).sqrt()
        return (x - self.mean.to(x.dtype)) / (std.to(x.dtype) + 1e-7)

    def forward(self, u: Tensor, delta: Tensor, mode: int = 0) -> tuple[Tensor, Tensor]:
        x = torch.cat([u, delta], dim=-1).float()  # (n, d_in + d_out)
        if self.training:
            self.update_stats(x)
        x = self.standardise(x) * self.mode_scale[mode] + self.mode_shift[mode]
        for layer in self.layers:
            x = layer(x)
        return x[:, : self.d_in], x[:, self.d_in :]  # (n, d_in), (n, d_out)


class MENDNetworks(nn.Module):
    """The editor networks of a set of layers and their learned step sizes ``α_l`` (``edit_lrs``).

    Args:
        shapes: module path -> its weight's ``(d_out, d_in)``, in edit-point order.
        rank: rank of the networks' residual layers (MEND: 1920).
        n_hidden: hidden layers per network (MEND: 1).
        share: one network per distinct shape, a scale and shift per layer (MEND's ``shared``); ``False``: one
            network per layer.
        edit_lr: initial ``α_l``.
        seed: seeds the networks' ``V``.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        rank: int = 1920,
        n_hidden: int = 1,
        share: bool = True,
        edit_lr: float = 1e-4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not shapes:
            raise ValueError("MEND: no layers to edit")
        if rank < 1 or n_hidden < 0:
            raise ValueError(f"MEND: rank must be >= 1 and n_hidden >= 0, got {rank} and {n_hidden}")
        self.shapes = {path: (int(d_out), int(d_in)) for path, (d_out, d_in) in shapes.items()}
        self.rank, self.n_hidden, self.share = rank, n_hidden, share
        keys = [f"{d_out}x{d_in}" if share else f"layer{i}" for i, (d_out, d_in) in enumerate(self.shapes.values())]
        self.route = {
            path: (key, keys[:i].count(key)) for i, (path, key) in enumerate(zip(self.shapes, keys, strict=True))
        }
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        nets = {}
        for path, key in zip(self.shapes, keys, strict=True):
            if key not in nets:
                d_out, d_in = self.shapes[path]
                nets[key] = EditorNetwork(d_in, d_out, rank, n_hidden, n_modes=keys.count(key))
        torch.random.set_rng_state(generator_state)
        self.nets = nn.ModuleDict(nets)
        self.edit_lrs = nn.Parameter(torch.full((len(self.shapes),), float(edit_lr)))

    def delta(self, path: str, u: Tensor, delta: Tensor) -> Tensor:
        """The write ``−α_l Σ_i δ̃_i ũ_iᵀ`` (d_out × d_in, float32) of layer ``path`` from its factors (n, ·)."""
        key, mode = self.route[path]
        u_t, d_t = self.nets[key](u, delta, mode)  # (n, d_in), (n, d_out)
        return -self.edit_lrs[list(self.shapes).index(path)] * rank_one_gradient(u_t, d_t)

    def metadata(self) -> dict[str, str]:
        settings = {"rank": self.rank, "n_hidden": self.n_hidden, "share": self.share}
        return {"format": NETWORKS_FORMAT, "shapes": json.dumps(self.shapes), "settings": json.dumps(settings)}

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write the networks (and ``metadata``, e.g. what they were trained on) to a safetensors file atomically."""
        save_networks_file(self, path, {**(metadata or {}), **self.metadata()})

    @classmethod
    def load(cls, path: str | Path) -> MENDNetworks:
        """Networks written by :meth:`save`.

        Raises:
            FileNotFoundError: there is no such file (the message says how to make it).
            ValueError: the file is not an editor-network file.
        """
        metadata = networks_file_metadata(path, "MEND editor networks", NETWORKS_FORMAT, META_TRAIN_HINT)
        shapes = {p: tuple(s) for p, s in json.loads(metadata["shapes"]).items()}
        networks = cls(shapes, **json.loads(metadata["settings"]))
        networks.load_state_dict(load_file(path))
        return networks


class MENDOptimizer(torch.optim.Optimizer):
    """Writes each edited weight with the networks' pseudo-gradient; one param group per module, ``params = [W]``.

    The factors come from :class:`GradientFactors` hooked on the modules; :meth:`zero_grad` also drops the
    stored factors, so a step sees exactly the factors of the backward pass since the last ``zero_grad``.
    """

    def __init__(
        self,
        modules: Sequence[tuple[str, nn.Linear]],
        networks: MENDNetworks,
        factors: GradientFactors,
        lr_scale: float = 1.0,
    ) -> None:
        if not modules:
            raise ValueError("MENDOptimizer: no modules to edit")
        super().__init__([{"params": [m.weight], "name": name} for name, m in modules], {})
        self.networks, self.factors, self.lr_scale = networks.eval(), factors, lr_scale
        self._deltas: dict[str, Tensor] = {}
        self._rows: dict[str, int] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.factors.clear()

    def observe(self, keys: dict[str, Tensor]) -> None:
        """A new edit starts (MEND needs no keys: its inputs are the gradient factors)."""
        self._deltas, self._rows = {}, {}

    @torch.no_grad()
    def step(self, closure=None):
        """``W ← W − s α_l Σ_i δ̃_i ũ_iᵀ`` per module whose factors the last backward pass stored (s: ``lr_scale``)."""
        loss = None if closure is None else torch.enable_grad()(closure)()
        factors = self.factors.factors()
        for group in self.param_groups:
            W, name = group["params"][0], group["name"]
            if name not in factors:
                continue
            self.networks.to(W.device)  # a no-op after the first step
            u, delta_out = (f.float() for f in factors[name])
            delta = self.lr_scale * self.networks.delta(name, u, delta_out)  # (d_out, d_in)
            W.add_(delta.to(W.dtype))
            self._deltas[name] = self._deltas.get(name, 0) + delta
            self._rows[name] = u.shape[0]
        self.factors.clear()
        return loss

    def end_edit(self) -> None:
        self.factors.clear()

    def edit_diagnostics(self) -> dict[str, dict[str, float]]:
        """Per module: ``delta_norm`` ‖ΔW‖_F of the last edit and ``rows`` (token pairs fed to the network)."""
        return {
            group["name"]: {
                "delta_norm": float(self._deltas[group["name"]].norm()) if group["name"] in self._deltas else 0.0,
                "rows": float(self._rows.get(group["name"], 0)),
            }
            for group in self.param_groups
        }


def text_linears(model: nn.Module, edit_points: Sequence[EditPoint], editor: str) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` of every text edit point, by path (MEND edits language layers only)."""
    points = [p for p in edit_points if p.modality == "text"]
    if not points:
        raise ValueError(f"{editor} needs at least one text edit point (backbone num_text_layers >= 1)")
    return {p.path: model.get_submodule(p.path) for p in points}


class MEND(DelegatingEditor):
    """MEND on the FFN output projections of the backbone's text edit points (the image ones are skipped).

    Args:
        networks: the meta-trained editor networks (safetensors), written by
            ``python cli.py fit --config configs/<backbone>_mend_train.yaml``.
        steps_per_edit: network writes per edit (MEND: 1).
        lr_scale: multiplies the learned step sizes ``α_l`` at edit time (MEND: 1); a stream-time knob, tuned on
            the train split like every editor's.
    """

    def __init__(self, networks: str, steps_per_edit: int = 1, lr_scale: float = 1.0) -> None:
        if steps_per_edit < 1:
            raise ValueError(f"MEND: steps_per_edit must be >= 1, got {steps_per_edit}")
        if not lr_scale > 0:
            raise ValueError(f"MEND: lr_scale must be > 0, got {lr_scale}")
        self.networks_file = networks
        self.steps_per_edit = steps_per_edit
        self.lr_scale = lr_scale
        self.modules: dict[str, nn.Linear] = {}
        self.initial_weights: dict[str, Tensor] = {}
        self.networks: MENDNetworks | None = None
        self.factors: GradientFactors | None = None

    def attach(self, model: nn.Module, edit_points: Sequence[EditPoint]) -> None:
        self.modules = text_linears(model, edit_points, "MEND")
        networks = MENDNetworks.load(self.networks_file)
        shapes = {path: tuple(m.weight.shape) for path, m in self.modules.items()}
        if networks.shapes != shapes:
            raise ValueError(
                f"MEND networks {self.networks_file} were meta-trained for {networks.shapes}, this backbone's text "
                f"edit points are {shapes}: use the networks of this backbone and num_text_layers, or {META_TRAIN_HINT}"
            )
        for p in model.parameters():
            p.requires_grad_(False)
        for path, module in self.modules.items():
            module.weight.requires_grad_(True)  # the backward pass must reach the module's output
            self.initial_weights[path] = module.weight.detach().float().clone()
        self.networks = networks.requires_grad_(False)
        self.factors = GradientFactors(self.modules)
        self.factors.install()
        log.info("MEND edits %s with the networks of %s", list(self.modules), self.networks_file)

    def configure_optimizer(self) -> MENDOptimizer:
        if self.networks is None:
            raise RuntimeError("attach() the editor to a model before configure_optimizer()")
        return MENDOptimizer(list(self.modules.items()), self.networks, self.factors, self.lr_scale)

    def written_modules(self) -> dict[str, nn.Module]:
        return dict(self.modules)

    def delta_weight(self, name: str) -> Tensor:
        return self.modules[name].weight.detach().float() - self.initial_weights[name]

    def state_bytes(self, optimizer: torch.optim.Optimizer) -> int:
        """The written weights, plus the editor networks the editor keeps beside them."""
        networks = sum(t.numel() * t.element_size() for t in self.networks.state_dict().values())
        return super().state_bytes(optimizer) + networks
