"""The edit journal: an append-only record of every edit a stream applied, and how to replay it.

``journal.jsonl`` in the run folder gets one JSON object per line, flushed and synced to disk as it is
written, so a killed process leaves every applied edit on record:

    {"event": "start", "data_file": ..., "num_edits": ..., "editor": ..., "backbone": ..., "time": ...}
    {"edit": 1, "record": 417, "record_sha256": "...", "loss": 2.31, "scores": {...}, "seconds": 0.09}
    ...
    {"edit": 50, ..., "state_sha256": "..."}              # editor state hash, every save_every edits
    {"event": "resume", "after_edit": 50, "checkpoint": ".../last.ckpt", "time": ...}
    {"edit": 51, ...}                                       # edits after the checkpoint, applied again
    {"event": "failed", "edit": 58, "error": "...", "time": ...}
    {"event": "end", "edits": 100, "time": ...}

``edit`` is 1-based; ``record`` is the record's index in the data file and ``record_sha256`` the hash of
that record as it stands in the file (:func:`~more_lightning.data.schema.record_sha256`). A ``resume``
line means the stream went on from a checkpoint taken after edit ``after_edit``: lines of later edits
written before it were not kept in the model and are superseded by those after it. :func:`applied_edits`
reads a journal that way; ``EditStreamDataModule(replay_journal=...)`` streams exactly those records
again, and the module checks every recorded ``state_sha256`` on the way
(``python cli.py fit --config <run>/config.yaml --data.init_args.replay_journal <run>/journal.jsonl``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from more_lightning.data.schema import DataFileError

JOURNAL_NAME = "journal.jsonl"


def state_sha256(state: dict[str, Tensor]) -> str:
    """SHA-256 over an edit state (:func:`~more_lightning.editors.state.edit_state_dict`'s layout).

    Covers every tensor's name, dtype, shape and bytes, in name order.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class Journal:
    """Appends JSON lines to ``path``; every line is flushed and ``fsync``-ed before :meth:`write` returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # held open for the whole stream

    def write(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


@dataclass(frozen=True)
class JournalEdit:
    """One applied edit as the journal recorded it."""

    edit: int  # 1-based position in the stream
    record: int  # index of the record in the data file
    record_sha256: str
    state_sha256: str | None  # editor-state hash after this edit, where recorded
    line: int  # line of the journal it came from


def read_journal(path: str | Path) -> list[dict[str, Any]]:
    """Every line of a journal as a dict.

    Raises:
        DataFileError: the file is missing, or a line is not a JSON object (names the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: journal not found — set data.replay_journal to a run's journal.jsonl")
    entries = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                if not line.endswith("\n"):  # the process died while writing its last line: that edit is not on record
                    break
                raise DataFileError(f"{path} line {lineno}: malformed JSON ({exc.msg}) — not a journal line") from exc
            if not isinstance(entry, dict):
                raise DataFileError(f"{path} line {lineno}: expected a JSON object, got {type(entry).__name__}")
            entry["_line"] = lineno
            entries.append(entry)
    return entries


def applied_edits(path: str | Path) -> list[JournalEdit]:
    """The edits whose effect the stream kept, in order: lines superseded by a later ``resume`` are dropped.

    Raises:
        DataFileError: a line lacks a field or holds the wrong type, or edits are not numbered 1, 2, 3, ...
            (names the file, line and field).
    """
    path = Path(path)
    edits: list[JournalEdit] = []
    for entry in read_journal(path):
        line = entry["_line"]
        if entry.get("event") == "resume":
            after = _field(entry, "after_edit", int, path, line)
            edits = [e for e in edits if e.edit <= after]
            continue
        if "event" in entry:
            continue
        edit = JournalEdit(
            edit=_field(entry, "edit", int, path, line),
            record=_field(entry, "record", int, path, line),
            record_sha256=_field(entry, "record_sha256", str, path, line),
            state_sha256=entry.get("state_sha256"),
            line=line,
        )
        expected = len(edits) + 1
        if edit.edit != expected:
            raise DataFileError(f"{path} line {line}, field 'edit': edit {edit.edit} follows edit {expected - 1}")
        edits.append(edit)
    if not edits:
        raise DataFileError(f"{path}: the journal records no applied edit")
    return edits


def _field(entry: dict, key: str, kind: type, path: Path, line: int) -> Any:
    value = entry.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataFileError(f"{path} line {line}, field {key!r}: expected {kind.__name__}, got {value!r}")
    return value
