"""``OnlineEditModule``: one ``training_step`` = one edit request (DESIGN §2).

Per edit t the module
  1. encodes the edit tuple (edit, text rephrase, image rephrase, text / multimodal locality);
  2. takes the locality reference distributions from θ_{t-1}, once, before any write;
  3. runs ``steps_per_edit`` times: composite loss L_rel + L_gen + L_loc (paper eq. 19–22),
     ``manual_backward``, ``optimizer.step()`` — the editor's write (keys are captured on the
     first inner step and handed to the editor);
  4. evaluates the edit immediately and logs every score against the edit index.
Steps 1–4, without the held-out probes and the logging, are :meth:`OnlineEditModule.apply_edit`, which the
live edit service (:mod:`more_lightning.serve`) runs outside any Trainer for each edit it receives.
After the stream a retention pass re-evaluates every edit on the final model; a summary table is
logged and ``metrics.json`` written into the logger's run folder. Every per-edit curve is logged
against the edit number t = 1..T: ``immediate/<score>`` right after edit t, ``retention/<score>``
edit t's score on the final model (the forgetting curve; also ``retention.jsonl`` in the run folder,
one line per edit), ``edit/*`` and ``diag/*`` for the write, ``rel`` / ``loc`` the stream means so far.

``predict`` answers the questions of the datamodule's ``predict_file`` by greedy decoding
(:mod:`more_lightning.generate`) on the model with ``load_edit_state`` applied, and writes them as JSONL.

With ``single_edits`` the stream is the single-editing protocol (T = 1 in the paper's tables):
after each edit is evaluated, the trainable parameters and the optimizer's state are restored to
what they were before the first edit, so every edit is applied to the unedited model and the
immediate scores average many independent single edits.

Seen vs held-out (DESIGN §3): the composite loss trains on the tuple's rephrase, image rephrase and
locality samples, so T-Gen / M-Gen / T-Loc / M-Loc on those same samples (``seen``, MMEdit's
convention) measure one memorised variant. When the stream carries held-out variants (a
``<stem>.heldout.json`` companion), they are encoded and their locality references taken from
θ_{t-1} before the write, never enter any loss, and are scored beside the seen ones with the same
metric classes, immediately and in the retention pass. Held-out Avg = mean of Rel and the four
held-out scores. ``metrics.json`` keeps its seen keys and adds

    "headline": "held_out" | "seen",   # held_out where a companion exists
    "held_out": {"immediate": {t_gen, m_gen, t_loc, m_loc, avg}, "retention": {...},
                 "locality_agreement": {t_loc, m_loc}, "exact_match": {"immediate": {t_gen, m_gen}, ...}}

(``held_out`` only with a companion); TensorBoard gets ``held_out/immediate/<score>`` per edit and
``held_out/final_immediate/<score>``, ``held_out/final_retention/<score>`` at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from more_lightning.backbones.base import Backbone, ModelInputs
from more_lightning.contract import shift_for_loss
from more_lightning.data.records import EditTuple, PredictItem, Query
from more_lightning.editors.base import Editor
from more_lightning.editors.state import apply_edit_state, edit_state_dict, load_edit_state, save_edit_state
from more_lightning.generate import greedy_answer
from more_lightning.journal import JOURNAL_NAME, Journal, now, state_sha256
from more_lightning.keys import KeyCapture
from more_lightning.metrics import (
    EDIT_SCORE_KEYS,
    LocalityAgreement,
    ModalGenerality,
    ModalLocality,
    Reliability,
    TextGenerality,
    TextLocality,
    average_score,
)
from more_lightning.metrics.accuracy import exact_match, token_accuracy
from more_lightning.metrics.locality import argmax_agreement, locality_score

log = logging.getLogger(__name__)

EDIT_KEYS = ("edit", "t_gen", "m_gen")  # supervised with the edit target
LOC_KEYS = ("t_loc", "m_loc")  # compared with the pre-edit model
SCORE_OF = {"edit": "rel", "t_gen": "t_gen", "m_gen": "m_gen", "t_loc": "t_loc", "m_loc": "m_loc"}
HELD_OUT_KEYS = ("t_gen", "m_gen", "t_loc", "m_loc")  # scored on held-out variants, never trained on
#: per-edit scores on the final model, one JSON line per edit, written by the retention pass
RETENTION_NAME = "retention.jsonl"


@dataclass
class Reference:
    """Pre-edit (θ_{t-1}) log-probabilities at a locality query's answer positions only.

    Kept for every edit until the retention pass, so its size must not grow with the sequence: n
    answer positions × V floats (LLaVA-1.5, a 2-token answer: 2 × 32,064 × 4 B ≈ 0.26 MB per query),
    not the (T-1) × V of the whole sequence (≈ 620 × 32,064 × 4 B ≈ 80 MB).
    """

    logp: Tensor  # (n, V) float32: the rows of the answer positions, in sequence order
    mask: Tensor  # (1, T-1) bool: where those rows sit in the query


@dataclass
class AppliedEdit:
    """One edit written and scored right after (:meth:`OnlineEditModule.apply_edit`)."""

    refs: dict[str, Reference]  # θ_{t-1} on the locality queries, taken before the write
    loss: Tensor  # the composite loss of the last inner step (detached)
    scores: dict[str, float]  # immediate scores in percent (rel, rel_em, t_loc, ...), as the stream logs them
    fit: dict[str, float]  # the edit's NLL and margin before and after the write
    seconds: float  # wall time of the whole edit: encoding, references, write
    editor_seconds: float  # of which the editor's own statistics and write


def _nll(logits: Tensor, labels: Tensor) -> Tensor:
    logits, labels = shift_for_loss(logits, labels)  # (B, T-1, V), (B, T-1)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def edit_fit(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """How well a model state fits one query's answer: mean NLL and mean target margin over its answer tokens.

    margin = logit of the target token − the largest logit of any other token (> 0: the target is the argmax).
    """
    logits, labels = shift_for_loss(logits.detach(), labels)  # (1, T-1, V), (1, T-1)
    mask = labels != -100
    rows, targets = logits[mask].float(), labels[mask]  # (n, V), (n,)
    target_logit = rows.gather(-1, targets[:, None])[:, 0]
    others = rows.scatter(-1, targets[:, None], float("-inf"))
    nll = F.cross_entropy(rows, targets)
    return {"nll": float(nll), "margin": float((target_logit - others.max(-1).values).mean())}


def _kl(logits: Tensor, ref: Reference) -> Tensor:
    """Mean over answer positions of KL(p_θ ‖ p_{t-1})."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)[ref.mask]  # (n, V)
    return (logp.exp() * (logp - ref.logp)).sum(-1).mean()


