"""Plain records that flow from the readers to the engine.

An :class:`EditRecord` is one validated MMEdit record (DESIGN §5) with image paths resolved
against their roots; an :class:`EditTuple` is what the stream yields for one edit: the five
prompts the engine evaluates (edit, text rephrase, image rephrase, text locality, multimodal
locality), each as a :class:`Query` of prompt text, target text and an optional image.
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


@dataclass(frozen=True)
class Query:
    """A prompt, the answer that should follow it, and the image it is about (None: text only)."""

    prompt: str
    target: str
    image: Image.Image | None = None


@dataclass(frozen=True)
class EditTuple:
    """Everything one edit request needs: the edit and its four evaluation probes."""

    index: int  # position in the stream, 0-based
    edit: Query
    t_gen: Query
    m_gen: Query
    t_loc: Query
    m_loc: Query
    source: str = ""

    def queries(self) -> dict[str, Query]:
        return {"edit": self.edit, "t_gen": self.t_gen, "m_gen": self.m_gen, "t_loc": self.t_loc, "m_loc": self.m_loc}
