"""Cross-modal statistics: how differently text and image positions load each edited module.

On a fixed probe set (the ``edit`` and ``m_loc`` queries of ``num_samples`` stream tuples, all with
an image), forward hooks collect — before the stream and every k edits:

* per edited module, the **log-variance** of each input (key) dimension ``j`` over tokens,
  ``log Var_x[k_j(x)]``, separately at text positions and at image positions (a projector module
  sees image features only); its density over ``j`` is what the figure draws (paper figs. 2 / 9);
* the same for the visual projector's output (the image embeddings the language model reads) and,
  per language layer, for its hidden state (output) at text and at image positions — the paper's
  "diagonal variances of textual hidden states across layers vs the projected visual representation";
* the layer-wise **output energy** ``mean_x ‖y(x)‖²`` of each language layer's attention and MLP
  block, at text and at image positions, and of the projector.

A module's keys are split by the query's ``image_mask``; the attention / MLP / projector modules are
found from path templates (``{i}`` = layer index) that default to what the backbone already says:
its FFN-output template (the MLP output), the decoder layer above it (``.self_attn``), and its last
projector edit point — so LLaVA and BLIP-2-OPT need no setting. Statistics are streamed as
per-dimension sum / sum of squares / count, so memory is O(d) per module whatever the probe set.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from typing_extensions import override

from callbacks.base import (
    AnalysisCallback,
    integer_ticks,
    layer_template,
    observing,
    output_tensor,
    token_rows,
)
from more_lightning.contract import EditEngine

log = logging.getLogger(__name__)


# --- the math: small pure functions ----------------------------------------------------------------
class Moments:
    """Streamed per-dimension count, sum and sum of squares of rows (n, d)."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: Tensor | None = None
        self.sumsq: Tensor | None = None
        self.energy = 0.0  # Σ_x ‖x‖²

    def update(self, rows: Tensor) -> None:
        rows = rows.detach().double()  # (n, d)
        if rows.shape[0] == 0:
            return
        s, q = rows.sum(0), rows.pow(2).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = q if self.sumsq is None else self.sumsq + q
        self.count += rows.shape[0]
        self.energy += float(q.sum())

    def log_variance(self, eps: float = 1e-12) -> Tensor:
        """(d,) ``log Var`` per dimension (population variance); empty if no rows were seen."""
        if not self.count:
            return torch.empty(0)
        return log_variance(self.sum, self.sumsq, self.count, eps)

    def mean_energy(self) -> float:
        """``mean_x ‖x‖²`` (NaN if no rows)."""
        return self.energy / self.count if self.count else float("nan")


def log_variance(total: Tensor, total_sq: Tensor, count: int, eps: float = 1e-12) -> Tensor:
    """``log(E[x²] - E[x]²)`` per dimension from streamed sums, clamped at ``eps``: (d,) float32."""
    var = total_sq / count - (total / count).pow(2)
    return var.clamp_min(eps).log().float()


