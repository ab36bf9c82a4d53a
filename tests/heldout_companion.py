"""A held-out companion (``vqa_eval.heldout.json``) for the MMEdit fixture, written into a copy of the fixture folder.

The contract (more_lightning.data.schema, DESIGN §3): one object per record of the main file, same order, 7 string
keys. The variants here differ from the record's own ones in text and image, so seen and held-out scores differ:
``image_rephrase`` names another record's rephrase image and ``m_loc`` another COCO image than the seen ``m_loc``.
Words come from the tiny tokenizer's vocabulary (tests/conftest.py FIXTURE_WORDS), so few tokens are unknown.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mmedit"

#: One held-out record per record of tests/fixtures/mmedit/vqa_eval.json (4 records), in its order.
VQA_EVAL_HELDOUT = [
    {
        "rephrase": "what colour is this bus",
        "image_rephrase": "val2014_image_rephrase/000000000002_rephrase.png",
        "loc": "nq question: who is pictured on the stamp",
        "loc_ans": "Einstein",
        "m_loc": "val2014/COCO_val2014_000000000006.jpg",
        "m_loc_q": "what sport is being played",
        "m_loc_a": "soccer",
    },
    {
        "rephrase": "  who is on this stamp\n",  # surrounding whitespace: stripped like the main file's
        "image_rephrase": "val2014_image_rephrase/000000000003_rephrase.png",
        "loc": "nq question: who wrote\nthe novel",  # embedded newline: folded to a space
        "loc_ans": "Herman Melville",
        "m_loc": "val2014/COCO_val2014_000000000005.jpg",
        "m_loc_q": "what animal is this",
        "m_loc_a": "a dog",
    },
    {
        "rephrase": "how many dogs are there",
        "image_rephrase": "val2014_image_rephrase/000000000004_rephrase.png",
        "loc": "nq question: who wrote moby dick",
        "loc_ans": "Herman Melville",
        "m_loc": "val2014/COCO_val2014_000000000002.jpg",
        "m_loc_q": "who is riding the horse",
        "m_loc_a": "a woman",
    },
    {
        "rephrase": "is it raining in this photo",
        "image_rephrase": "val2014_image_rephrase/000000000006_rephrase.png",
        "loc": "nq question: which sport is tennis",
        "loc_ans": "a sport",
        "m_loc": "val2014/COCO_val2014_000000000004.jpg",
        "m_loc_q": "how many people are standing",
        "m_loc_a": "three",
    },
]


def copy_fixtures(tmp_path: Path) -> Path:
    """A private copy of tests/fixtures/mmedit (no companion in it)."""
    return Path(shutil.copytree(FIXTURES, tmp_path / "mmedit"))


def write_companion(path: Path, records: list | None = None) -> Path:
    """Write ``records`` (default :data:`VQA_EVAL_HELDOUT`) as a JSON list at ``path``."""
    records = VQA_EVAL_HELDOUT if records is None else records
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path