def reference(logits: Tensor, labels: Tensor) -> Reference:
    """The :class:`Reference` of one locality query from the (pre-edit) model's ``logits`` (B, T, V)."""
    logits, labels = shift_for_loss(logits, labels)  # (1, T-1, V), (1, T-1)
    mask = labels != -100  # (1, T-1)
    return Reference(F.log_softmax(logits.float(), dim=-1)[mask], mask)  # (n, V)


def composite_loss(
    logits: dict[str, Tensor],
    inputs: dict[str, ModelInputs],
    refs: dict[str, Reference],
    gen_weight: float = 1.0,
    loc_weight: float = 1.0,
    edit_weight: float = 1.0,
) -> Tensor:
    """``edit_weight · (L_rel + gen_weight · L_gen) + loc_weight · L_loc`` (paper eq. 19–22) from each query's logits.

    ``L_rel`` / ``L_gen``: target NLL of the ``edit`` / ``t_gen`` and ``m_gen`` queries; ``L_loc``: KL to ``refs`` on
    the locality queries. Queries missing from ``logits`` contribute nothing.
    """
    weights = {"edit": edit_weight, "t_gen": edit_weight * gen_weight, "m_gen": edit_weight * gen_weight}
    loss = torch.zeros((), device=next(iter(logits.values())).device)
    for name, value in logits.items():
        if name in weights:
            loss = loss + weights[name] * _nll(value, inputs[name].labels)
        else:
            loss = loss + loc_weight * _kl(value, refs[name])
    return loss


