"""Read, validate and write MMEdit (E-VQA / E-IC) files — the schema of DESIGN §5.

A file is a JSON list (or a ``.jsonl`` file, one object a line) of flat records with the 11 string keys of
:data:`~more_lightning.data.records.MMEDIT_KEYS`. Image fields are paths relative to a root given separately:
``image`` and ``m_loc`` to the COCO root (``val2014/COCO_val2014_000000123.jpg``), ``image_rephrase`` to the
rephrase root (``val2014_image_rephrase/xxx.png``).

:func:`read_mmedit` validates every record before it returns, so a bad record fails at load time with a
:class:`RecordError` naming the file, the record index and the field, never halfway through a stream.
Real-data dirt is accepted: surrounding whitespace and embedded newlines (stripped / folded to a space by
default), non-ASCII text, ``alt == pred`` (kept, with one warning per file) and grayscale JPEGs
(:func:`load_image` converts to RGB).

:func:`write_mmedit` is the writer the embedded benchmark generator uses; it runs the same
:func:`validate_record` and replaces the target file atomically.

Held-out companion (DESIGN §3, "seen vs held-out"): beside ``<dir>/<stem>.json`` there may be
``<dir>/<stem>.heldout.json`` (:func:`heldout_path`), a JSON list with exactly one object per record of the main
file, in the same order, each with the 7 string keys of :data:`~more_lightning.data.records.HELDOUT_KEYS`:
another text rephrase, another image rephrase (relative to the main file's rephrase root), another text-locality
question/answer, and another multimodal-locality image (relative to the main file's ``m_loc`` root), question and
answer. :func:`read_heldout` validates it exactly like the main file (same errors: file, record index, field);
``read_mmedit(..., heldout_file=...)`` attaches it to the records. Real MMEdit files have no companion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from more_lightning.data.records import HELDOUT_KEYS, MMEDIT_KEYS, EditRecord, HeldOutRecord

logger = logging.getLogger(__name__)

#: Fields holding a path relative to an image root; the rest are text.
IMAGE_FIELDS: tuple[str, ...] = ("image", "image_rephrase", "m_loc")
#: Text fields that must be non-empty: without them there is no edit to make.
REQUIRED_TEXT_FIELDS: tuple[str, ...] = ("src", "alt")
#: Locality fields that must not be empty: an empty answer would be scored on a lone " " token (T-Loc 100).
REQUIRED_LOCALITY_FIELDS: tuple[str, ...] = ("loc_ans", "m_loc_q", "m_loc_a")
#: Image fields of a held-out companion record (relative to the main file's rephrase / ``m_loc`` roots).
HELDOUT_IMAGE_FIELDS: tuple[str, ...] = ("image_rephrase", "m_loc")
#: What replaces ``.json`` / ``.jsonl`` in a main file's name to name its held-out companion.
HELDOUT_SUFFIX = ".heldout.json"
#: How many record indices a once-per-file warning lists.
_WARN_MAX_INDICES = 5
# A run of whitespace that holds a line break: folded to one space when stripping.
_NEWLINE_RUN = re.compile(r"\s*[\r\n]+\s*")
_JSON_TYPE_NAMES = {
    bool: "boolean",
    int: "number",
    float: "number",
    type(None): "null",
    list: "array",
    dict: "object",
    str: "string",
}


class DataFileError(ValueError):
    """A data file (or an image it names) cannot be used; the message names the file and says how to fix it."""


class RecordError(DataFileError):
    """One record of an MMEdit file is unusable.

    The message always names the file, the record index and the field, e.g.
    ``vqa_eval.json record 17, field 'alt': empty target — every record needs a non-empty 'alt'``.

    Args:
        where: the file name and record index, e.g. ``"vqa_eval.json record 17"``.
        field: the offending key; ``None`` when the record as a whole is wrong (not a JSON object).
        problem: what is wrong.
        fix: how to fix it.
    """

    def __init__(self, where: str, field: str | None, problem: str, fix: str) -> None:
        self.where = where
        self.field = field
        location = f"{where}, field {field!r}" if field is not None else f"{where} (whole record)"
        super().__init__(f"{location}: {problem} — {fix}")


def _json_type(value: Any) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def validate_record(raw: dict, where: str, empty_locality: str = "error") -> None:
    """Check one raw MMEdit record without touching the file system.

    Checks: ``raw`` is a dict; all 11 keys are present and hold strings; ``src``, ``alt``, ``loc_ans``,
    ``m_loc_q`` and ``m_loc_a`` are non-empty after stripping; image fields are non-empty relative paths.
    Whether an image path stays inside its root and decodes is checked by :func:`read_mmedit`, which knows
    the roots.

    Args:
        raw: the record as parsed from JSON.
        where: file name and record index for the error message, e.g. ``"vqa_eval.json record 17"``.
        empty_locality: ``"error"``, or ``"skip"`` to accept empty ``loc_ans`` / ``m_loc_q`` / ``m_loc_a``
            (see :func:`skipped_locality`).

    Raises:
        RecordError: naming ``where`` and the first offending field.
    """
    if empty_locality not in ("error", "skip"):
        raise ValueError(f"empty_locality must be 'error' or 'skip', got {empty_locality!r}")
    _check_string_fields(raw, where, MMEDIT_KEYS, "the 11 MMEdit keys")
    for key in REQUIRED_TEXT_FIELDS:
        if not raw[key].strip():
            what = "empty target" if key == "alt" else "empty prompt"
            raise RecordError(where, key, what, f"every record needs a non-empty {key!r}")
    if empty_locality == "error":
        _check_locality_text(raw, where)
    for key in IMAGE_FIELDS:
        _check_relative(raw[key].strip(), where, key)


def skipped_locality(raw: dict) -> tuple[str, ...]:
    """The locality samples of a record that cannot be scored: ``t_loc`` without ``loc_ans``, ``m_loc``
    without ``m_loc_q`` or ``m_loc_a`` (the opt-in ``empty_locality="skip"`` leaves them out of the loss and
    of the scores instead of refusing the record)."""
    skipped = ("t_loc",) if not raw["loc_ans"].strip() else ()
    return skipped + (("m_loc",) if not (raw["m_loc_q"].strip() and raw["m_loc_a"].strip()) else ())


def _check_locality_text(raw: dict, where: str) -> None:
    for key in REQUIRED_LOCALITY_FIELDS:
        if not raw[key].strip():
            raise RecordError(
                where,
                key,
                "empty locality " + ("question" if key == "m_loc_q" else "answer"),
                f"locality would be scored on nothing; fill {key!r} or remove the record",
            )


def validate_heldout_record(raw: dict, where: str) -> None:
    """Check one raw held-out companion record (the 7 :data:`HELDOUT_KEYS`) without touching the file system.

    Same checks as :func:`validate_record`: a dict, every key present and a string, non-empty locality
    answers and question, image fields non-empty relative paths.

    Raises:
        RecordError: naming ``where`` and the first offending field.
    """
    _check_string_fields(raw, where, HELDOUT_KEYS, "the 7 held-out keys")
    _check_locality_text(raw, where)
    for key in HELDOUT_IMAGE_FIELDS:
        _check_relative(raw[key].strip(), where, key)


def _check_string_fields(raw: dict, where: str, keys: tuple[str, ...], what: str) -> None:
    """``raw`` is a dict holding every one of ``keys`` as a string (``what`` names the key set in the fix)."""
    if not isinstance(raw, dict):
        raise RecordError(
            where, None, f"expected a JSON object, found {_json_type(raw)}", "each list item must be an object"
        )
    missing = [key for key in keys if key not in raw]
    if missing:
        raise RecordError(
            where,
            missing[0],
            f"missing key (missing: {', '.join(missing)}; present: {', '.join(map(str, raw)) or 'none'})",
            f"every record needs {what}: {', '.join(keys)}",
        )
    for key in keys:
        value = raw[key]
        if not isinstance(value, str):
            raise RecordError(
                where,
                key,
                f"expected a string, found {_json_type(value)} ({value!r:.60})",
                "write the value as a JSON string (quoted)",
            )


def _check_relative(rel: str, where: str, field: str) -> None:
    if not rel:
        raise RecordError(where, field, "empty image path", "give the image path relative to its root")
    if Path(rel).is_absolute() or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[\\/]", rel):
        raise RecordError(
            where,
            field,
            f"absolute image path {rel!r}",
            "give the path relative to its root (e.g. 'val2014/COCO_val2014_000000123.jpg') and set the root",
        )


def resolve_inside(rel: str, root: Path, where: str, field: str) -> Path:
    """Join ``rel`` to ``root`` and refuse a result outside ``root`` (a ``../`` escape).

    The containment check is lexical (``os.path.normpath`` on absolute paths), not ``Path.resolve``: dataset
    folders are often symlinks to other disks (``coco/val2014 -> /mnt/coco/val2014``), and following them
    would wrongly report a legitimate path as escaping its root.
    """
    _check_relative(rel, where, field)
    base = Path(os.path.normpath(root.absolute()))
    path = Path(os.path.normpath(base / rel))
    if not path.is_relative_to(base):
        raise RecordError(
            where,
            field,
            f"image path {rel!r} leaves its root {base}",
            "remove '..' so the path stays inside the root, or point the root at a folder that contains it",
        )
    return path


def _clean(value: str, strip: bool) -> str:
    return _NEWLINE_RUN.sub(" ", value.strip()) if strip else value


def record_sha256(raw: dict) -> str:
    """SHA-256 of one raw record as it stands in the file (keys sorted, UTF-8 JSON, values unstripped).

    Journals name every applied edit by it, so a replay can tell that the file still holds the same record.
    """
    text = json.dumps(raw, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_image(path: Path) -> Image.Image:
    """Open an image and return it as RGB (COCO holds grayscale and CMYK JPEGs).

    Raises:
        DataFileError: naming ``path`` when the file is missing or not an image PIL can read.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError as exc:
        raise DataFileError(f"{path}: image file not found — check the image root setting") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # PIL raises all three for corrupt files
        raise DataFileError(f"{path}: cannot read image ({exc}) — replace the file with a valid JPEG/PNG") from exc


