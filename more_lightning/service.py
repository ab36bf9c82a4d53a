"""The engine behind the live edit service (:mod:`more_lightning.serve`): one model, one editor, edits in order.

An :class:`EditService` holds the stream config's :class:`~more_lightning.module.OnlineEditModule` (backbone loaded,
editor attached) and its optimizer, outside any Trainer, and offers two operations:

* :meth:`EditService.edit` writes one edit through :meth:`OnlineEditModule.apply_edit` — the very code path a
  stream's ``training_step`` runs (encode, θ_{t-1} locality references, ``steps_per_edit`` × composite loss +
  backward + editor step, immediate scores) — then appends its line to the edit journal and saves the edit state,
  atomically, before it returns;
* :meth:`EditService.answer` decodes greedily (:func:`~more_lightning.generate.greedy_answer`), as ``predict`` does.

Neither is thread-safe on its own: the caller runs both on one worker, one at a time (the HTTP app does, in arrival
order), so an answer never sees a half-written edit.

Locality samples. A stream's composite loss adds KL terms on a text and a multimodal locality sample that each
record carries; a live edit brings only image, question and answer. With a locality pool (the records of the config's
own edit stream: its data file, seed and ``num_edits``) edit ``n`` borrows the ``loc`` / ``loc_ans`` and
``m_loc`` / ``m_loc_q`` / ``m_loc_a`` samples of the pool's record ``(n - 1) mod len(pool)``, so the loss is the
stream's less the two generality terms (there is no rephrase of a live edit), and the scores are Rel and the two
locality scores. Without a pool the loss is the edit's NLL alone.

The state folder holds ``edit_state.safetensors`` (:func:`~more_lightning.editors.state.save_edit_state`; metadata
``num_edits`` and ``records``, the hash of every edit request it holds) and ``journal.jsonl``
(:class:`~more_lightning.journal.Journal`): a ``start`` or ``resume`` line per start-up, one line per edit, written
and synced before the state is saved, and ``end`` at shutdown. An edit line records the request itself — no data
file holds it — and uploaded images are kept in ``images/<sha256>.<ext>`` beside it:

    {"edit": 4, "source": "serve", "question": "...", "answer": "...", "image": "vqa_eval/00000.png",
     "image_sha256": "...", "request_sha256": "...", "locality_record": 3, "loss": 0.41,
     "scores": {"rel": 100.0, ...}, "seconds": 0.07, "fit": {...}, "state_sha256": "...", "time": "..."}

A restart on the same folder loads the state and goes on with edit ``num_edits + 1``; a ``resume`` line (as in a
stream's journal) says after which edit, so a journal line of an edit whose state was never saved is superseded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from more_lightning.data.records import EditRecord, Query
from more_lightning.data.schema import load_image
from more_lightning.editors.state import (
    apply_edit_state,
    check_edit_state,
    check_state_metadata,
    edit_state_dict,
    save_edit_state,
)
from more_lightning.generate import greedy_answer
from more_lightning.journal import JOURNAL_NAME, Journal, now, state_sha256
from more_lightning.module import AppliedEdit, OnlineEditModule, StreamError
from more_lightning.uploads import LiveImage

log = logging.getLogger(__name__)

STATE_NAME = "edit_state.safetensors"
#: uploaded images of edits, by content hash, under the state folder
UPLOADS = "images"


class ServiceError(RuntimeError):
    """The service cannot start as asked (a state of another editor, ...); the message says what to fix."""


class EditRejected(ValueError):
    """An edit request the engine cannot take (a target that tokenises to nothing, ...); the model is unchanged."""


class EditService:
    """Edits and answers on one model, with the edit state and journal in ``state_dir``.

    Args:
        module: the stream config's module (backbone loaded, editor attached), not attached to a Trainer.
        state_dir: where ``edit_state.safetensors``, ``journal.jsonl`` and uploaded images live; a state already
            there is loaded and the edit index goes on from it.
        locality: the records whose locality samples live edits borrow, in turn; empty: no locality samples.
        config: the config's path, for the journal.
    """

    def __init__(
        self, module: OnlineEditModule, state_dir: Path, locality: list[EditRecord] | None = None, config: str = ""
    ) -> None:
        self.module = module
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.locality = list(locality or [])
        if module.single_edits:
            log.warning("single_edits is set in the config: the service keeps every edit (sequential editing)")
        self.optimizer = module.configure_optimizers()  # the editor's; loads the config's load_edit_state, if any
        self.state_path = self.state_dir / STATE_NAME
        self.records: list[str] = []
        resumed = self.state_path.is_file()
        if resumed:
            self._load(self.state_path)
        elif module.load_edit_state:
            self._load(Path(module.load_edit_state), check=False)  # configure_optimizers checked and loaded it
        self.edits = len(self.records)
        self.edits_this_run = 0
        self.answers = 0
        self._restore_point = None if resumed else edit_state_dict(module.model, self.optimizer)
        self._started = time.monotonic()
        self.journal = Journal(self.state_dir / JOURNAL_NAME)
        if resumed:
            line = {"event": "resume", "after_edit": self.edits, "state": str(self.state_path), "time": now()}
            self.journal.write(line)
        else:
            self.journal.write(self._start_line(config))

    def _load(self, path: Path, check: bool = True) -> None:
        """Load the edit state at ``path`` (checked against this editor) and the records it holds."""
        try:
            tensors = load_file(path)
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
        except Exception as exc:
            raise ServiceError(f"edit state {path} cannot be read ({exc}); move it away to start afresh") from exc
        editor = type(self.module.editor).__name__
        if check:
            if metadata.get("editor", editor) != editor:
                raise ServiceError(
                    f"edit state {path} was written by editor {metadata['editor']}, this config has {editor}: "
                    "serve it with the config it was written with, or give another --state-dir"
                )
            try:
                check_state_metadata(self.module.editor.state_metadata(), metadata, f"edit state {path}")
                check_edit_state(self.module.model, {k: v for k, v in tensors.items() if k.startswith("param/")})
            except ValueError as exc:
                raise ServiceError(f"{path}: {exc}") from exc
            apply_edit_state(self.module.model, self.optimizer, tensors, path.name)
        self.records = json.loads(metadata.get("records", "[]"))
        if len(self.records) != int(metadata.get("num_edits", len(self.records))):
            self.records = [""] * int(metadata["num_edits"])  # a state that does not list its records
        log.info("edit state %s: %d edits", path, len(self.records))

    def _start_line(self, config: str) -> dict:
        return {
            "event": "start",
            "mode": "serve",
            "config": config,
            "editor": type(self.module.editor).__name__,
            "backbone": self.backbone_name,
            "load_edit_state": self.module.load_edit_state,
            "after_edit": self.edits,
            "locality": len(self.locality),
            "time": now(),
        }

    @property
    def editor_name(self) -> str:
        return type(self.module.editor).__name__

    @property
    def backbone_name(self) -> str:
        return f"{type(self.module.backbone).__name__}:{self.module.backbone.path}"

    # --- the two operations --------------------------------------------------------------------
    def edit(self, image: LiveImage, question: str, answer: str) -> dict:
        """Apply one edit, journal it, save the state; returns ``{"edit": n, "scores": ..., "loss", "seconds"}``.

        Raises:
            EditRejected: the request cannot be encoded (nothing was written). Any other failure undoes the edit
                (back to the last saved state, a ``failed`` journal line) and is raised.
        """
        n = self.edits + 1
        queries = {"edit": Query(question, answer, image.image)}
        pool_index = None
        if self.locality:
            pool_index = (n - 1) % len(self.locality)
            queries |= self._locality_queries(self.locality[pool_index])
        try:
            done = self.module.apply_edit(self.optimizer, queries, f"edit {n}")
            self._record(n, image, question, answer, done, pool_index)
        except StreamError as exc:  # raised while encoding the queries, before any write
            raise EditRejected(str(exc).removeprefix(f"edit {n}, ")) from exc
        except BaseException:
            self._restore()  # a write or save that stopped midway is undone
            raise
        self.edits, self.edits_this_run = n, self.edits_this_run + 1
        return {"edit": n, "scores": done.scores, "loss": float(done.loss), "seconds": done.seconds}

    def _record(
        self, n: int, image: LiveImage, question: str, answer: str, done: AppliedEdit, pool_index: int | None
    ) -> None:
        """Journal edit ``n`` (synced to disk), then save the edit state atomically."""
        request = {"question": question, "answer": answer, "image_sha256": image.sha256}
        request_sha = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
        state = edit_state_dict(self.module.model, self.optimizer)
        line = {
            "edit": n,
            "source": "serve",
            "question": question,
            "answer": answer,
            "image": image.label,
            **({"image_file": self._keep_upload(image)} if image.data is not None else {}),
            "image_sha256": image.sha256,
            "request_sha256": request_sha,
            "locality_record": self.locality[pool_index].source if pool_index is not None else None,
            "loss": float(done.loss),
            "scores": done.scores,
            "seconds": done.seconds,
            "fit": done.fit,
            "state_sha256": state_sha256(state),
            "time": now(),
        }
        self.journal.write(line)
        records = [*self.records, request_sha]
        metadata = {
            "num_edits": str(n),
            "records": json.dumps(records),
            "editor": type(self.module.editor).__name__,
            "backbone": self.backbone_name,
            **self.module.editor.state_metadata(),
        }
        save_edit_state(self.module.model, self.optimizer, self.state_path, metadata, state)
        self.records = records
        self._restore_point = None  # the file just saved is the state to go back to

    def answer(self, image: LiveImage | None, question: str) -> str:
        """The greedy answer of the model as edited so far."""
        module = self.module
        query = Query(question, "", image.image if image is not None else None)
        text = greedy_answer(
            module.backbone, module.model, module.processor, query, module.max_new_tokens, module.image_token_id, module
        )
        self.answers += 1
        return text

    def stats(self) -> dict:
        timings = self.module.timings  # this run's edits
        mean = (lambda key: sum(t[key] for t in timings) / len(timings)) if timings else (lambda key: 0.0)
        return {
            "edits": self.edits,
            "edits_this_run": self.edits_this_run,
            "answers": self.answers,
            "state_bytes": self.module.editor.state_bytes(self.optimizer),
            "seconds_per_edit": mean("edit_seconds"),
            "editor_seconds_per_edit": mean("editor_seconds"),
            "uptime_seconds": time.monotonic() - self._started,
            "editor": self.editor_name,
            "backbone": self.backbone_name,
            "state_dir": str(self.state_dir),
        }

    def close(self) -> None:
        self.journal.write({"event": "end", "edits": self.edits, "time": now()})
        self.journal.close()

    # --- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _locality_queries(record: EditRecord) -> dict[str, Query]:
        queries = {
            "t_loc": Query(record.loc, record.loc_ans, None),
            "m_loc": Query(record.m_loc_q, record.m_loc_a, load_image(record.m_loc)),
        }
        return {k: q for k, q in queries.items() if k not in record.skip_locality}

    def _keep_upload(self, image: LiveImage) -> str:
        """Write an uploaded image under ``images/`` (once per content) and return its path in the state folder."""
        relative = Path(UPLOADS) / f"{image.sha256}{image.suffix}"
        path = self.state_dir / relative
        if not path.is_file():
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_bytes(image.data)
            tmp.replace(path)
        return str(relative)

    @torch.no_grad()
    def _restore(self) -> None:
        """Put the model and optimizer back at the last complete edit after an edit failed midway."""
        state = self._restore_point if self._restore_point is not None else load_file(self.state_path)
        self.optimizer.state.clear()
        apply_edit_state(self.module.model, self.optimizer, state, "the last saved edit state")
        self.journal.write({"event": "failed", "edit": self.edits + 1, "after_edit": self.edits, "time": now()})
        log.error("edit %d failed midway: the model is back at edit %d", self.edits + 1, self.edits)
