"""Fidelity figures of an MMEdit-schema file, to set a generated benchmark beside the real E-VQA / E-IC.

``python -m more_lightning.world.stats data/embedded/vqa_eval.json data/embedded/caption_eval_edit.json``

Per draw of ``per`` records (without replacement; mean over ``draws`` seeded draws):

- ``distinct_questions_per_100`` — distinct ``src`` strings in the draw;
- ``textual_twins_per_100`` — records of the draw that have a *textual twin* in the same draw: another record
  with the same ``src`` and the same ``pred`` but a different ``alt`` (same text, different edit; only the
  image tells them apart).

Over the whole file: ``distinct_targets`` distinct ``alt`` strings of ``num_records``, and the number of
whitespace-separated words of ``alt`` (``words_per_target`` mean, ``target_words_min`` / ``target_words_max``).
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from more_lightning.data.schema import DataFileError, read_mmedit

log = logging.getLogger(__name__)

#: The published statistics of the public MMEdit files (the E-VQA and E-IC test splits, 2,093 and 1,000 records):
#: per 100 randomly drawn edits, mean over 20 draws, as :func:`fidelity` computes them. Set beside ours by
#: :func:`format_table`; min / max target words were not published.
REAL_FIGURES: dict[str, dict[str, float | int | str]] = {
    "E-VQA": {
        "distinct_questions_per_100": 99.5,
        "textual_twins_per_100": 0.2,
        "distinct_targets": "1,051 of 2,093",
        "words_per_target": 1.3,
    },
    "E-IC": {
        "distinct_questions_per_100": 1.0,
        "textual_twins_per_100": 1.2,
        "distinct_targets": "1,000 of 1,000",
        "words_per_target": 10.3,
    },
}
#: Table rows: figure key and its label.
_ROWS: tuple[tuple[str, str], ...] = (
    ("distinct_questions_per_100", "distinct questions per 100"),
    ("textual_twins_per_100", "textual twins per 100"),
    ("distinct_targets", "distinct targets"),
    ("words_per_target", "words per target"),
    ("target_words_min", "target words min"),
    ("target_words_max", "target words max"),
    ("draw_size", "records per draw"),
)


def count_twins(draw: Sequence[dict]) -> int:
    """Records of ``draw`` that share ``src`` and ``pred`` with at least one other record of ``draw`` whose
    ``alt`` differs. A record counts once however many twins it has; exact copies (same ``alt``) are not twins.
    """
    groups: dict[tuple[str, str], Counter[str]] = {}
    for record in draw:
        groups.setdefault((record["src"], record["pred"]), Counter())[record["alt"]] += 1
    # In a (src, pred) group of n records, a record with an alt held by k of them has a twin iff k < n.
    return sum(k for alts in groups.values() for k in alts.values() if k < alts.total())


def fidelity(records: list[dict], draws: int = 20, per: int = 100, seed: int = 0) -> dict[str, float | int]:
    """The fidelity figures of one MMEdit file (see the module docstring for each definition).

    Each of the ``draws`` draws takes ``min(per, len(records))`` records without replacement, from
    ``random.Random(seed)``, so the result is a pure function of the arguments. A file with fewer than ``per``
    records is drawn whole every time: its "per 100" figures are then counts over all its records
    (``draw_size`` says how many records a draw held).

    Args:
        records: MMEdit records as dicts (or any mapping with ``src``, ``pred`` and ``alt`` strings).
        draws: number of random draws to average over.
        per: records per draw (100 for the published figures).
        seed: seed of the draws.

    Returns:
        ``distinct_questions_per_100`` and ``textual_twins_per_100`` (floats, means over draws),
        ``distinct_targets`` and ``num_records`` (ints), ``words_per_target`` (float), ``target_words_min``,
        ``target_words_max`` and ``draw_size`` (ints).

    Raises:
        ValueError: ``records`` is empty, or ``draws`` / ``per`` is below 1.
    """
    if not records:
        raise ValueError("no records: fidelity figures need at least one record")
    if draws < 1 or per < 1:
        raise ValueError(f"draws and per must be >= 1, got draws={draws}, per={per}")
    rng = random.Random(seed)
    size = min(per, len(records))
    distinct, twins = [], []
    for _ in range(draws):
        draw = [records[i] for i in rng.sample(range(len(records)), size)]
        distinct.append(len({r["src"] for r in draw}))
        twins.append(count_twins(draw))
    words = [len(r["alt"].split()) for r in records]
    return {
        "distinct_questions_per_100": statistics.fmean(distinct),
        "textual_twins_per_100": statistics.fmean(twins),
        "distinct_targets": len({r["alt"] for r in records}),
        "num_records": len(records),
        "words_per_target": statistics.fmean(words),
        "target_words_min": min(words),
        "target_words_max": max(words),
        "draw_size": size,
    }


def _cell(figures: dict, key: str) -> str:
    if key not in figures:
        return "—"
    value = figures[key]
    if key == "distinct_targets" and "num_records" in figures:
        return f"{value:,} of {figures['num_records']:,}"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def format_table(rows: dict[str, dict]) -> str:
    """A markdown table: one column per file (``rows`` maps its name to :func:`fidelity`'s result), then the
    published E-VQA and E-IC figures of :data:`REAL_FIGURES`. Figures a column lacks show as ``—``.
    """
    columns = {**rows, **{f"{name} (real)": {**figures, "draw_size": 100} for name, figures in REAL_FIGURES.items()}}
    lines = [
        "| figure | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for key, label in _ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(figures, key) for figures in columns.values()) + " |")
    return "\n".join(lines)


def _read_texts(path: Path) -> list[dict]:
    """The text fields of every record, validated by :func:`read_mmedit` and kept exactly as written.

    Images are not opened; the filesystem root is given as every image root, so any relative path resolves.
    """
    root = Path(path.absolute().anchor)
    records = read_mmedit(path, root, root, check_images=False, strip=False)
    if not records:
        raise DataFileError(f"{path}: the file holds no records — fidelity figures need at least one")
    return [{"src": r.src, "pred": r.pred, "alt": r.alt} for r in records]


def main(argv: list[str] | None = None) -> int:
    """Log the fidelity table of the given files; 2 (with one message naming the file) if one is unusable."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="MMEdit files (.json list or .jsonl)")
    parser.add_argument("--draws", type=int, default=20, help="random draws to average over")
    parser.add_argument("--per", type=int, default=100, help="records per draw")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.draws < 1 or args.per < 1:
        parser.error("--draws and --per must be at least 1")
    names = [path.name for path in args.files]
    if len(set(names)) < len(names):  # same file name in two folders: tell the columns apart by the full path
        names = [str(path) for path in args.files]
    rows = {}
    for name, path in zip(names, args.files, strict=True):
        try:
            rows[name] = fidelity(_read_texts(path), args.draws, args.per, args.seed)
        except DataFileError as exc:  # RecordError is a DataFileError too; every message names the file
            log.error("error: %s", exc)
            return 2
    log.info("%s", format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