def _check_image(path: Path, where: str, field: str, seen: set[Path]) -> None:
    if path in seen:
        return
    if not path.is_file():
        raise RecordError(where, field, f"image file not found: {path}", "check the image root setting")
    try:  # a full decode: verify() alone passes truncated JPEGs, which then fail mid-stream
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise RecordError(
            where, field, f"unreadable image {path} ({exc})", "replace the file with a valid JPEG/PNG"
        ) from exc
    seen.add(path)


def _parse_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFileError(
            f"{path}: malformed JSON at line {exc.lineno} column {exc.colno} (char {exc.pos}): {exc.msg} — "
            "fix the file there or re-download it"
        ) from exc


def _load_raw(path: Path) -> list[Any]:
    """The file's records as parsed JSON values, before any validation."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise DataFileError(f"{path}: file not found — check the data path setting") from exc
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{path}: not UTF-8 text ({exc}) — save the file as UTF-8") from exc
    if path.suffix.lower() == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataFileError(
                        f"{path}: malformed JSON on line {lineno} column {exc.colno}: {exc.msg} — "
                        "each line of a .jsonl file must be one complete JSON object"
                    ) from exc
        return records
    data = _parse_json(path, text)
    if not isinstance(data, list):
        raise DataFileError(
            f"{path}: top level is a JSON {_json_type(data)}, expected a list of records — "
            "an MMEdit file is a JSON list of objects (use a .jsonl extension for one object per line)"
        )
    return data


def _warn_indices(path: Path, indices: list[int], what: str) -> None:
    if indices:
        shown = ", ".join(map(str, indices[:_WARN_MAX_INDICES])) + (", ..." if len(indices) > _WARN_MAX_INDICES else "")
        logger.warning("%s: %d record(s) %s (indices %s); they are kept", path.name, len(indices), what, shown)


def _fields(
    raw: dict,
    where: str,
    keys: tuple[str, ...],
    image_fields: tuple[str, ...],
    roots: dict[str, Path],
    strip: bool,
    check_images: bool,
    checked: set[Path],
) -> tuple[dict[str, str], dict[str, Path]]:
    """A validated record's cleaned text values and its image paths resolved inside their roots (and opened)."""
    values = {key: _clean(raw[key], strip) for key in keys}
    images = {key: resolve_inside(raw[key].strip(), roots[key], where, key) for key in image_fields}
    if check_images:
        for key, image in images.items():
            _check_image(image, where, key, checked)
    return values, images