def _to_cpu(refs: dict[str, Reference]) -> dict[str, Reference]:
    return {k: Reference(v.logp.cpu(), v.mask.cpu()) for k, v in refs.items()}


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def split_by_shared_question(per_edit: list[tuple[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean scores of the edits whose question text another edit of the stream shares, and of the others.

    ``per_edit``: (question text, scores) per edit. Returns ``{"shared": {...}, "unique": {...}}`` with
    ``num_edits`` and the mean of every score key (a group without edits is left out): edits that share
    their text can only be told apart by the image, so the split tells binding to the image apart from
    writing the answer.
    """
    keys = [" ".join(text.lower().split()) for text, _ in per_edit]  # case and spacing do not count
    counts = Counter(keys)
    groups: dict[str, list[dict[str, float]]] = {"shared": [], "unique": []}
    for key, (_, scores) in zip(keys, per_edit, strict=True):
        groups["shared" if counts[key] > 1 else "unique"].append(scores)
    out = {}
    for name, rows in groups.items():
        if rows:
            common = [k for k in rows[0] if all(k in r for r in rows)]
            out[name] = {"num_edits": len(rows), **{k: sum(r[k] for r in rows) / len(rows) for k in common}}
    return out


class StreamError(RuntimeError):
    """An edit stream cannot go on (or start) as asked; the message says why and what to do."""


#: Which record fields each query is built from, to name them when a query cannot be encoded.
QUERY_FIELDS = {
    "edit": "src, alt, image",
    "t_gen": "rephrase, alt, image",
    "m_gen": "src, alt, image_rephrase",
    "t_loc": "loc, loc_ans",
    "m_loc": "m_loc, m_loc_q, m_loc_a",
}


class _StreamGuard(Callback):
    """Hands any exception that stops the stream to :meth:`OnlineEditModule.stream_failed`."""

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        pl_module.stream_failed(exception)


def _metric_states(metrics: torch.nn.ModuleDict) -> dict[str, dict]:
    return {
        name: {"state": {k: v.detach().clone() for k, v in m.metric_state.items()}, "updates": m.update_count}
        for name, m in metrics.items()
    }


def _restore_metric_states(metrics: torch.nn.ModuleDict, saved: dict[str, dict]) -> None:
    for name, entry in saved.items():
        metric = metrics[name]
        for key, value in entry["state"].items():
            setattr(metric, key, value.clone())
        metric._update_count = int(entry["updates"])  # torchmetrics keeps the count outside its states
        metric._computed = None


def _references_payload(refs: dict[int, dict[str, Reference]]) -> dict[int, dict[str, dict[str, Tensor]]]:
    return {i: {k: {"logp": r.logp, "mask": r.mask} for k, r in per.items()} for i, per in refs.items()}


def _references_from(payload: dict) -> dict[int, dict[str, Reference]]:
    return {int(i): {k: Reference(r["logp"], r["mask"]) for k, r in per.items()} for i, per in payload.items()}


def _numpy_rng_state() -> list:
    """numpy's global RNG state as plain values (checkpoints load with ``weights_only``: no arrays)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _stream_sha256(hashes: list[str]) -> str:
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


class OnlineEditModule(LightningModule):
    """Runs an online edit stream with any editor on any backbone.

    What callbacks and editors may read of it is :class:`~more_lightning.contract.EditEngine`.

    Args:
        backbone: where the model lives, where to edit it and how to build its inputs.
        editor: the editor (M-ORE, LoRA-FT, FT-L, ...).
        task: name of the task for reports (``eic``, ``evqa``, ...).
        loc_weight: weight of the locality KL term in the composite loss.
        gen_weight: weight of the generality NLL terms.
        retention: re-evaluate every edit on the final model after the stream.
        save_every: every this many edits, and after the last one, write the edit state
            (``edit_state.safetensors``), a checkpoint to resume from (``checkpoints/last.ckpt``: only what
            the stream changed, never the frozen backbone) and the editor-state hash into the journal, all in
            the run folder; 0 = only after the last edit. Writes are atomic.
        load_edit_state: start from a saved edit state (editor weights and statistics). A stream holding a
            record that state already holds is refused (it would be written twice); to continue a killed
            stream use ``--ckpt_path last``.
        single_edits: restore the editor's parameters and statistics after every edit (the
            single-editing protocol, T = 1); no retention pass, since the final model is the
            unedited one.
        max_new_tokens: ``predict``: the longest answer generated, in tokens.
    """

    def __init__(
        self,
        backbone: Backbone,
        editor: Editor,
        task: str = "",
        loc_weight: float = 1.0,
        gen_weight: float = 1.0,
        retention: bool = True,
        save_every: int = 0,
        load_edit_state: str | None = None,
        single_edits: bool = False,
        max_new_tokens: int = 32,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.backbone = backbone
        self.editor = editor
        self.task = task
        self.loc_weight = loc_weight
        self.gen_weight = gen_weight
        self.single_edits = single_edits
        self.retention = retention and not single_edits
        if save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {save_every}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.save_every = save_every
        self.max_new_tokens = max_new_tokens
        self.load_edit_state = load_edit_state
        self.model, self.processor = backbone.load()
        self.edit_points = backbone.edit_points(self.model)
        self.image_token_id = backbone.image_token_id(self.processor, self.model)
        editor.attach(self.model, self.edit_points)
        self.keys = KeyCapture(editor.key_modules(), pool=editor.pool_keys)
        self.immediate = self._score_metrics()
        self.retained = self._score_metrics()
        #: the same metrics on the held-out variants (no ``rel``: the edit prompt has no held-out variant).
        self.immediate_held_out = self._score_metrics(HELD_OUT_KEYS)
        self.retained_held_out = self._score_metrics(HELD_OUT_KEYS)
        self._references: dict[int, dict[str, Reference]] = {}
        self._held_out_references: dict[int, dict[str, Reference]] = {}
        #: per edit: wall seconds of the whole edit and of the editor's own statistics + write.
        self.timings: list[dict[str, float]] = []
        self.summary: dict | None = None
        #: the editor's state before the first edit (``single_edits`` only), in edit_state_dict's layout.
        self._initial_state: dict[str, Tensor] = {}
        #: edits of this stream applied so far, and the hashes of their records (sequential streams).
        self.edits_done = 0
        self._applied: list[str] = []
        #: record hashes held by the loaded edit state (``load_edit_state``).
        self._prior_records: list[str] = []
        self._prior_hashes: set[str] = set()
        self._resume: dict | None = None  # the checkpoint's stream payload, until the stream restarts
        self._stream_sha = ""  # hash of this stream's record hashes in order, set when the stream starts
        self._checkpoint_at = 0  # edits the latest checkpoints/last.ckpt holds (0: none)
        self._retained_by_question: dict[str, dict[str, float]] = {}
        self._journal: Journal | None = None
        self._current: EditTuple | None = None  # the edit being applied
        self._mid_edit = False  # from an edit's first write until its journal line: the state is mid-edit
        self._pending: dict | None = None  # this edit's journal line, written once the edit is complete
        self.failure: dict | None = None
        #: the last edit's write diagnostics per edited module, and its fit before / after the write
        self.last_diagnostics: dict[str, dict[str, float]] = {}
        self._step_seconds = 0.0
        self._step_tick = 0.0
        self._fit_before: dict[str, float] = {}
        #: stream sums of every diagnostic (per module) and of the edit fit, for metrics.json
        self._diagnostic_sums: dict[str, dict[str, float]] = {}
        self._diagnostic_count = 0
        #: edits whose t_loc / m_loc had no answer and were left unscored (data.empty_locality: skip)
        self._locality_skipped: dict[str, int] = {}
        self.strict_loading = False  # checkpoints hold only what the stream changed, not the frozen backbone

    @property
    def last_timing(self) -> dict[str, float]:
        """Timing of the most recent edit (empty before the first)."""
        return self.timings[-1] if self.timings else {}

    @staticmethod
    def _score_metrics(keys: tuple[str, ...] = EDIT_SCORE_KEYS) -> torch.nn.ModuleDict:
        """A metric per score in ``keys``, plus the argmax-agreement twin of each locality score."""
        metric = {"rel": Reliability, "t_gen": TextGenerality, "m_gen": ModalGenerality}
        metric |= {"t_loc": TextLocality, "m_loc": ModalLocality}
        metrics = {k: metric[k]() for k in keys}
        metrics |= {f"{k}_agree": LocalityAgreement() for k in LOC_KEYS if k in keys}
        return torch.nn.ModuleDict(metrics)

    # --- Lightning plumbing ----------------------------------------------------------------------
    @override
    def _apply(self, fn, *args, **kwargs) -> OnlineEditModule:
        """``.to(device)`` and its kin move the editor's own tensors too (:meth:`Editor.apply_to_tensors`): Lightning
        moves the module to its device after :meth:`__init__` attached the editor on the CPU."""
        super()._apply(fn, *args, **kwargs)
        self.editor.apply_to_tensors(fn)
        return self

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = self.editor.configure_optimizer()
        self.editor.prepare(optimizer, self)  # e.g. retain keys; a loaded edit state or checkpoint replaces them
        if self.load_edit_state and self._resume is None:  # a checkpoint already holds it, and more
            metadata = load_edit_state(self.model, optimizer, self.load_edit_state, self.editor.state_metadata())
            self._prior_records = json.loads(metadata.get("records", "[]"))
            self._prior_hashes = set(self._prior_records)
            if int(metadata.get("num_edits", "0")) and not self._prior_records:
                log.warning(
                    "%s does not list the records it holds: whether this stream repeats one of them cannot be checked",
                    self.load_edit_state,
                )
        if self.single_edits:
            self._initial_state = {k: v.clone() for k, v in edit_state_dict(self.model, optimizer).items()}
        # the editor's own write is timed inside the optimizer's step (not Lightning's plumbing around it)
        optimizer.register_step_pre_hook(self._step_started)
        optimizer.register_step_post_hook(self._step_ended)
        return optimizer

    def _step_started(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._step_tick = time.perf_counter()

    def _step_ended(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._step_seconds += time.perf_counter() - self._step_tick

    def encode(self, batch: EditTuple) -> dict[str, ModelInputs]:
        """The five seen queries (``edit``, ``t_gen``, ``m_gen``, ``t_loc``, ``m_loc``), encoded."""
        return self._encode(batch.queries(), batch.source)

    def encode_held_out(self, batch: EditTuple) -> dict[str, ModelInputs]:
        """The held-out ``t_gen`` / ``m_gen`` / ``t_loc`` / ``m_loc`` queries, encoded; empty without a companion."""
        return self._encode(batch.held_out_queries(), f"{batch.source} (held-out companion)")

    def encode_query(self, query: Query) -> ModelInputs:
        """``query`` as the editor has the model asked (:meth:`Editor.rewrite_query`), tokenised by the backbone, on
        the model's device, floats in the model's dtype."""
        return self._tokenize(self.editor.rewrite_query(query, self))

    def _tokenize(self, query: Query) -> ModelInputs:
        return self.backbone.encode(self.processor, query, self.image_token_id).to(self.device, self.model.dtype)

    def _encode_after_write(
        self, queries: dict[str, Query], inputs: dict[str, ModelInputs], source: str = ""
    ) -> dict[str, ModelInputs]:
        """``inputs`` for scoring after a write: the queries the editor now rewrites (IKE's demonstrations, retrieved
        from a memory that holds this edit) encoded again, the others as they were."""
        rewritten = {n: self.editor.rewrite_query(q, self) for n, q in queries.items() if n in inputs}
        changed = {n: q for n, q in rewritten.items() if q is not queries[n]}
        return {**inputs, **self._encode(changed, source, rewritten=True)} if changed else inputs

    def _encode(self, queries: dict[str, Query], source: str = "", rewritten: bool = False) -> dict[str, ModelInputs]:
        """Each query encoded (:meth:`encode_query`; ``rewritten``: already rewritten by the editor, only tokenised);
        a query that cannot be built is a :class:`StreamError` naming the record's fields."""
        encoded = {}
        for name, q in queries.items():
            try:
                encoded[name] = self._tokenize(q) if rewritten else self.encode_query(q)
            except Exception as exc:
                raise StreamError(
                    f"{source or 'edit'}, fields {QUERY_FIELDS.get(name, name)}: cannot build the {name} query "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
        return encoded

    def logits(self, inputs: ModelInputs) -> Tensor:
        with self.editor.forward_context(inputs):
            return self.backbone.logits(self.model, inputs)

    # --- the edit --------------------------------------------------------------------------------
    @torch.no_grad()
    def references(self, inputs: dict[str, ModelInputs]) -> dict[str, Reference]:
        """θ_{t-1}'s log-probabilities on the locality queries among ``inputs``, computed once per edit."""
        return {name: reference(self.logits(inputs[name]), inputs[name].labels) for name in LOC_KEYS if name in inputs}

    def edit_loss(self, inputs: dict[str, ModelInputs], refs: dict[str, Reference], capture: bool) -> Tensor:
        """L_rel + gen_weight · L_gen + loc_weight · L_loc (eq. 19–22); keys recorded if ``capture``."""
        logits = {}
        for name, query in inputs.items():
            positions = query.positions(self.editor.key_positions) if capture else None
            with self.keys.record(positions) if capture else nullcontext():
                logits[name] = self.logits(query)
            if capture and name == "edit":  # θ_{t-1} on the edit: the fit before the write
                self._fit_before = edit_fit(logits[name], query.labels)
        return composite_loss(logits, inputs, refs, self.gen_weight, self.loc_weight)

    @override
    def training_step(self, batch: EditTuple, batch_idx: int) -> Tensor:
        self._current = batch
        if batch.record_sha256 and batch.record_sha256 in self._prior_hashes:
            raise self._double_application(batch)
        optimizer = self.optimizers()
        held_inputs = self.encode_held_out(batch)  # scored only: never part of the loss below
        held_refs = self.references(held_inputs)  # from θ_{t-1}, like the seen references
        self._mid_edit = True
        done = self.apply_edit(optimizer, batch.queries(), batch.source)
        loss, scores, fit, edit_seconds = done.loss, done.scores, done.fit, done.seconds
        held_inputs = self._encode_after_write(batch.held_out_queries(), held_inputs, batch.source)
        held = self.evaluate_held_out(held_inputs, held_refs, self.immediate_held_out, rel=scores["rel"])
        if self.retention:  # the retention pass needs them; nothing else does
            self._references[batch.index] = _to_cpu(done.refs)
            if held_inputs:
                self._held_out_references[batch.index] = _to_cpu(held_refs)
        if self.single_edits:  # back to the state before the first edit
            optimizer.optimizer.state.clear()
            apply_edit_state(self.model, optimizer.optimizer, self._initial_state)
        step = batch.index + 1
        for name in batch.skip_locality:
            self._locality_skipped[name] = self._locality_skipped.get(name, 0) + 1
        self._pending = {
            "edit": step,
            "record": batch.record,
            "record_sha256": batch.record_sha256,
            "loss": float(loss),
            "scores": scores,
            **({"held_out_scores": held} if held else {}),
            "seconds": edit_seconds,
            "fit": fit,
            "diagnostics": self.last_diagnostics,
        }
        self._log_scalars({f"edit/{k}": v for k, v in fit.items()}, step)
        self._log_scalars(
            {f"diag/{module}/{k}": v for module, diag in self.last_diagnostics.items() for k, v in diag.items()}, step
        )
        self._log_scalars({f"immediate/{k}": v for k, v in scores.items()}, step)
        self._log_scalars({f"held_out/immediate/{k}": v for k, v in held.items()}, step)
        self._log_scalars(
            {"edit/loss": float(loss), "edit/seconds": edit_seconds, "edit/editor_seconds": done.editor_seconds}, step
        )
        self._log_running_means(step)
        return loss

    def _log_running_means(self, step: int) -> None:
        """Stream means so far of Rel and of the two locality scores: logged at edit ``step``, shown on the bar."""
        running = {
            "rel": float(self.immediate["rel"].compute()),
            "loc": float((self.immediate["t_loc"].compute() + self.immediate["m_loc"].compute()) / 2),
        }
        self._log_scalars(running, step)
        for name, value in running.items():  # the bar only: Lightning would log it against its own 0-based step
            self.log(name, value, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)

    def _record_fit(self, after: dict[str, float]) -> dict[str, float]:
        """This edit's NLL and margin before and after its write; it and the write diagnostics join the stream sums."""
        fit = {f"{k}_before": v for k, v in self._fit_before.items()} | {f"{k}_after": v for k, v in after.items()}
        self._diagnostic_count += 1
        rows = {"edit_fit": fit, **self.last_diagnostics}
        for group, values in rows.items():
            sums = self._diagnostic_sums.setdefault(group, {})
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
        return fit

    def apply_edit(
        self, optimizer: LightningOptimizer | torch.optim.Optimizer, queries: dict[str, Query], source: str = ""
    ) -> AppliedEdit:
        """Write one edit into the current model and score it right after: the per-edit path of the stream
        (:meth:`training_step`) and of the live edit service (:mod:`more_lightning.serve`).

        ``queries``: ``edit`` and any of ``t_gen`` / ``m_gen`` / ``t_loc`` / ``m_loc`` (a missing one is left out of
        the loss and the scores); ``source`` names the request in errors. Encodes them, takes θ_{t-1}'s locality
        references, writes (:meth:`write`), scores into ``self.immediate`` and records the timing and the fit.
        ``optimizer``: the editor's (from :meth:`configure_optimizers`), raw or as Lightning wraps it.
        """
        start = time.perf_counter()
        inputs = self._encode(queries, source)
        refs = self.references(inputs)
        loss, editor_seconds = self.write(optimizer, inputs, refs, queries)
        seconds = time.perf_counter() - start
        self.timings.append({"edit_seconds": seconds, "editor_seconds": editor_seconds})
        fits: dict[str, dict[str, float]] = {}
        inputs = self._encode_after_write(queries, inputs, source)
        scores = self.evaluate(inputs, refs, self.immediate, fits)
        return AppliedEdit(refs, loss, scores, self._record_fit(fits["edit"]), seconds, editor_seconds)

    def write(
        self,
        optimizer: LightningOptimizer | torch.optim.Optimizer,
        inputs: dict[str, ModelInputs],
        refs: dict[str, Reference],
        queries: dict[str, Query] | None = None,
    ) -> tuple[Tensor, float]:
        """The editor's ``begin_edit``, ``steps_per_edit`` × (composite loss, backward, editor step), its ``end_edit``.

        Returns the last (detached) loss and the seconds spent in the editor's own statistics and write
        (``begin_edit``, ``observe``, the optimizer's own ``step`` timed by its step hooks, ``end_edit``). Outside a
        trainer (the live edit service) the backward is plain autograd; in a stream it is Lightning's
        ``manual_backward``. With ``steps_per_edit = 0`` (a memory editor) the loss is that of the model before the
        write, computed without a backward. ``queries``: what ``inputs`` encode (for ``begin_edit``).
        """
        raw = getattr(optimizer, "optimizer", optimizer)  # the editor's own optimizer under Lightning's wrapper
        tick = time.perf_counter()
        self.editor.begin_edit(raw, self, queries or {}, inputs)
        editor_seconds = time.perf_counter() - tick
        self._step_seconds = 0.0  # the optimizer's own steps (hooks set in configure_optimizers)
        if self.editor.steps_per_edit == 0:
            with torch.no_grad():
                loss = self.edit_loss(inputs, refs, capture=True)
        for inner in range(self.editor.steps_per_edit):
            self.keys.reset()
            loss = self.edit_loss(inputs, refs, capture=inner == 0)
            optimizer.zero_grad()
            self._backward(loss)
            if inner == 0:
                tick = time.perf_counter()
                self.editor.observe(raw, self.keys.keys())
                editor_seconds += time.perf_counter() - tick
            optimizer.step()
        editor_seconds += self._step_seconds
        tick = time.perf_counter()
        self.editor.end_edit(raw)
        editor_seconds += time.perf_counter() - tick
        optimizer.zero_grad()
        self.last_diagnostics = self.editor.diagnostics(raw)  # outside the editor's timing
        return loss.detach(), editor_seconds

    def _backward(self, loss: Tensor) -> None:
        if not loss.requires_grad:  # a memory editor whose trained entry no query of this edit reached: nothing to
            return  # train this step, and the editor's step sees no gradient
        if self._trainer is None:  # no trainer to hand it to: applied by the live edit service
            loss.backward()
        else:
            self.manual_backward(loss)

    @torch.no_grad()
    def evaluate(
        self,
        inputs: dict[str, ModelInputs],
        refs: dict[str, Reference],
        metrics: torch.nn.ModuleDict,
        fits: dict[str, dict[str, float]] | None = None,
    ) -> dict[str, float]:
        """Scores of one edit in percent; also accumulated into ``metrics``.

        ``avg`` is added when ``inputs`` hold all five queries (the seen set). With ``fits``, the edit query's
        :func:`edit_fit` is put there under ``"edit"`` from the same forward.
        """
        scores = {}
        for name, query in inputs.items():
            raw = self.logits(query)
            if fits is not None and name == "edit":
                fits[name] = edit_fit(raw, query.labels)
            logits, labels = shift_for_loss(raw, query.labels)
            key = SCORE_OF[name]
            if name in EDIT_KEYS:
                metrics[key].update(logits, labels)
                scores[key] = 100 * float(token_accuracy(logits, labels)[0])
                scores[f"{key}_em"] = 100 * float(exact_match(logits, labels)[0])
            else:
                ref = refs[name]
                # the answer positions of this encoding: an editor that rewrites the query (IKE) may have made it
                # longer or shorter than the θ_{t-1} encoding ref.mask marks; the n answer rows are the same tokens
                logp = F.log_softmax(logits.float(), dim=-1)[labels != -100][None]  # (1, n, V)
                ref_logp = ref.logp.to(logp.device)[None]  # (1, n, V)
                mask = torch.ones(logp.shape[:2], dtype=torch.bool, device=logp.device)  # (1, n)
                metrics[key].update(logp, ref_logp, mask)
                metrics[f"{key}_agree"].update(logp, ref_logp, mask)
                scores[key] = 100 * float(locality_score(logp, ref_logp, mask)[0])
                scores[f"{key}_agree"] = 100 * float(argmax_agreement(logp, ref_logp, mask)[0])
        if all(k in scores for k in EDIT_SCORE_KEYS):
            scores["avg"] = average_score(scores)
        return scores

    def evaluate_held_out(
        self, inputs: dict[str, ModelInputs], refs: dict[str, Reference], metrics: torch.nn.ModuleDict, rel: float
    ) -> dict[str, float]:
        """Held-out scores of one edit in percent (empty without held-out inputs); ``avg`` uses the seen ``rel``."""
        if not inputs:
            return {}
        scores = self.evaluate(inputs, refs, metrics)
        scores["avg"] = average_score({**scores, "rel": rel})
        return scores

    # --- stream bookkeeping: journal, checkpoints, resume, failures --------------------------------
    @override
    def configure_callbacks(self) -> list[Callback]:
        return [_StreamGuard()]

    def _stream_records(self) -> list[str] | None:
        """Hashes of every record of this stream, in order (``None`` if the loader does not expose them)."""
        records = getattr(getattr(self.trainer.train_dataloader, "dataset", None), "records", None)
        return None if records is None else [r.sha256 for r in records]

    @override
    def on_train_start(self) -> None:
        stream = self._stream_records()
        self._stream_sha = _stream_sha256(stream or [])
        if self._resume is not None:
            self._continue_stream(stream)  # refuses another stream's checkpoint
            if self.edits_done >= self.trainer.num_training_batches:
                rank_zero_info(
                    f"the stream of {self.trainer.ckpt_path} is complete ({self.edits_done} edits): nothing to "
                    f"resume; its metrics.json and edit state are in {self.run_dir()}"
                )
                self._resume = None
                return
        elif stream is not None and self._prior_hashes:
            for position, sha in enumerate(stream):
                if sha in self._prior_hashes:
                    raise self._double_application(self.trainer.train_dataloader.dataset[position])
        if self.trainer.is_global_zero:
            self._journal = Journal(self.run_dir() / JOURNAL_NAME)
            if self._resume is not None:
                line = {"event": "resume", "after_edit": self.edits_done, "checkpoint": str(self.trainer.ckpt_path)}
                self._journal.write({**line, "time": now()})
            else:
                self._journal.write(self._start_line())
        self._resume = None

    def _start_line(self) -> dict:
        dm = self.trainer.datamodule
        return {
            "event": "start",
            "editor": type(self.editor).__name__,
            "backbone": self._backbone_name(),
            "data_file": str(getattr(dm, "data_file", "")),
            "num_edits": self.trainer.num_training_batches,
            "load_edit_state": self.load_edit_state,
            "single_edits": self.single_edits,
            "time": now(),
        }

    def _continue_stream(self, stream: list[str] | None) -> None:
        saved = self._resume
        if stream is not None and saved["stream_sha256"] != self._stream_sha:
            raise StreamError(
                f"checkpoint {self.trainer.ckpt_path} was written by another stream (its data file, seed, "
                "num_edits or order differ from this run's): resume with the run's own config, "
                "e.g. --config <run folder>/config.yaml"
            )
        torch.set_rng_state(saved["rng"]["torch"])
        random.setstate(saved["rng"]["python"])
        name, keys, pos, has_gauss, cached = saved["rng"]["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        log.info("resuming the stream after edit %d of %d", self.edits_done, self.trainer.num_training_batches)

    def _backbone_name(self) -> str:
        return f"{type(self.backbone).__name__}:{self.backbone.path}"

    def _double_application(self, batch: EditTuple) -> StreamError:
        return StreamError(
            f"{batch.source} (stream position {batch.index + 1}) is already in the loaded edit state "
            f"{self.load_edit_state} ({len(self._prior_records)} edits): applying this stream would write it "
            "twice. To continue a killed stream use --ckpt_path last (the run's checkpoints); to edit on top of "
            "that state, stream records it does not hold."
        )

    @override
    def on_train_batch_end(self, outputs, batch: EditTuple, batch_idx: int) -> None:
        done = self.edits_done + 1
        save = done == self.trainer.num_training_batches or (self.save_every and done % self.save_every == 0)
        entry, self._pending = self._pending or {}, None
        state = None
        if save or batch.expected_state_sha256:
            state = edit_state_dict(self.model, self.optimizers().optimizer)
            entry["state_sha256"] = state_sha256(state)
            if batch.expected_state_sha256 and entry["state_sha256"] != batch.expected_state_sha256:
                raise StreamError(
                    f"replay diverged at edit {done} ({batch.source}): the editor state hashes to "
                    f"{entry['state_sha256'][:16]}, the journal recorded {batch.expected_state_sha256[:16]} — "
                    "replay with the run's own config (<run folder>/config.yaml) on the same base model"
                )
        if self._journal is not None:
            self._journal.write(entry)
        self.edits_done = done
        if not self.single_edits:
            self._applied.append(batch.record_sha256)
        self._mid_edit = False
        if save:
            self.save_edit_state(state)
            self.save_stream_checkpoint()
        self._current = None

    def checkpoint_path(self) -> Path:
        return self.run_dir() / "checkpoints" / "last.ckpt"

    def save_stream_checkpoint(self) -> Path | None:
        """``checkpoints/last.ckpt`` in the run folder: what ``--ckpt_path last`` resumes from."""
        if self.trainer is None:
            return None
        path = self.checkpoint_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.trainer.save_checkpoint(path, weights_only=False)  # with optimizer state; written atomically
        self._checkpoint_at = self.edits_done
        return path

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["edit_stream"] = {
            "edits_done": self.edits_done,
            "applied_records": list(self._applied),
            "prior_records": list(self._prior_records),
            "stream_sha256": self._stream_sha,
            "editor": type(self.editor).__name__,
            "backbone": self._backbone_name(),
            "metrics": {
                name: _metric_states(getattr(self, name))
                for name in ("immediate", "retained", "immediate_held_out", "retained_held_out")
            },
            "references": _references_payload(self._references),
            "held_out_references": _references_payload(self._held_out_references),
            "timings": list(self.timings),
            "diagnostic_sums": self._diagnostic_sums,
            "diagnostic_count": self._diagnostic_count,
            "locality_skipped": dict(self._locality_skipped),
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "numpy": _numpy_rng_state(),
            },
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("edit_stream")
        if saved is None:
            raise StreamError("the checkpoint holds no edit stream: resume from a run's checkpoints/last.ckpt")
        mine = {"editor": type(self.editor).__name__, "backbone": self._backbone_name()}
        for key, value in mine.items():
            if saved[key] != value:
                raise StreamError(
                    f"the checkpoint was written with {key} {saved[key]}, this run has {value}: resume with the "
                    "run's own config (<run folder>/config.yaml)"
                )
        self.edits_done = self._checkpoint_at = int(saved["edits_done"])
        self._applied = list(saved["applied_records"])
        self._prior_records = list(saved["prior_records"])
        self._prior_hashes = set(self._prior_records)
        for name, states in saved["metrics"].items():
            _restore_metric_states(getattr(self, name), states)
        self._references = _references_from(saved["references"])
        self._held_out_references = _references_from(saved["held_out_references"])
        self.timings = list(saved["timings"])
        self._diagnostic_sums = saved.get("diagnostic_sums", {})
        self._diagnostic_count = int(saved.get("diagnostic_count", 0))
        self._locality_skipped = dict(saved.get("locality_skipped", {}))
        self._resume = saved

    def stream_failed(self, exception: BaseException) -> None:
        """Save what the edits done so far produced, tell where the stream stopped and how to go on.

        The checkpoint and edit state are written only when the failure came between two edits; when it
        came in the middle of a write, the last periodic checkpoint is the one to resume from.
        """
        if self.trainer is None or not self.trainer.is_global_zero:
            return
        if self._journal is None:
            return  # the stream never started (or restarted): nothing new to save, the error says it all
        batch = self._current
        where = batch.source if batch is not None else "the next record"
        failed_at = self.edits_done + 1
        self.failure = {"edit": failed_at, "record": where, "error": f"{type(exception).__name__}: {exception}"}
        saved = []
        if not self._mid_edit and self.edits_done:
            saved += [str(self.save_edit_state()), str(self.save_stream_checkpoint())]
        self._journal.write({"event": "failed", **self.failure, "time": now()})
        self._journal.close()
        saved.append(str(self._journal.path))
        self.summary = self._summary()
        self._write_summary()
        saved.append(str(self.run_dir() / "metrics.json"))
        how = (
            f"python cli.py fit --config {self.run_dir() / 'config.yaml'} --ckpt_path last"
            if self._checkpoint_at
            else "no checkpoint yet: run the stream again"
        )
        log.error(
            "edit stream stopped at edit %d of %d (%s)%s: %s\nsaved: %s\nto go on after the last checkpoint "
            "(edit %s): %s",
            failed_at,
            len(self.trainer.train_dataloader),
            where,
            ", in the middle of the edit" if self._mid_edit else "",
            self.failure["error"],
            ", ".join(saved),
            self._checkpoint_at or "none",
            how,
        )

    # --- predict: answer questions with the (loaded) edit state -----------------------------------
    @override
    def on_predict_start(self) -> None:
        if self.load_edit_state:
            metadata = load_edit_state(
                self.model, self.editor.configure_optimizer(), self.load_edit_state, self.editor.state_metadata()
            )
            rank_zero_info(f"predict: edit state {self.load_edit_state} ({metadata.get('num_edits', '?')} edits)")
        self._predictions_path = self._predictions_file()
        self._predictions = self._predictions_path.open("w", encoding="utf-8")
        self._answered = 0

    def _predictions_file(self) -> Path:
        """The datamodule's ``predict_out`` if set, else ``predictions.jsonl`` in the run folder."""
        out = getattr(self.trainer.datamodule, "predict_out", None)
        path = Path(out) if out else self.run_dir() / "predictions.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @override
    def predict_step(self, batch: PredictItem, batch_idx: int) -> dict:
        """The greedy answer to one query, also written as a JSON line: index, question, image, answer."""
        answer = greedy_answer(
            self.backbone, self.model, self.processor, batch.query, self.max_new_tokens, self.image_token_id, self
        )
        record = batch.record
        line = {"index": record.index, "question": record.prompt, "image": record.image, "answer": answer}
        self._predictions.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._predictions.flush()
        self._answered += 1
        return line

    @override
    def on_predict_end(self) -> None:
        self._predictions.close()
        rank_zero_info(f"predict: {self._answered} answers written to {self._predictions_path}")

    # --- after the stream ------------------------------------------------------------------------
    @override
    def on_train_epoch_end(self) -> None:
        self._retained_by_question = {}
        if self.retention and self._references:
            self._retention_pass()
        self.save_edit_state()
        self.summary = self._summary()
        step = len(self.timings)
        held_out = self.summary.get("held_out", {})
        for phase in ("immediate", "retention"):
            self._log_scalars({f"final_{phase}/{k}": v for k, v in self.summary[phase].items()}, step)
            self._log_scalars({f"held_out/final_{phase}/{k}": v for k, v in held_out.get(phase, {}).items()}, step)
        self._write_summary()
        if self._journal is not None:
            self._journal.write({"event": "end", "edits": self.edits_done, "time": now()})
            self._journal.close()
            self._journal = None

    def _retention_pass(self) -> None:
        """Score every edit again on the final model: into the retention metrics, ``retention/<score>`` at edit t
        (the forgetting curve), ``retention.jsonl`` and the shared / unique question split."""
        dataset = self.trainer.train_dataloader.dataset
        rank_zero_info(f"retention pass: scoring the {len(self._references)} edits again on the final model")
        per_edit, lines = [], []
        for index, refs in sorted(self._references.items()):
            item = dataset[index]
            scores = self.evaluate(self.encode(item), refs, self.retained)
            held = {}
            if index in self._held_out_references:
                held_refs = self._held_out_references[index]
                held = self.evaluate_held_out(
                    self.encode_held_out(item), held_refs, self.retained_held_out, rel=scores["rel"]
                )
            step = index + 1
            self._log_scalars({f"retention/{k}": v for k, v in scores.items()}, step)
            self._log_scalars({f"held_out/retention/{k}": v for k, v in held.items()}, step)
            lines.append(
                {"edit": step, "record": item.record, "scores": scores, **({"held_out_scores": held} if held else {})}
            )
            per_edit.append((item.edit.prompt, {**scores, **({"held_out_avg": held["avg"]} if held else {})}))
        self._retained_by_question = split_by_shared_question(per_edit)
        if self.trainer.is_global_zero:
            text = "".join(json.dumps(line) + "\n" for line in lines)
            _atomic_write_text(self.run_dir() / RETENTION_NAME, text)

    @staticmethod
    def _totals(metrics: torch.nn.ModuleDict, rel: Reliability) -> dict[str, float]:
        """Stream means of the scores in ``metrics`` and their ``avg`` (with ``rel`` when ``metrics`` lacks it)."""
        if rel.update_count == 0 or metrics["t_gen"].update_count == 0:
            return {}
        totals = {k: float(metrics[k].compute()) for k in EDIT_SCORE_KEYS if k in metrics}
        totals["avg"] = average_score({"rel": float(rel.compute()), **totals})
        return totals

    @staticmethod
    def _exact(metrics: torch.nn.ModuleDict) -> dict[str, float]:
        if metrics["t_gen"].update_count == 0:
            return {}
        return {k: float(metrics[k].compute_exact_match()) for k in ("rel", "t_gen", "m_gen") if k in metrics}

    def _agreement(self, immediate: torch.nn.ModuleDict, retained: torch.nn.ModuleDict) -> dict[str, float]:
        """MMEdit's locality convention (argmax agreement): after the stream if retention ran, else immediate."""
        metrics = retained if self.retention else immediate
        return {k: float(metrics[f"{k}_agree"].compute()) for k in LOC_KEYS}

    def _scored_held_out(self) -> bool:
        return self.immediate_held_out["t_gen"].update_count > 0

    def _summary(self) -> dict:
        seconds = [t["edit_seconds"] for t in self.timings]
        summary = {
            "editor": type(self.editor).__name__,
            "backbone": f"{type(self.backbone).__name__}:{Path(self.backbone.path).name}",
            "task": self.task,
            "num_edits": self.edits_done if self.failure else len(self.timings),
            "protocol": "single" if self.single_edits else "sequential",
            "status": "failed" if self.failure else "complete",
            "locality_skipped": {k: self._locality_skipped.get(k, 0) for k in LOC_KEYS},
            **({"failed_at": self.failure} if self.failure else {}),
            "headline": "held_out" if self._scored_held_out() else "seen",
            "immediate": self._totals(self.immediate, self.immediate["rel"]),
            "retention": self._totals(self.retained, self.retained["rel"]),
            "locality_agreement": self._agreement(self.immediate, self.retained),
            "exact_match": {"immediate": self._exact(self.immediate), "retention": self._exact(self.retained)},
            "seconds_per_edit": float(sum(seconds) / len(seconds)) if seconds else 0.0,
            "state_bytes": self._state_bytes(),
            "retention_by_question": self._retained_by_question,
            "diagnostics": {
                group: {k: v / self._diagnostic_count for k, v in sums.items()}
                for group, sums in self._diagnostic_sums.items()
            },
        }
        if self._scored_held_out():
            held, retained = self.immediate_held_out, self.retained_held_out
            summary["held_out"] = {
                "immediate": self._totals(held, self.immediate["rel"]),
                "retention": self._totals(retained, self.retained["rel"]),
                "locality_agreement": self._agreement(held, retained),
                "exact_match": {"immediate": self._exact(held), "retention": self._exact(retained)},
            }
        return summary

    def _state_bytes(self) -> int:
        """Bytes of the editor's state now (``Editor.state_bytes``); 0 outside a run."""
        if self._trainer is None:
            return 0
        return self.editor.state_bytes(self.optimizers().optimizer)

    def _write_summary(self) -> None:
        if self.trainer is None or not self.trainer.is_global_zero:
            return
        s = self.summary
        keys = ("rel", "t_gen", "m_gen", "t_loc", "m_loc", "avg")
        rows = {phase: s[phase] for phase in ("immediate", "retention")}
        if "held_out" in s:  # seen and held-out rows; the held-out row repeats the edit's own Rel
            rows = {
                f"{phase} {kind}": {"rel": s[phase].get("rel", 0.0), **scores[phase]}
                for phase in ("immediate", "retention")
                for kind, scores in (("seen", s), ("held_out", s["held_out"]))
                if scores[phase]
            }
        width = max(10, *(len(label) + 1 for label in rows))
        lines = [f"{'':{width}s}" + "".join(f"{k:>8s}" for k in keys)]
        for label, scores in rows.items():
            if scores:
                lines.append(f"{label:{width}s}" + "".join(f"{scores[k]:8.2f}" for k in keys))
        path = self.run_dir() / "metrics.json"
        _atomic_write_text(path, json.dumps(s, indent=2))
        rank_zero_info(
            f"{s['editor']} on {s['backbone']} ({s['task']}), {s['num_edits']} edits, "
            f"{s['seconds_per_edit']:.3f} s/edit\n" + "\n".join(lines) + f"\nmetrics written to {path}"
        )

    def run_dir(self) -> Path:
        logger_dir = self.logger.log_dir if self.logger is not None else None
        run_dir = Path(logger_dir or self.trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir

    def save_edit_state(self, state: dict[str, Tensor] | None = None) -> Path | None:
        """Atomically write the editor's weights and statistics to ``edit_state.safetensors``.

        ``state``: the :func:`edit_state_dict` already taken of the current model, if any.
        """
        if self.trainer is None or not self.trainer.is_global_zero:
            return None
        path = self.run_dir() / "edit_state.safetensors"
        records = self._prior_records + self._applied
        metadata = {"num_edits": str(len(records)), "records": json.dumps(records), **self.editor.state_metadata()}
        save_edit_state(self.model, self.optimizers().optimizer, path, metadata, state)
        return path

    def _log_scalars(self, scalars: dict[str, float], step: int) -> None:
        if not scalars:
            return
        for logger in self.loggers:
            logger.log_metrics(scalars, step=step)
