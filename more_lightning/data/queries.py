"""Questions for ``predict``: a JSONL file, one query per line, validated before the first answer.

Each line is a JSON object with the question as ``"question"`` (or ``"prompt"``) and, optionally, an
``"image"``: a path relative to the image root or absolute; without one (absent, ``null`` or ``""``) the
query is text only. Blank lines are skipped. For example::

    {"question": "what colour is the circle?", "image": "vqa_eval/00000.png"}
    {"question": "what work does leni do?"}

Every image is opened and fully decoded up front, so a bad line is one error naming the file, the line
and the field.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.data import Dataset

from more_lightning.data.records import PredictItem, Query, QueryRecord
from more_lightning.data.schema import DataFileError, RecordError, load_image

TEXT_FIELDS = ("question", "prompt")
EXAMPLE = '{"question": "what colour is the circle?", "image": "path/relative/to/image_root.png"}'


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _prompt(raw: dict, where: str) -> str:
    given = [k for k in TEXT_FIELDS if k in raw]
    if not given:
        raise RecordError(where, "question", "missing", 'give the query text as "question" (or "prompt")')
    if len(given) > 1:
        raise RecordError(where, "prompt", 'both "question" and "prompt" are given', "keep one of them")
    text = raw[given[0]]
    if not isinstance(text, str) or not text.strip():
        got = repr(text) if isinstance(text, str) else f"a JSON {_json_type(text)}"
        raise RecordError(where, given[0], f"must be a non-empty string, got {got}", "write the question as text")
    return " ".join(text.split())


def _image_path(raw: dict, where: str, image_root: Path) -> Path | None:
    image = raw.get("image")
    if image is None or image == "":
        return None
    if not isinstance(image, str):
        raise RecordError(
            where, "image", f"must be a path string or null, got a JSON {_json_type(image)}", "give a path"
        )
    path = Path(image) if Path(image).is_absolute() else image_root / image
    if not path.is_file():
        raise RecordError(
            where,
            "image",
            f"image file not found: {path}",
            f"give a path relative to the image root {image_root} (data.init_args.image_root) or an absolute one",
        )
    try:
        load_image(path)
    except DataFileError as exc:
        raise RecordError(where, "image", f"unreadable image {path}", "replace it with a valid JPEG/PNG") from exc
    return path


def read_queries(path: str | Path, image_root: str | Path) -> list[QueryRecord]:
    """Validated queries of the JSONL file ``path``; relative image paths are joined to ``image_root``.

    Raises:
        DataFileError: the file is missing or holds no query; :class:`RecordError` naming the line and field
            for a line that is not a JSON object, lacks its question or names an image that cannot be read.
    """
    path, image_root = Path(path), Path(image_root)
    if not path.is_file():
        raise DataFileError(
            f"queries file {str(path)!r} not found — set data.init_args.predict_file to a JSONL file, "
            f"one query a line: {EXAMPLE}"
        )
    records: list[QueryRecord] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecordError(
                where, None, f"not valid JSON ({exc.msg}, column {exc.colno})", f"write {EXAMPLE}"
            ) from exc
        if not isinstance(raw, dict):
            raise RecordError(where, None, f"a JSON {_json_type(raw)}, not an object", f"write {EXAMPLE}")
        prompt = _prompt(raw, where)
        image_path = _image_path(raw, where, image_root)
        image = raw.get("image") if image_path is not None else None
        records.append(QueryRecord(len(records), prompt, image, image_path, where))
    if not records:
        raise DataFileError(f"{path}: no queries in the file — write one JSON object a line: {EXAMPLE}")
    return records


class QueryStream(Dataset):
    """The queries as ``predict`` iterates them, one :class:`PredictItem` per step (images loaded on access)."""

    def __init__(self, records: list[QueryRecord]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> PredictItem:
        r = self.records[index]
        image = None
        if r.image_path is not None:
            try:
                image = load_image(r.image_path)
            except DataFileError as exc:
                raise DataFileError(f"{r.source}, field 'image': {exc}") from exc
        return PredictItem(r, Query(r.prompt, "", image))

    def __iter__(self):
        return (self[i] for i in range(len(self)))
