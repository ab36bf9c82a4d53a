"""Representation shift on locality samples: how far editing moves what the model computes elsewhere.

A fixed probe set — the text (``t_loc``) and multimodal (``m_loc``) locality queries of
``num_samples`` stream tuples spread evenly over the stream — is run through the model before the
first edit and every k edits. For each chosen language decoder layer ℓ (its output, caught by a
forward hook, so every backbone works through its own ``logits``) a query's hidden state is pooled
over its attended positions (``pool="mean"``) or taken at the position that predicts the answer
(``pool="answer"``), giving ``H⁰_ℓ`` (n, d) before the stream and ``H^t_ℓ`` after edit t. Per layer:

    cosine_distance = mean_i (1 - cos(h⁰_i, h^t_i))
    relative_l2     = mean_i ‖h^t_i - h⁰_i‖ / ‖h⁰_i‖
    mmd             = MMD²_rbf({h⁰_i}, {h^t_i}),  bandwidth σ = median pairwise distance of H⁰

(biased V-statistic; 0 when nothing moved). The figure projects pre- and post-stream states onto
the first two principal axes of the pre-stream states (paper figs. 4 / 8).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from callbacks.base import (
    AnalysisCallback,
    integer_ticks,
    layer_template,
    new_figure,
    observing,
    output_tensor,
    token_rows,
)
from more_lightning.contract import EditEngine

log = logging.getLogger(__name__)

PROBES = ("t_loc", "m_loc")


# --- the math: small pure functions ----------------------------------------------------------------
def cosine_distance(before: Tensor, after: Tensor) -> Tensor:
    """(n,) ``1 - cos`` between matching rows of (n, d) ``before`` and ``after``."""
    return 1 - torch.nn.functional.cosine_similarity(before, after, dim=1)


def relative_l2(before: Tensor, after: Tensor) -> Tensor:
    """(n,) ``‖after - before‖ / ‖before‖`` per row."""
    return (after - before).norm(dim=1) / before.norm(dim=1).clamp_min(torch.finfo(before.dtype).tiny)


def median_bandwidth(x: Tensor) -> float:
    """Median pairwise Euclidean distance between the rows of ``x`` (n, d) (1.0 if degenerate)."""
    d = torch.cdist(x, x)  # (n, n)
    off = d[~torch.eye(x.shape[0], dtype=torch.bool)]
    value = float(off.median()) if off.numel() else 0.0
    return value if value > 0 else 1.0


def rbf_mmd2(x: Tensor, y: Tensor, bandwidth: float) -> float:
    """Biased MMD² between samples x (n, d) and y (m, d) with ``k(a, b) = exp(-‖a-b‖² / 2σ²)``."""

    def k(a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth**2))

    return float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def pca_basis(x: Tensor, components: int = 2) -> tuple[Tensor, Tensor]:
    """Mean (d,) and the top principal axes (components, d) of the rows of ``x`` (n, d)."""
    mean = x.mean(dim=0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)  # vh (min(n, d), d)
    return mean, vh[:components]


def project(x: Tensor, mean: Tensor, axes: Tensor) -> Tensor:
    """(n, components) coordinates of ``x`` (n, d) on ``axes``."""
    return (x - mean) @ axes.T


class RepresentationShift(AnalysisCallback):
    """Hidden-state shift of locality samples, per layer, against the pre-stream model.

    Args:
        every_k_edits: measure after every k-th edit (and after the last).
        num_samples: stream tuples whose ``t_loc`` and ``m_loc`` queries form the probe set (2 queries each).
        layers: language decoder layers whose output is probed (0-based, negative from the end); None = all.
        layer_module: path template of a decoder layer (``{i}`` = index); default: read off the backbone's
            ``text_module`` (``model.language_model.layers.{i}`` for LLaVA).
        pool: ``"mean"`` over attended positions or ``"answer"`` (the position predicting the first answer token).
        plot_layers: how many of ``layers`` get a PCA panel (evenly spaced, deepest included).
    """

    def __init__(
        self,
        every_k_edits: int = 10,
        num_samples: int = 16,
        layers: list[int] | None = None,
        pool: str = "mean",
        plot_layers: int = 3,
        layer_module: str | None = None,
    ) -> None:
        super().__init__(every_k_edits, "representation_shift")
        if num_samples < 2:
            raise ValueError(f"RepresentationShift: num_samples must be >= 2, got {num_samples}")
        if pool not in ("mean", "answer"):
            raise ValueError(f"RepresentationShift: pool must be 'mean' or 'answer', got {pool!r}")
        self.num_samples, self.layers, self.pool, self.plot_layers = num_samples, layers, pool, plot_layers
        self.layer_module = layer_module
        self.probes: list = []  # encoded ModelInputs
        self.kinds: list[str] = []  # "t_loc" / "m_loc" per probe
        self.before: dict[int, Tensor] = {}  # layer -> (n, d)
        self.after: dict[int, Tensor] = {}
        self.bandwidth: dict[int, float] = {}
        self.history: list[tuple[int, dict[str, float]]] = []

    # --- probing ---------------------------------------------------------------------------------
    def _encode_probes(self, trainer: Trainer, pl_module: EditEngine) -> None:
        dataset = trainer.train_dataloader.dataset
        n = min(self.num_samples, len(dataset))
        picks = sorted({round(i * (len(dataset) - 1) / max(n - 1, 1)) for i in range(n)})
        self.probes, self.kinds = [], []
        for i in picks:
            queries = dataset[i].queries()
            for kind in PROBES:
                self.probes.append(pl_module.encode_query(queries[kind]))
                self.kinds.append(kind)

    def _resolve_layers(self, num_layers: int) -> list[int]:
        layers = list(range(num_layers)) if self.layers is None else self.layers
        resolved = []
        for layer in layers:
            if not -num_layers <= layer < num_layers:
                raise ValueError(
                    f"RepresentationShift: layer {layer} out of range; the language model has {num_layers} "
                    "decoder layers. Fix the callback's `layers` setting."
                )
            resolved.append(layer % num_layers)
        return sorted(set(resolved))

    def states(self, pl_module: EditEngine) -> dict[int, Tensor]:
        """Pooled hidden states of every probe: layer -> (n, d) float32 on CPU."""
        model = pl_module.model
        template = self.layer_module or layer_template(pl_module.backbone)
        layers = self._resolve_layers(pl_module.backbone.num_layers(model))
        rows: dict[int, list[Tensor]] = {layer: [] for layer in layers}
        current: dict[str, Tensor] = {}

        def hook_for(layer: int):
            def hook(module, args, output) -> None:
                pooled = token_rows(output_tensor(output), current["mask"])  # (n, d)
                if pooled is not None:
                    rows[layer].append(pooled.float().mean(dim=0).cpu())  # (d,)

            return hook

        handles = [model.get_submodule(template.format(i=i)).register_forward_hook(hook_for(i)) for i in layers]
        try:
            with observing(model):
                for query in self.probes:
                    if self.pool == "mean":
                        mask = query.attention_mask.bool()  # (1, T)
                    else:
                        mask = torch.zeros_like(query.image_mask)  # (1, T)
                        mask[0, query.predict_mask[0].nonzero()[0]] = True  # predicts the first answer token
                    current["mask"] = mask
                    pl_module.logits(query)
        finally:
            for handle in handles:
                handle.remove()
        return {layer: torch.stack(r) for layer, r in rows.items()}

    def measure(self, after: dict[int, Tensor]) -> dict[str, float]:
        """Scalars of ``after`` against the pre-stream states."""
        scalars: dict[str, float] = {}
        kinds = torch.tensor([k == "t_loc" for k in self.kinds])
        cos_all, mmd_all = [], []
        per_kind: dict[str, list[Tensor]] = {k: [] for k in PROBES}
        for layer, h in after.items():
            h0 = self.before[layer]
            cos = cosine_distance(h0, h)  # (n,)
            mmd = rbf_mmd2(h0, h, self.bandwidth[layer])
            scalars[f"representation_shift/layer_{layer}/cosine_distance"] = float(cos.mean())
            scalars[f"representation_shift/layer_{layer}/relative_l2"] = float(relative_l2(h0, h).mean())
            scalars[f"representation_shift/layer_{layer}/mmd"] = mmd
            cos_all.append(cos.mean())
            mmd_all.append(mmd)
            per_kind["t_loc"].append(cos[kinds])
            per_kind["m_loc"].append(cos[~kinds])
        scalars["representation_shift/cosine_distance"] = float(torch.stack(cos_all).mean())
        scalars["representation_shift/mmd"] = sum(mmd_all) / len(mmd_all)
        for kind, values in per_kind.items():
            scalars[f"representation_shift/{kind}/cosine_distance"] = float(torch.cat(values).mean())
        return scalars

    # --- hooks -----------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._encode_probes(trainer, pl_module)
        self.before = self.states(pl_module)
        self.after = self.before
        self.bandwidth = {layer: median_bandwidth(h) for layer, h in self.before.items()}
        scalars = self.measure(self.before)
        self.history = [(0, scalars)]
        self.log_scalars(pl_module, scalars, 0)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        index = self.mark(batch, batch_idx)
        if not self.due(trainer, index):
            return
        self.after = self.states(pl_module)
        scalars = self.measure(self.after)
        self.history.append((index, scalars))
        self.log_scalars(pl_module, scalars, index)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.history or not self.last_edit:
            return
        final = self.history[-1][1]
        summary = {"edit": self.history[-1][0], "final": final, "num_probes": len(self.probes), "pool": self.pool}
        self.publish(trainer, self.draw(), summary)

    def _plotted_layers(self) -> list[int]:
        layers = sorted(self.before)
        n = min(self.plot_layers, len(layers))
        if n <= 1:
            return layers[-1:]
        return [layers[round(i * (len(layers) - 1) / (n - 1))] for i in range(n)]

    def draw(self):
        """PCA (fitted on pre-stream states) of pre vs final states per plotted layer, and shift over edits."""
        layers = self._plotted_layers()
        figure, axes = new_figure(len(layers) + 1, 1, width=4.0, height=3.6)
        kinds = torch.tensor([k == "t_loc" for k in self.kinds])
        for ax, layer in zip(axes, layers, strict=False):
            mean, basis = pca_basis(self.before[layer])
            pre, post = project(self.before[layer], mean, basis), project(self.after[layer], mean, basis)
            for kind_mask, marker, label in ((kinds, "o", "text loc"), (~kinds, "s", "multimodal loc")):
                ax.scatter(
                    *pre[kind_mask].T.numpy(),
                    marker=marker,
                    facecolors="none",
                    edgecolors="grey",
                    label=f"{label}, before",
                )
                ax.scatter(
                    *post[kind_mask].T.numpy(),
                    marker=marker,
                    color="tab:red",
                    s=14,
                    label=f"{label}, edit {self.last_edit}",
                )
            for p, q in zip(pre, post, strict=True):
                ax.plot([p[0], q[0]], [p[1], q[1]], color="tab:red", lw=0.5, alpha=0.5)
            ax.set(title=f"layer {layer}: PCA of pre-edit states", xlabel="PC 1", ylabel="PC 2")
        axes[0].legend(fontsize=7)
        ax = axes[-1]
        edits = [t for t, _ in self.history]
        for layer in sorted(self.before):
            ax.plot(
                edits,
                [s[f"representation_shift/layer_{layer}/cosine_distance"] for _, s in self.history],
                marker=".",
                label=f"layer {layer}",
            )
        ax.set(title="mean cosine distance to pre-edit", xlabel="edit index", ylabel="1 - cos")
        ax.legend(fontsize=7)
        integer_ticks(ax)
        return figure