def _note_empty_text(
    values: dict[str, str],
    keys: tuple[str, ...],
    image_fields: tuple[str, ...],
    index: int,
    empty: dict[str, list[int]],
) -> None:
    for key in keys:
        if key not in image_fields and not values[key].strip():
            empty.setdefault(key, []).append(index)


def read_mmedit(
    path: str | Path,
    image_root: str | Path,
    rephrase_root: str | Path,
    m_loc_root: str | Path | None = None,
    strip: bool = True,
    check_images: bool = True,
    limit: int | None = None,
    heldout_file: str | Path | None = None,
    empty_locality: str = "error",
) -> list[EditRecord]:
    """Read and fully validate an MMEdit file (``.json`` list or ``.jsonl``), and its held-out companion if given.

    Args:
        path: the file, e.g. ``data/mmedit/vqa_eval.json``.
        image_root: COCO root that ``image`` is relative to (holds ``val2014/``).
        rephrase_root: root that ``image_rephrase`` is relative to (holds ``val2014_image_rephrase/``).
        m_loc_root: root that ``m_loc`` is relative to; default ``image_root``.
        strip: strip surrounding whitespace and fold embedded line breaks to one space in every value.
        check_images: check that every image exists and decodes fully (a truncated file is an error here,
            before any edit, not mid-stream).
        limit: read only the first ``limit`` records (and validate only those).
        heldout_file: a held-out companion (see :func:`read_heldout`; usually :func:`heldout_path` of ``path``)
            to validate and attach as each record's ``held_out``; ``None``: no held-out variants.
        empty_locality: ``"error"`` (default): an empty ``loc_ans``, ``m_loc_q`` or ``m_loc_a`` is a RecordError;
            ``"skip"``: the record is kept and its unscorable locality sample listed in ``skip_locality``.

    Returns:
        One :class:`EditRecord` per record, in file order, with absolute image paths inside their roots.

    Raises:
        DataFileError: the file (or the companion) is missing, not UTF-8, malformed JSON or not a list; the
            companion's length differs from the file's.
        RecordError: a record is unusable; names the file, record index and field.
    """
    path = Path(path)
    roots = {"image": Path(image_root), "image_rephrase": Path(rephrase_root)}
    roots["m_loc"] = Path(m_loc_root) if m_loc_root is not None else roots["image"]
    raw_records = _load_raw(path)
    num_records = len(raw_records)
    if limit is not None:
        raw_records = raw_records[: max(limit, 0)]
    records: list[EditRecord] = []
    same_answer: list[int] = []
    empty_text: dict[str, list[int]] = {}
    checked: set[Path] = set()
    for index, raw in enumerate(raw_records):
        where = f"{path.name} record {index}"
        validate_record(raw, where, empty_locality)
        values, images = _fields(raw, where, MMEDIT_KEYS, IMAGE_FIELDS, roots, strip, check_images, checked)
        skip = skipped_locality(raw) if empty_locality == "skip" else ()
        if values["alt"].strip() == values["pred"].strip():
            same_answer.append(index)
        _note_empty_text(values, MMEDIT_KEYS, IMAGE_FIELDS, index, empty_text)
        records.append(
            EditRecord(
                **{**values, **images},
                source=f"{path.name}#{index}",
                index=index,
                sha256=record_sha256(raw),
                skip_locality=skip,
            )
        )
    _warn_indices(path, same_answer, "have alt == pred, so their edit does not change the answer")
    _warn_empty_text(path, empty_text)
    logger.info("%s: read %d records", path, len(records))
    if heldout_file is not None:
        held_out = read_heldout(
            heldout_file, path, num_records, roots["image_rephrase"], roots["m_loc"], strip, check_images, limit
        )
        records = [replace(record, held_out=h) for record, h in zip(records, held_out, strict=True)]
    return records


