"""Meta-training MEND's editor networks on the **train** split: its own ``fit`` (DESIGN §2).

    python cli.py fit --config configs/tiny_llava_mend_train.yaml

One training step = one train record, as one edit of a stream (per-edit batch size 1):

1. the five queries of the record (edit, text and image rephrase, text and multimodal locality) are encoded and
   the unedited model's locality distributions taken;
2. the engine's composite loss at the unedited weights is differentiated; :class:`GradientFactors` keeps the
   rank-one factors ``(u_i, δ_i)`` of every edited layer (detached: no second-order terms, as in MEND);
3. the networks turn them into the write ``ΔW_l = −α_l Σ_i δ̃_i ũ_iᵀ``, which a forward hook adds to each edited
   layer (``y = W x + ΔW x``) while the five queries run again;
4. the meta-loss ``edit_weight · (L_rel + gen_weight · L_gen) + loc_weight · L_loc`` of the edited model (MEND's
   ``c_edit · L_e + c_loc · L_loc``) trains the networks and the step sizes ``α_l``; the backbone stays frozen.

The networks are written (safetensors, atomically) to ``out_file`` every ``save_every`` steps and at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from more_lightning.backbones.base import Backbone, ModelInputs
from more_lightning.contract import shift_for_loss
from more_lightning.data.datamodule import EditStream
from more_lightning.data.records import EditTuple
from more_lightning.data.schema import read_mmedit
from more_lightning.editors.mend import GradientFactors, MENDNetworks, text_linears
from more_lightning.metrics.accuracy import token_accuracy
from more_lightning.module import LOC_KEYS, composite_loss, reference

log = logging.getLogger(__name__)


@contextmanager
def added_deltas(modules: dict[str, nn.Linear], deltas: dict[str, Tensor]) -> Iterator[None]:
    """Inside, each module ``path`` computes ``W x + b + ΔW x`` with ``deltas[path]`` (d_out × d_in), differentiably."""

    def hook_for(delta: Tensor):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            return output + F.linear(args[0], delta.to(args[0].dtype))

        return hook

    handles = [modules[path].register_forward_hook(hook_for(delta)) for path, delta in deltas.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class NetworksTrainModule(LightningModule):
    """What the training runs of an editor's networks share (MEND's, SERAC's): the networks file written every
    ``save_every`` steps and at the end, atomically, with the backbone and step count in its metadata.

    Subclasses set ``networks`` (with a ``save(path, metadata)``), ``backbone``, ``out_file``, ``save_every`` and
    ``networks_name`` (for the log line).
    """

    networks_name = "editor"

    @override
    def on_train_batch_end(self, outputs, batch: EditTuple, batch_idx: int) -> None:
        if self.save_every and (self.global_step % self.save_every == 0):
            self.save_networks()

    @override
    def on_train_end(self) -> None:
        self.save_networks()

    def save_networks(self) -> Path:
        path = Path(self.out_file)
        metadata = {"backbone": f"{type(self.backbone).__name__}:{self.backbone.path}", "steps": str(self.global_step)}
        self.networks.save(path, metadata)
        log.info("%s networks after %d steps written to %s", self.networks_name, self.global_step, path)
        return path


class MENDTrainModule(NetworksTrainModule):
    """Meta-trains :class:`~more_lightning.editors.mend.MENDNetworks` for a backbone's text edit points.

    Args:
        backbone: the model to edit (frozen); its text edit points are the layers MEND writes.
        out_file: where the networks go (safetensors); the stream configs' ``editor.init_args.networks``.
        rank: rank of the networks' residual layers (MEND: 1920).
        n_hidden: hidden layers per network (MEND: 1).
        share: one network per layer shape, a scale and shift per layer (MEND); ``False``: one per layer.
        edit_lr: initial step size ``α_l`` of every layer (MEND / EasyEdit: 1e-4).
        lr: Adam learning rate of the networks (EasyEdit: 1e-6).
        lr_lr: Adam learning rate of the step sizes (EasyEdit: 1e-4).
        edit_weight: ``c_edit``, weight of the post-edit NLL terms (EasyEdit: 0.1).
        loc_weight: ``c_loc``, weight of the post-edit locality KL terms (EasyEdit: 1.0).
        gen_weight: weight of the generality NLL terms, in the edit's gradient and in the meta-loss (the stream's
            ``model.init_args.gen_weight``).
        stream_loc_weight: weight of the locality KL in the edit's gradient (the stream's ``loc_weight``; zero
            gradient at the unedited model, so only the rows it adds matter).
        save_every: also write ``out_file`` every this many steps (0: only at the end).
        seed: seeds the networks.
        num_threads: torch CPU threads (``None``: leave torch's setting).
    """

    networks_name = "MEND"

    def __init__(
        self,
        backbone: Backbone,
        out_file: str,
        rank: int = 1920,
        n_hidden: int = 1,
        share: bool = True,
        edit_lr: float = 1e-4,
        lr: float = 1e-6,
        lr_lr: float = 1e-4,
        edit_weight: float = 0.1,
        loc_weight: float = 1.0,
        gen_weight: float = 1.0,
        stream_loc_weight: float = 1.0,
        save_every: int = 0,
        seed: int = 0,
        num_threads: int | None = None,
    ) -> None:
        super().__init__()
        for key, value in {"edit_lr": edit_lr, "lr": lr, "lr_lr": lr_lr}.items():
            if not value > 0:
                raise ValueError(f"MENDTrainModule: {key} must be > 0, got {value} (model.init_args.{key})")
        if save_every < 0:
            raise ValueError(f"MENDTrainModule: save_every must be >= 0, got {save_every}")
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.backbone, self.out_file, self.save_every = backbone, out_file, save_every
        self.lr, self.lr_lr = lr, lr_lr
        self.edit_weight, self.loc_weight, self.gen_weight = edit_weight, loc_weight, gen_weight
        self.stream_loc_weight = stream_loc_weight
        self.model, self.processor = backbone.load()
        self.image_token_id = backbone.image_token_id(self.processor, self.model)
        self.model.requires_grad_(False)
        self.linears = text_linears(self.model, backbone.edit_points(self.model), "MEND")
        for module in self.linears.values():
            module.weight.requires_grad_(True)  # the backward pass must reach the outputs; never in the optimizer
        shapes = {path: tuple(m.weight.shape) for path, m in self.linears.items()}
        self.networks = MENDNetworks(shapes, rank, n_hidden, share, edit_lr, seed)
        self.factors = GradientFactors(self.linears)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        nets = [p for name, p in self.networks.named_parameters() if name != "edit_lrs"]
        return torch.optim.Adam(
            [{"params": nets, "lr": self.lr}, {"params": [self.networks.edit_lrs], "lr": self.lr_lr}]
        )

    def encode(self, batch: EditTuple) -> dict[str, ModelInputs]:
        return {
            name: self.backbone.encode(self.processor, q, self.image_token_id).to(self.device, self.model.dtype)
            for name, q in batch.queries().items()
        }

    def logits(self, inputs: dict[str, ModelInputs]) -> dict[str, Tensor]:
        return {name: self.backbone.logits(self.model, query) for name, query in inputs.items()}

    def factors_of(self, inputs: dict[str, ModelInputs], refs: dict) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor]:
        """The rank-one factors of the engine's composite-loss gradient at the unedited weights, and that loss."""
        self.factors.clear()
        with self.factors.record():
            logits = self.logits(inputs)
            loss = composite_loss(logits, inputs, refs, self.gen_weight, self.stream_loc_weight)
        weights = [m.weight for m in self.linears.values()]
        torch.autograd.grad(loss, weights)  # the factors' hooks fire; the weights' gradients are not kept
        factors = self.factors.factors()
        self.factors.clear()
        return factors, loss.detach()

    @override
    def training_step(self, batch: EditTuple, batch_idx: int) -> Tensor:
        inputs = self.encode(batch)
        with torch.no_grad():
            refs = {
                name: reference(self.backbone.logits(self.model, inputs[name]), inputs[name].labels)
                for name in LOC_KEYS
                if name in inputs
            }
        factors, loss_before = self.factors_of(inputs, refs)
        deltas = {path: self.networks.delta(path, u.float(), d.float()) for path, (u, d) in factors.items()}
        with added_deltas(self.linears, deltas):
            logits = self.logits(inputs)
        edit_terms = {k: v for k, v in logits.items() if k not in LOC_KEYS}
        loc_terms = {k: v for k, v in logits.items() if k in LOC_KEYS}
        loss_edit = composite_loss(edit_terms, inputs, refs, self.gen_weight)
        loss_loc = composite_loss(loc_terms, inputs, refs) if loc_terms else torch.zeros((), device=self.device)
        loss = self.edit_weight * loss_edit + self.loc_weight * loss_loc
        rel = token_accuracy(*shift_for_loss(logits["edit"].detach(), inputs["edit"].labels))[0]
        self.log_dict(
            {
                "meta/loss": loss.detach(),
                "meta/edit_loss_before": loss_before,
                "meta/edit_loss_after": loss_edit.detach(),
                "meta/loc_kl_after": loss_loc.detach(),
                "meta/rel_after": 100 * rel,
                "meta/edit_lr": self.networks.edit_lrs.detach().mean(),
            },
            prog_bar=True,
            on_step=True,
            batch_size=1,
        )
        return loss


def _as_is(item: EditTuple) -> EditTuple:
    return item


class MENDTrainDataModule(LightningDataModule):
    """Train records of one or more MMEdit files, shuffled, one edit tuple per step (several epochs if asked).

    Args:
        train_files: the **train** files (E-VQA's ``vqa_train.json``, E-IC's ``caption_train_edit.json``).
        image_root: root of their ``image`` (and ``m_loc``) paths.
        rephrase_root: root of their ``image_rephrase`` paths.
        m_loc_root: root of ``m_loc`` paths; default ``image_root``.
        records_per_file: read only the first this many records of each file (``None``: all).
        seed: seeds the order.
    """

    def __init__(
        self,
        train_files: list[str],
        image_root: str,
        rephrase_root: str,
        m_loc_root: str | None = None,
        records_per_file: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not train_files:
            raise ValueError("data.train_files: name at least one train file (e.g. data/embedded/vqa_train.json)")
        self.train_files, self.image_root, self.rephrase_root = list(train_files), image_root, rephrase_root
        self.m_loc_root, self.records_per_file, self.seed = m_loc_root, records_per_file, seed
        self.stream: EditStream | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.stream is not None:
            return
        records = []
        for path in self.train_files:
            if not Path(path).is_file():
                raise FileNotFoundError(f"train file {path!r} not found: fix data.init_args.train_files")
            records += read_mmedit(
                path, self.image_root, self.rephrase_root, m_loc_root=self.m_loc_root, limit=self.records_per_file
            )
        self.stream = EditStream(records)

    def transfer_batch_to_device(self, batch: EditTuple, device: torch.device, dataloader_idx: int) -> EditTuple:
        return batch  # raw text and PIL images: the module encodes them

    def train_dataloader(self) -> DataLoader:
        self.setup()
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.stream, batch_size=None, shuffle=True, generator=generator, collate_fn=_as_is)
