"""Training SERAC's scope classifier and counterfactual adapters on the **train** split: its own ``fit`` (DESIGN §2).

    python cli.py fit --config configs/tiny_llava_serac_train.yaml

One training step = one train record (edit ``e``, text rephrase, image rephrase, text and multimodal locality):

1. the unedited model runs the five queries once; the feature module's input gives their classifier features
   (:func:`~more_lightning.editors.serac.query_features`) and the locality queries' answer distributions. With
   ``encoder`` set, the features are instead the frozen sentence encoder's of the five prompt texts
   (:class:`~more_lightning.editors.serac.SentenceEncoder`), and only the locality queries run the model;
2. **classifier**: the features of this record and of the last ``bank_size`` records are embedded; every record's
   edit is paired with every query: its own edit and two rephrases are in scope, its locality queries and every
   query of another record are not. The loss is the binary cross-entropy, positives and negatives weighted alike
   (their two means added);
3. **counterfactual**: each query is asked again with the edit prepended (``context_template``) and the adapters on:
   the NLL of the new answer on the edit and its rephrases, plus ``loc_weight`` · KL(p_cf ‖ p_base) on the locality
   queries (so a query routed by mistake still answers as the base model would);
4. ``loss = cf_nll + loc_weight · cf_kl + cls_weight · cls_bce`` trains both; the backbone stays frozen.

The networks are written (safetensors, atomically) to ``out_file`` every ``save_every`` steps and at the end.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from more_lightning.backbones.base import Backbone, ModelInputs
from more_lightning.contract import shift_for_loss
from more_lightning.data.records import EditTuple, Query
from more_lightning.editors.mend_train import MENDTrainDataModule, NetworksTrainModule
from more_lightning.editors.serac import TRAIN_ENCODER_KEY, CounterfactualHooks, SERACNetworks, check_encoder_folder
from more_lightning.metrics.accuracy import token_accuracy

log = logging.getLogger(__name__)

IN_SCOPE = ("edit", "t_gen", "m_gen")
KINDS = ("edit", "t_gen", "m_gen", "t_loc", "m_loc")


def answer_logp(logits: Tensor, labels: Tensor) -> Tensor:
    """(n, V) float32 log-probabilities at the n positions that predict an answer token."""
    logits, labels = shift_for_loss(logits, labels)  # (1, T-1, V), (1, T-1)
    return F.log_softmax(logits.float(), dim=-1)[labels != -100]


def scope_loss(logits: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    """Balanced BCE of in-scope ``logits`` against the ``positive`` mask (same shape): mean over positives plus mean
    over negatives; and the accuracy at probability 0.5."""
    target = positive.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    loss = bce[positive].mean() + bce[~positive].mean()
    accuracy = ((logits > 0) == positive).float().mean()
    return loss, accuracy


def pairs(records: int) -> Tensor:
    """(R, R·5) bool: edit of record r × query k of record s is in scope iff r = s and k is the edit or a rephrase."""
    same = torch.eye(records, dtype=torch.bool)[:, :, None]  # (R, R, 1)
    kind = torch.tensor([k in IN_SCOPE for k in KINDS])[None, None]  # (1, 1, 5)
    return (same & kind).reshape(records, records * len(KINDS))


class SERACTrainModule(NetworksTrainModule):
    """Trains :class:`~more_lightning.editors.serac.SERACNetworks` for a backbone.

    Args:
        backbone: the model (frozen); its text edit points give the classifier's feature module.
        out_file: where the networks go (safetensors); the stream configs' ``editor.init_args.networks``.
        adapter_modules: module-path templates (``{i}`` = language layer) of the linear layers the counterfactual
            adapts.
        adapter_layers: adapt the last this many language layers (``None``: all).
        rank: the adapters' rank.
        alpha: the adapters' scaling numerator (scaling ``alpha / rank``).
        dim: width of the classifier's embedding.
        feature_layer: which text edit point's FFN output projection gives the features (its input); ``-1`` = last.
            Recorded but unused with ``encoder``.
        context_template: how the edit is prepended to an in-scope query (``{prompt}``, ``{target}``).
        lr: Adam learning rate of the adapters.
        cls_lr: Adam learning rate of the classifier.
        loc_weight: weight of the counterfactual's locality KL.
        cls_weight: weight of the classifier's loss.
        bank_size: earlier records whose queries serve as the classifier's negatives.
        save_every: also write ``out_file`` every this many steps (0: only at the end).
        seed: seeds the networks.
        num_threads: torch CPU threads (``None``: leave torch's setting).
        encoder: folder of a pretrained BERT-class sentence encoder (transformers format, e.g.
            ``data/bert-base-uncased``) whose mean-pooled features of the query's prompt text the classifier embeds,
            the encoder frozen and not saved in ``out_file`` (only its folder is); ``None``: the backbone's features.

    Raises:
        FileNotFoundError: the ``encoder`` folder does not exist (the message says how to get it).
        ValueError: a setting cannot be used, or the ``encoder`` folder holds no encoder.
    """

    networks_name = "SERAC"

    def __init__(
        self,
        backbone: Backbone,
        out_file: str,
        adapter_modules: list[str],
        adapter_layers: int | None = None,
        rank: int = 8,
        alpha: float = 16.0,
        dim: int = 64,
        feature_layer: int = -1,
        context_template: str = "{prompt} {target}\n",
        lr: float = 1e-3,
        cls_lr: float = 1e-3,
        loc_weight: float = 1.0,
        cls_weight: float = 1.0,
        bank_size: int = 64,
        save_every: int = 0,
        seed: int = 0,
        num_threads: int | None = None,
        encoder: str | None = None,
    ) -> None:
        super().__init__()
        for key, value in {"lr": lr, "cls_lr": cls_lr}.items():
            if not value > 0:
                raise ValueError(f"SERACTrainModule: {key} must be > 0, got {value} (model.init_args.{key})")
        if not adapter_modules:
            raise ValueError("SERACTrainModule: name at least one module template in model.init_args.adapter_modules")
        if bank_size < 1 or save_every < 0:
            raise ValueError(f"SERACTrainModule: need bank_size >= 1, save_every >= 0, got {bank_size}, {save_every}")
        if encoder is not None:
            check_encoder_folder(encoder, TRAIN_ENCODER_KEY)  # before the backbone loads
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.backbone, self.out_file, self.save_every = backbone, out_file, save_every
        self.lr, self.cls_lr, self.loc_weight, self.cls_weight = lr, cls_lr, loc_weight, cls_weight
        self.model, self.processor = backbone.load()
        self.image_token_id = backbone.image_token_id(self.processor, self.model)
        self.model.requires_grad_(False)
        text_points = [p for p in backbone.edit_points(self.model) if p.modality == "text"]
        if not text_points:
            raise ValueError("SERAC needs at least one text edit point (backbone num_text_layers >= 1)")
        feature_path = text_points[feature_layer].path
        n = backbone.num_layers(self.model)
        layers = range(n - (n if adapter_layers is None else adapter_layers), n)
        shapes = {}
        for template in adapter_modules:
            for i in layers:
                path = template.format(i=i)
                try:
                    weight = self.model.get_submodule(path).weight
                except AttributeError as err:
                    hint = "check model.init_args.adapter_modules"
                    raise ValueError(f"adapter module {path!r} does not exist: {hint}") from err
                shapes[path] = tuple(weight.shape)
        width = self.model.get_submodule(feature_path).in_features
        self.networks = SERACNetworks(
            feature_path, width, shapes, dim, rank, alpha, context_template, seed, encoder=encoder
        )  # the encoder moves with the networks
        self.hooks = CounterfactualHooks(self.model, self.networks)
        self.bank: deque[Tensor] = deque(maxlen=bank_size)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            [
                {"params": list(self.networks.adapters.parameters()), "lr": self.lr},
                {"params": list(self.networks.classifier.parameters()), "lr": self.cls_lr},
            ]
        )

    def encode(self, query: Query) -> ModelInputs:
        return self.backbone.encode(self.processor, query, self.image_token_id).to(self.device, self.model.dtype)

    @torch.no_grad()
    def base_pass(self, queries: dict[str, Query]) -> tuple[Tensor, dict[str, Tensor]]:
        """Features (5, 3 d) of the queries (with a sentence encoder: (5, hidden), of their prompt texts) and the base
        model's answer log-probabilities of the locality ones."""
        encoder = self.networks.encoder
        features, refs = [], {}
        for name in KINDS:
            if encoder is not None and name in IN_SCOPE:
                continue  # its features come from the encoder, and no reference is needed
            inputs = self.encode(queries[name])
            with self.hooks.forward(inputs, capture=encoder is None):
                logits = self.backbone.logits(self.model, inputs)
            if encoder is None:
                features.append(self.hooks.features[0])
            if name not in IN_SCOPE:
                refs[name] = answer_logp(logits, inputs.labels)
        if encoder is not None:
            return encoder.features([queries[name].prompt for name in KINDS]).to(self.device), refs  # (5, hidden)
        return torch.stack(features), refs

    def counterfactual_loss(self, batch: EditTuple, queries: dict[str, Query], refs: dict[str, Tensor]) -> dict:
        context = self.networks.context(batch.edit.prompt, batch.edit.target)
        nll, kl, rel = [], [], torch.zeros(())
        for name in KINDS:
            inputs = self.encode(replace(queries[name], prompt=context + queries[name].prompt))
            routed = torch.ones(inputs.input_ids.shape[0], dtype=torch.bool, device=self.device)
            with self.hooks.forward(inputs, routed):
                logits = self.backbone.logits(self.model, inputs)
            if name in IN_SCOPE:
                shifted, labels = shift_for_loss(logits, inputs.labels)
                nll.append(F.cross_entropy(shifted.float().flatten(0, 1), labels.flatten(), ignore_index=-100))
                if name == "edit":
                    rel = token_accuracy(shifted.detach(), labels)[0]
            else:
                logp = answer_logp(logits, inputs.labels)  # (n, V)
                kl.append((logp.exp() * (logp - refs[name])).sum(-1).mean())
        return {"nll": torch.stack(nll).mean(), "kl": torch.stack(kl).mean(), "rel": rel}

    def classifier_loss(self, features: Tensor) -> tuple[Tensor, Tensor]:
        self.bank.append(features.detach())
        stacked = torch.stack(list(self.bank))  # (R, 5, in_dim): the newest record last
        z = self.networks.classifier.embed(stacked.flatten(0, 1)).view(*stacked.shape[:2], -1)  # (R, 5, dim)
        logits = self.networks.classifier.logits(z[:, 0], z.flatten(0, 1))  # (R, R·5)
        return scope_loss(logits, pairs(len(stacked)).to(logits.device))

    @override
    def training_step(self, batch: EditTuple, batch_idx: int) -> Tensor:
        queries = {**batch.queries(), **{k: getattr(batch, k) for k in KINDS}}  # every kind, even a skipped locality
        features, refs = self.base_pass(queries)
        cf = self.counterfactual_loss(batch, queries, refs)
        cls, accuracy = self.classifier_loss(features)
        loss = cf["nll"] + self.loc_weight * cf["kl"] + self.cls_weight * cls
        self.log_dict(
            {
                "serac/loss": loss.detach(),
                "serac/cf_nll": cf["nll"].detach(),
                "serac/cf_kl": cf["kl"].detach(),
                "serac/cf_rel": 100 * cf["rel"],
                "serac/cls_bce": cls.detach(),
                "serac/cls_acc": 100 * accuracy,
            },
            prog_bar=True,
            on_step=True,
            batch_size=1,
        )
        return loss


class SERACTrainDataModule(MENDTrainDataModule):
    """Train records of one or more MMEdit files, shuffled, one edit tuple per step (as MEND's meta-training reads
    them).

    Args:
        train_files: the **train** files (E-VQA's ``vqa_train.json``, E-IC's ``caption_train_edit.json``).
        image_root: root of their ``image`` (and ``m_loc``) paths.
        rephrase_root: root of their ``image_rephrase`` paths.
        m_loc_root: root of ``m_loc`` paths; default ``image_root``.
        records_per_file: read only the first this many records of each file (``None``: all).
        seed: seeds the order.
    """