def heldout_path(data_file: str | Path) -> Path:
    """Where the held-out companion of ``data_file`` lives: ``<dir>/<stem>.heldout.json``.

    Example:
        >>> heldout_path("data/embedded/vqa_eval.json").as_posix()
        'data/embedded/vqa_eval.heldout.json'
    """
    path = Path(data_file)
    return path.with_name(path.stem + HELDOUT_SUFFIX)


def read_heldout(
    path: str | Path,
    main_file: str | Path,
    num_records: int,
    rephrase_root: str | Path,
    m_loc_root: str | Path,
    strip: bool = True,
    check_images: bool = True,
    limit: int | None = None,
) -> list[HeldOutRecord]:
    """Read and fully validate a held-out companion file (``<stem>.heldout.json``) of an MMEdit file.

    The companion is a JSON list (or ``.jsonl``) with exactly one object per record of ``main_file``, in the same
    order, each holding the 7 string keys of :data:`HELDOUT_KEYS`. It is validated as strictly as the main file:
    every key present and a string, image paths relative and inside their root (``image_rephrase`` under
    ``rephrase_root``, ``m_loc`` under ``m_loc_root`` — the main file's roots), images readable if
    ``check_images``; values stripped like the main file's if ``strip``; empty locality answers or question
    are errors, another empty text value is kept with one warning per field.

    Args:
        path: the companion file.
        main_file: the MMEdit file it accompanies (named in the length-mismatch error).
        num_records: how many records ``main_file`` holds (all of them, before any ``limit``).
        rephrase_root: root of ``image_rephrase``.
        m_loc_root: root of ``m_loc``.
        strip: strip surrounding whitespace and fold embedded line breaks to one space in every value.
        check_images: check that every image exists and decodes fully.
        limit: return (and validate) only the first ``limit`` records.

    Returns:
        One :class:`HeldOutRecord` per record, in file order.

    Raises:
        DataFileError: the file is missing, not UTF-8, malformed JSON or not a list, or its length differs from
            ``num_records``.
        RecordError: a record is unusable; names the companion file, the record index and the field.
    """
    path, main_file = Path(path), Path(main_file)
    roots = {"image_rephrase": Path(rephrase_root), "m_loc": Path(m_loc_root)}
    raw_records = _load_raw(path)
    if len(raw_records) != num_records:
        raise DataFileError(
            f"{path}: held-out companion has {len(raw_records)} records but its main file {main_file.name} has "
            f"{num_records} — it needs exactly one object per main record, in the same order; regenerate it, or "
            "do not use it (heldout_file: none)"
        )
    if limit is not None:
        raw_records = raw_records[: max(limit, 0)]
    held_out: list[HeldOutRecord] = []
    empty_text: dict[str, list[int]] = {}
    checked: set[Path] = set()
    for index, raw in enumerate(raw_records):
        where = f"{path.name} record {index}"
        validate_heldout_record(raw, where)
        values, images = _fields(raw, where, HELDOUT_KEYS, HELDOUT_IMAGE_FIELDS, roots, strip, check_images, checked)
        _note_empty_text(values, HELDOUT_KEYS, HELDOUT_IMAGE_FIELDS, index, empty_text)
        held_out.append(HeldOutRecord(**{**values, **images}))
    _warn_empty_text(path, empty_text)
    logger.info("%s: read %d held-out records", path, len(held_out))
    return held_out


def _warn_empty_text(path: Path, empty_text: dict[str, list[int]]) -> None:
    for key, indices in empty_text.items():
        _warn_indices(path, indices, f"have an empty {key!r}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_mmedit(path: str | Path, records: Iterable[dict]) -> None:
    """Validate ``records`` and write them as one MMEdit JSON list, atomically.

    The list is written to a temporary file in the target's folder and moved over ``path`` with
    ``os.replace``, so a reader never sees half a file. UTF-8, non-ASCII kept as is, one-space indent.

    Raises:
        RecordError: a record fails :func:`validate_record`; nothing is written.
    """
    path = Path(path)
    records = list(records)
    for index, raw in enumerate(records):
        validate_record(raw, f"{path.name} record {index}")
    _write_json_atomic(path, records)


def write_heldout(path: str | Path, records: Iterable[dict]) -> None:
    """Validate held-out companion ``records`` (:func:`validate_heldout_record`) and write them atomically."""
    path = Path(path)
    records = list(records)
    for index, raw in enumerate(records):
        validate_heldout_record(raw, f"{path.name} record {index}")
    _write_json_atomic(path, records)


def _write_json_atomic(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(records, handle, ensure_ascii=False, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    logger.info("%s: wrote %d records", path, len(records))
