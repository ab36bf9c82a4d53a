"""Predict files (more_lightning.data.queries): valid lines become queries; a bad line names file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from more_lightning.data.queries import QueryStream, read_queries
from more_lightning.data.schema import DataFileError, RecordError


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.new("L", (8, 8), 128).save(folder / "sub" / "a.png")  # grayscale: loaded as RGB
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def _write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "queries.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_queries_with_and_without_images(tmp_path, root):
    absolute = str(root / "sub" / "a.png")
    path = _write(
        tmp_path,
        json.dumps({"question": "  what colour\nis it? ", "image": "sub/a.png"}),
        "",
        json.dumps({"prompt": "where does megor live?"}),
        json.dumps({"question": "and here?", "image": absolute, "note": "extra keys are ignored"}),
        json.dumps({"question": "no image", "image": None}),
    )
    records = read_queries(path, root)
    assert [(r.index, r.prompt, r.image) for r in records] == [
        (0, "what colour is it?", "sub/a.png"),
        (1, "where does megor live?", None),
        (2, "and here?", absolute),
        (3, "no image", None),
    ]
    assert records[0].source == f"{path} line 1" and records[1].source == f"{path} line 3"
    items = QueryStream(records)
    assert len(items) == 4 and items[0].query.image.mode == "RGB" and items[1].query.image is None
    assert [item.record.index for item in items] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("line", "where"),
    [
        ("{not json", "line 2 (whole record): not valid JSON"),
        ('["a list"]', "line 2 (whole record): a JSON array, not an object"),
        ('{"image": "sub/a.png"}', "line 2, field 'question': missing"),
        ('{"question": "a", "prompt": "b"}', "line 2, field 'prompt': both"),
        ('{"question": "  "}', "line 2, field 'question': must be a non-empty string"),
        ('{"question": 3}', "line 2, field 'question': must be a non-empty string, got a JSON number"),
        ('{"question": "a", "image": 7}', "line 2, field 'image': must be a path string or null"),
        ('{"question": "a", "image": "sub/missing.png"}', "line 2, field 'image': image file not found"),
        ('{"question": "a", "image": "broken.png"}', "line 2, field 'image': unreadable image"),
    ],
)
def test_a_bad_line_names_file_line_and_field(tmp_path, root, line, where):
    path = _write(tmp_path, '{"question": "fine"}', line)
    with pytest.raises(RecordError) as error:
        read_queries(path, root)
    assert f"{path} {where}" in str(error.value)


def test_a_missing_or_empty_file_is_an_error(tmp_path, root):
    with pytest.raises(DataFileError, match=r"queries file .* not found — set data.init_args.predict_file"):
        read_queries(tmp_path / "nothing.jsonl", root)
    with pytest.raises(DataFileError, match="no queries"):
        read_queries(_write(tmp_path, "", "  "), root)
