"""Plain records that flow from the readers to the engine.

An :class:`EditRecord` is one validated MMEdit record (DESIGN §5) with image paths resolved
against their roots; an :class:`EditTuple` is what the stream yields for one edit: the five
prompts the engine evaluates (edit, text rephrase, image rephrase, text locality, multimodal
locality), each as a :class:`Query` of prompt text, target text and an optional image.

Held-out variants (DESIGN §3, "seen vs held-out"): a record may carry a :class:`HeldOutRecord`
read from a companion file — another text rephrase, image rephrase, text-locality and
multimodal-locality sample that no loss ever trains on — and its tuple then carries them as
:class:`HeldOutQueries`. Without a companion both are ``None``.

``predict`` reads a file of questions instead: each is a :class:`QueryRecord`, answered as a
:class:`PredictItem` (the record and its :class:`Query` with the image loaded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

#: The 11 keys of an MMEdit (E-VQA / E-IC) record, in the order the real files use.
MMEDIT_KEYS: tuple[str, ...] = (
    "src",
    "pred",
    "rephrase",
    "alt",
    "image",
    "image_rephrase",
    "loc",
    "loc_ans",
    "m_loc",
    "m_loc_q",
    "m_loc_a",
)
#: The 7 keys of a held-out companion record (``<stem>.heldout.json``), one object per main record.
HELDOUT_KEYS: tuple[str, ...] = ("rephrase", "image_rephrase", "loc", "loc_ans", "m_loc", "m_loc_q", "m_loc_a")


@dataclass(frozen=True)
class HeldOutRecord:
    """One validated held-out companion record; image fields are absolute paths inside their roots.

    ``image_rephrase`` lies under the main file's rephrase root and ``m_loc`` under its ``m_loc`` root.
    """

    rephrase: str
    image_rephrase: Path
    loc: str
    loc_ans: str
    m_loc: Path
    m_loc_q: str
    m_loc_a: str


@dataclass(frozen=True)
class EditRecord:
    """One validated MMEdit record; image fields are absolute paths inside their roots."""

    src: str
    pred: str
    rephrase: str
    alt: str
    image: Path
    image_rephrase: Path
    loc: str
    loc_ans: str
    m_loc: Path
    m_loc_q: str
    m_loc_a: str
    source: str = ""  # "file.json#index" — where the record came from, for error messages
    index: int = -1
    held_out: HeldOutRecord | None = None  # variants no loss uses; None without a companion file
    sha256: str = ""  # of the record as it stands in the file (see schema.record_sha256): journals name it
    skip_locality: tuple[str, ...] = ()  # "t_loc" / "m_loc" left unscored (empty answer, opt-in), else ()


@dataclass(frozen=True)
class Query:
    """A prompt, the answer that should follow it, and the image it is about (None: text only)."""

    prompt: str
    target: str
    image: Image.Image | None = None


@dataclass(frozen=True)
class HeldOutQueries:
    """The held-out probes of one edit: scored like their seen namesakes, never part of any loss."""

    t_gen: Query
    m_gen: Query
    t_loc: Query
    m_loc: Query

    def queries(self) -> dict[str, Query]:
        return {"t_gen": self.t_gen, "m_gen": self.m_gen, "t_loc": self.t_loc, "m_loc": self.m_loc}


@dataclass(frozen=True)
class EditTuple:
    """Everything one edit request needs: the edit, its four (seen) evaluation probes and optional held-out ones."""

    index: int  # position in the stream, 0-based
    edit: Query
    t_gen: Query
    m_gen: Query
    t_loc: Query
    m_loc: Query
    source: str = ""
    held_out: HeldOutQueries | None = None
    record: int = -1  # index of the record in its data file
    record_sha256: str = ""  # hash of that record as it stands in the file
    #: replaying a journal: the editor-state hash the journal recorded after this edit (None: not checked)
    expected_state_sha256: str | None = None
    skip_locality: tuple[str, ...] = ()  # locality samples without an answer (opt-in skip): not in loss or scores

    def queries(self) -> dict[str, Query]:
        """The seen queries the edit loss trains on: all five, less any skipped locality sample."""
        queries = {
            "edit": self.edit,
            "t_gen": self.t_gen,
            "m_gen": self.m_gen,
            "t_loc": self.t_loc,
            "m_loc": self.m_loc,
        }
        return {k: q for k, q in queries.items() if k not in self.skip_locality}

    def held_out_queries(self) -> dict[str, Query]:
        """The held-out ``t_gen`` / ``m_gen`` / ``t_loc`` / ``m_loc`` queries; empty without a companion."""
        return self.held_out.queries() if self.held_out is not None else {}


@dataclass(frozen=True)
class QueryRecord:
    """One validated query of a predict file: a question and the image it is about (``None``: text only)."""

    index: int  # position among the file's queries, 0-based
    prompt: str
    image: str | None  # the ``image`` field as the file gives it
    image_path: Path | None  # that image, resolved against the image root
    source: str = ""  # "queries.jsonl line 3", for error messages


@dataclass(frozen=True)
class PredictItem:
    """What ``predict`` answers per step: the record and its query with the image loaded (target unused)."""

    record: QueryRecord
    query: Query