class CrossModalStatistics(AnalysisCallback):
    """Key log-variance by modality per edited module, projector output, layer-wise output energy.

    Args:
        every_k_edits: measure after every k-th edit (and after the last).
        num_samples: stream tuples whose ``edit`` and ``m_loc`` queries form the probe set.
        attention_module: path template of a language layer's attention block (``{i}`` = layer); default:
            ``<decoder layer>.self_attn`` with the decoder-layer path read off the backbone's ``text_module``
            (right for LLaVA and BLIP-2-OPT); "" to skip.
        mlp_module: path template of a language layer's MLP output; default: the backbone's ``text_module``
            (the FFN output projection, whose output is the MLP block's output); "" to skip.
        projector_module: path of the module whose output is the image embeddings the language model reads;
            default: the backbone's last projector edit point; "" to skip.
        layer_module: path template of a decoder layer (its output = hidden state); default: read off the
            backbone's ``text_module``; "" to skip.
        plot_modules: at most this many edited modules get a density panel.
    """

    def __init__(
        self,
        every_k_edits: int = 10,
        num_samples: int = 8,
        attention_module: str | None = None,
        mlp_module: str | None = None,
        projector_module: str | None = None,
        layer_module: str | None = None,
        plot_modules: int = 4,
    ) -> None:
        super().__init__(every_k_edits, "cross_modal")
        if num_samples < 1:
            raise ValueError(f"CrossModalStatistics: num_samples must be >= 1, got {num_samples}")
        self.num_samples, self.plot_modules = num_samples, plot_modules
        self.attention_module, self.mlp_module, self.projector_module = attention_module, mlp_module, projector_module
        self.layer_module = layer_module
        self.probes: list = []
        self.first: dict[str, Moments] = {}
        self.last: dict[str, Moments] = {}
        self.history: list[tuple[int, dict[str, float]]] = []
        self.modalities: dict[str, str] = {}
        self.num_layers = 0

    # --- probing ---------------------------------------------------------------------------------
    def _encode_probes(self, trainer: Trainer, pl_module: EditEngine) -> None:
        dataset = trainer.train_dataloader.dataset
        n = min(self.num_samples, len(dataset))
        picks = sorted({round(i * (len(dataset) - 1) / max(n - 1, 1)) for i in range(n)})
        self.probes = []
        for i in picks:
            queries = dataset[i].queries()
            for kind in ("edit", "m_loc"):
                self.probes.append(pl_module.encode_query(queries[kind]))

    def _watched(self, pl_module: EditEngine) -> dict[str, tuple[nn.Module, str, str]]:
        """name -> (module, what to record: "keys" | "output", modality of its rows: text/image/sequence)."""
        model = pl_module.model

        def find(path: str, setting: str) -> nn.Module:
            try:
                return model.get_submodule(path)
            except AttributeError as err:
                raise ValueError(f"CrossModalStatistics: no module {path!r} in the model; fix `{setting}`") from err

        watched = {p.path: (find(p.path, "edit points"), "keys", p.modality) for p in pl_module.edit_points}
        backbone = pl_module.backbone
        self.num_layers = backbone.num_layers(model)
        attention = self.attention_module
        if attention is None:
            attention = layer_template(backbone) + ".self_attn"
        mlp = backbone.text_module if self.mlp_module is None else self.mlp_module
        layer = layer_template(backbone) if self.layer_module is None else self.layer_module
        kinds = (("attn", attention, "attention_module"), ("mlp", mlp, "mlp_module"), ("hidden", layer, "layer_module"))
        for i in range(self.num_layers):
            for kind, template, setting in kinds:
                if template:
                    watched[f"{kind}.{i}"] = (find(template.format(i=i), setting), "output", "sequence")
        projector = self.projector_module
        if projector is None:
            image_points = [p.path for p in pl_module.edit_points if p.modality == "image"]
            projector = image_points[-1] if image_points else ""
        if projector:
            watched["projector"] = (find(projector, "projector_module"), "output", "image")
        return watched

    @contextmanager
    def _hooks(self, watched: dict, moments: dict[str, Moments], current: dict):
        def hook_for(name: str, what: str, modality: str):
            def hook(module: nn.Module, args: tuple, output) -> None:
                x = args[0] if what == "keys" else output_tensor(output)  # (..., d)
                if modality == "image":
                    moments.setdefault(f"{name}|image", Moments()).update(x.reshape(-1, x.shape[-1]))
                    return
                image = current["image_mask"]  # (B, T)
                text = current["attention_mask"].bool() & ~image
                for side, mask in (("text", text), ("image", image)):
                    rows = token_rows(x, mask)  # None: not this query's token sequence
                    if rows is not None:
                        moments.setdefault(f"{name}|{side}", Moments()).update(rows)

            return hook

        handles = [m.register_forward_hook(hook_for(n, w, mod)) for n, (m, w, mod) in watched.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def collect(self, pl_module: EditEngine) -> dict[str, Moments]:
        """Moments of every watched module over the probe set: ``"<name>|<text|image>"`` -> Moments."""
        moments: dict[str, Moments] = {}
        current: dict[str, Tensor] = {}
        watched = self._watched(pl_module)
        self.modalities = {name: modality for name, (_, _, modality) in watched.items()}
        with observing(pl_module.model), self._hooks(watched, moments, current):
            for query in self.probes:
                current["image_mask"], current["attention_mask"] = query.image_mask, query.attention_mask
                pl_module.logits(query)
        return moments

    def scalars(self, moments: dict[str, Moments], pl_module: EditEngine) -> dict[str, float]:
        out: dict[str, float] = {}
        for point in pl_module.edit_points:
            for side in ("text", "image"):
                m = moments.get(f"{point.path}|{side}")
                if m is not None and m.count:
                    out[f"cross_modal/{point.path}/log_var_{side}"] = float(m.log_variance().mean())
        projector = moments.get("projector|image")
        if projector is not None and projector.count:
            out["cross_modal/projector_out/log_var"] = float(projector.log_variance().mean())
            out["cross_modal/energy/projector"] = projector.mean_energy()
        for i in range(self.num_layers):
            for side in ("text", "image"):
                for kind in ("attn", "mlp"):
                    m = moments.get(f"{kind}.{i}|{side}")
                    if m is not None and m.count:
                        out[f"cross_modal/energy/layer_{i}/{kind}_{side}"] = m.mean_energy()
                m = moments.get(f"hidden.{i}|{side}")
                if m is not None and m.count:
                    out[f"cross_modal/hidden/layer_{i}/log_var_{side}"] = float(m.log_variance().mean())
        return out

    # --- hooks -----------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._encode_probes(trainer, pl_module)
        self.first = self.last = self.collect(pl_module)
        scalars = self.scalars(self.first, pl_module)
        self.history = [(0, scalars)]
        self.log_scalars(pl_module, scalars, 0)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        index = self.mark(batch, batch_idx)
        if not self.due(trainer, index):
            return
        self.last = self.collect(pl_module)
        scalars = self.scalars(self.last, pl_module)
        self.history.append((index, scalars))
        self.log_scalars(pl_module, scalars, index)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.history or not self.last_edit:
            return
        summary = {"before": self.history[0][1], "final": self.history[-1][1], "edit": self.history[-1][0]}
        self.publish(trainer, self.draw(pl_module), summary)

    def draw(self, pl_module: EditEngine):
        """Top: log-variance densities (text vs image keys; before dashed, final solid). Bottom: energies."""
        from matplotlib.figure import Figure

        points = [p.path for p in pl_module.edit_points][: self.plot_modules]
        panels = [*points, "projector"] if "projector|image" in self.first else points
        ncols = max(len(panels), 2)
        figure = Figure(figsize=(3.4 * ncols, 6.0), dpi=80, layout="constrained")
        grid = figure.add_gridspec(2, ncols)
        axes = [figure.add_subplot(grid[0, i]) for i in range(ncols)]
        colors = {"text": "tab:blue", "image": "tab:orange"}
        for ax, name in zip(axes, panels, strict=False):
            for side in ("text", "image"):
                for moments, style, when in ((self.first, "--", "before"), (self.last, "-", "final")):
                    m = moments.get(f"{name}|{side}")
                    if m is None or not m.count:
                        continue
                    values = m.log_variance().numpy()
                    ax.hist(
                        values,
                        bins=30,
                        density=True,
                        histtype="step",
                        ls=style,
                        color=colors[side],
                        label=f"{side}, {when}",
                    )
            title = "projector output" if name == "projector" else name.split(".", 1)[-1]
            ax.set(title=title, xlabel="log variance per dimension", ylabel="density")
            ax.title.set_fontsize(8)
        axes[0].legend(fontsize=7)
        half = ncols // 2
        ax = figure.add_subplot(grid[1, :half])
        layers = list(range(self.num_layers))
        for kind, marker in (("attn", "o"), ("mlp", "s")):
            for side in ("text", "image"):
                for moments, style in ((self.first, "--"), (self.last, "-")):
                    values = [
                        moments[k].mean_energy() if (k := f"{kind}.{i}|{side}") in moments else float("nan")
                        for i in layers
                    ]
                    ax.plot(
                        layers,
                        values,
                        style,
                        marker=marker,
                        color=colors[side],
                        label=f"{kind} {side}" if style == "-" else None,
                    )
        if "projector|image" in self.first:
            ax.axhline(self.last["projector|image"].mean_energy(), color="tab:green", label="projector")
        ax.set(title="output energy ‖y‖² by layer (dashed: before)", xlabel="language layer", yscale="log")
        ax.legend(fontsize=7, ncols=3)
        ax = figure.add_subplot(grid[1, half:])
        for side in ("text", "image"):
            for moments, style in ((self.first, "--"), (self.last, "-")):
                values = [
                    float(moments[k].log_variance().mean()) if (k := f"hidden.{i}|{side}") in moments else float("nan")
                    for i in layers
                ]
                ax.plot(layers, values, style, marker=".", color=colors[side], label=side if style == "-" else None)
        if "projector|image" in self.first:
            for moments, style in ((self.first, "--"), (self.last, "-")):
                value = float(moments["projector|image"].log_variance().mean())
                ax.axhline(value, ls=style, color="tab:green", label="projector output" if style == "-" else None)
        ax.set(title="mean log variance of hidden states (dashed: before)", xlabel="language layer")
        ax.legend(fontsize=7)
        integer_ticks(*figure.axes[-2:])
        return figure
