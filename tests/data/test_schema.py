"""MMEdit reader / writer (more_lightning.data.schema) against the fixtures from tests/fixtures/make_fixtures.py.

Broken variants are built in ``tmp_path`` from a copy of the good fixture folder, one defect each.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

from more_lightning.data.records import MMEDIT_KEYS, EditRecord
from more_lightning.data.schema import (
    DataFileError,
    RecordError,
    load_image,
    read_mmedit,
    validate_record,
    write_mmedit,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mmedit"
COUNTS = {"vqa_eval.json": 4, "caption_eval_edit.json": 3, "vqa_train.json": 2, "caption_train_edit.json": 2}


def _read(path: Path, root: Path = FIXTURES, **kwargs) -> list[EditRecord]:
    return read_mmedit(path, root / "coco", root / "rephrase", **kwargs)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A private copy of the mmedit fixture folder, free to break."""
    return Path(shutil.copytree(FIXTURES, tmp_path / "mmedit"))


def _broken(data: Path, index: int, **changes) -> Path:
    """vqa_eval.json with record ``index`` changed (a value of ``...`` deletes the key), written beside it."""
    records = json.loads((data / "vqa_eval.json").read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is ...:
            del records[index][key]
        else:
            records[index][key] = value
    path = data / "vqa_eval.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


# --- happy paths -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_reads_every_fixture_file(name: str) -> None:
    records = _read(FIXTURES / name)
    assert len(records) == COUNTS[name]
    for index, record in enumerate(records):
        assert record.index == index
        assert record.source == f"{name}#{index}"
        for path in (record.image, record.image_rephrase, record.m_loc):
            assert path.is_absolute() and path.is_file()
        assert record.image.is_relative_to((FIXTURES / "coco").absolute())
        assert record.image_rephrase.is_relative_to((FIXTURES / "rephrase").absolute())
        assert record.alt and record.src


def test_caption_records_have_prompt_and_multiword_targets() -> None:
    records = _read(FIXTURES / "caption_eval_edit.json")
    assert {r.src for r in records} == {"a photo of"}
    assert all(len(r.alt.split()) > 2 for r in records)


def test_non_ascii_kept_and_whitespace_stripped() -> None:
    records = _read(FIXTURES / "vqa_eval.json")
    assert records[1].alt == "Röntgen"
    assert records[1].loc == "nq question: where is the café de flore"
    assert records[2].alt == "two"
    assert records[2].src == "How many dogs are in the picture?"
    assert records[2].loc == "nq question: who sang hey jude"  # embedded newline folded to a space


def test_strip_false_keeps_values_verbatim() -> None:
    records = _read(FIXTURES / "vqa_eval.json", strip=False)
    assert records[2].alt == "two\n"
    assert records[2].loc == "nq question: who sang\nhey jude"


def test_alt_equal_pred_warns_once_and_loads(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="more_lightning.data.schema"):
        records = _read(FIXTURES / "vqa_eval.json")
    assert records[3].alt == records[3].pred == "yes"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "vqa_eval.json" in warnings[0] and "alt == pred" in warnings[0] and "indices 3" in warnings[0]


def test_limit_reads_first_records() -> None:
    records = _read(FIXTURES / "vqa_eval.json", limit=2)
    assert [r.index for r in records] == [0, 1]


def test_m_loc_root_defaults_to_image_root_and_can_be_set(data: Path) -> None:
    other = data / "okvqa"
    shutil.copytree(data / "coco", other)
    records = read_mmedit(data / "vqa_eval.json", data / "coco", data / "rephrase", m_loc_root=other)
    assert records[0].m_loc.is_relative_to(other.absolute())
    assert records[0].image.is_relative_to((data / "coco").absolute())


def test_grayscale_jpeg_loads_as_rgb() -> None:
    record = _read(FIXTURES / "vqa_eval.json")[3]
    with Image.open(record.image) as raw:
        assert raw.mode == "L"
    image = load_image(record.image)
    assert image.mode == "RGB" and image.size == (32, 32)


def test_jsonl(data: Path) -> None:
    records = json.loads((data / "vqa_eval.json").read_text(encoding="utf-8"))
    path = data / "vqa_eval.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join([*lines[:2], "", *lines[2:]]) + "\n", encoding="utf-8")
    loaded = _read(path, data)
    assert [r.alt for r in loaded] == [r.alt for r in _read(data / "vqa_eval.json", data)]
    assert loaded[3].source == "vqa_eval.jsonl#3"


def test_jsonl_malformed_line_names_line(data: Path) -> None:
    path = data / "bad.jsonl"
    first = (data / "vqa_eval.json").read_text(encoding="utf-8")
    path.write_text(json.dumps(json.loads(first)[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"bad\.jsonl: malformed JSON on line 2"):
        _read(path, data)


# --- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", MMEDIT_KEYS)
def test_missing_key_names_file_record_and_key(data: Path, key: str) -> None:
    path = _broken(data, 2, **{key: ...})
    with pytest.raises(RecordError, match=rf"vqa_eval\.json record 2, field '{key}': missing key") as info:
        _read(path, data)
    assert info.value.field == key


def test_wrong_type_names_type_found(data: Path) -> None:
    path = _broken(data, 1, alt=3)
    with pytest.raises(RecordError, match=r"vqa_eval\.json record 1, field 'alt': expected a string, found number"):
        _read(path, data)


def test_null_value_refused(data: Path) -> None:
    path = _broken(data, 0, loc_ans=None)
    with pytest.raises(RecordError, match=r"record 0, field 'loc_ans': expected a string, found null"):
        _read(path, data)


@pytest.mark.parametrize("value", ["", "  \n"])
def test_empty_alt_refused(data: Path, value: str) -> None:
    path = _broken(data, 3, alt=value)
    with pytest.raises(RecordError, match=r"vqa_eval\.json record 3, field 'alt': empty target — .*non-empty 'alt'"):
        _read(path, data)


def test_empty_src_refused(data: Path) -> None:
    with pytest.raises(RecordError, match=r"record 0, field 'src': empty prompt"):
        _read(_broken(data, 0, src=" "), data)


def test_non_dict_record_refused(data: Path) -> None:
    path = data / "vqa_eval.json"
    records = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps([records[0], ["not", "a", "record"]]), encoding="utf-8")
    with pytest.raises(RecordError, match=r"vqa_eval\.json record 1 \(whole record\): expected a JSON object, found"):
        _read(path, data)


def test_unreadable_image_names_field(data: Path) -> None:
    (data / "coco" / "val2014" / "garbage.jpg").write_bytes(b"this is not a JPEG" * 10)
    path = _broken(data, 2, m_loc="val2014/garbage.jpg")
    with pytest.raises(RecordError, match=r"vqa_eval\.json record 2, field 'm_loc': unreadable image .*garbage\.jpg"):
        _read(path, data)
    assert len(_read(path, data, check_images=False)) == 4  # the check can be turned off


def test_missing_image_names_field(data: Path) -> None:
    path = _broken(data, 0, image_rephrase="val2014_image_rephrase/nope.png")
    with pytest.raises(RecordError, match=r"record 0, field 'image_rephrase': image file not found: .*nope\.png"):
        _read(path, data)


def test_load_image_garbage_names_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(DataFileError, match=r"bad\.jpg: cannot read image"):
        load_image(bad)
    with pytest.raises(DataFileError, match=r"missing\.jpg: image file not found"):
        load_image(tmp_path / "missing.jpg")


def test_dotdot_escape_refused(data: Path) -> None:
    path = _broken(data, 1, image="../rephrase/val2014_image_rephrase/000000000001_rephrase.png")
    with pytest.raises(RecordError, match=r"record 1, field 'image': image path .* leaves its root"):
        _read(path, data)


def test_dotdot_inside_root_allowed(data: Path) -> None:
    path = _broken(data, 1, image="val2014/../val2014/COCO_val2014_000000000001.jpg")
    assert _read(path, data)[1].image.name == "COCO_val2014_000000000001.jpg"


def test_absolute_path_refused(data: Path) -> None:
    absolute = str((data / "coco" / "val2014" / "COCO_val2014_000000000001.jpg").absolute())
    with pytest.raises(RecordError, match=r"record 0, field 'm_loc': absolute image path"):
        _read(_broken(data, 0, m_loc=absolute), data)


def test_non_list_top_level(data: Path) -> None:
    path = data / "dict.json"
    path.write_text(json.dumps({"data": []}), encoding="utf-8")
    with pytest.raises(DataFileError, match=r"dict\.json: top level is a JSON object, expected a list"):
        _read(path, data)


def test_malformed_json_names_position(data: Path) -> None:
    path = data / "vqa_eval.json"
    path.write_text(path.read_text(encoding="utf-8")[:-40], encoding="utf-8")
    with pytest.raises(DataFileError, match=r"vqa_eval\.json: malformed JSON at line \d+ column \d+"):
        _read(path, data)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match=r"nothing\.json: file not found"):
        _read(tmp_path / "nothing.json")


# --- writer ------------------------------------------------------------------------------------------------


def test_write_round_trip(data: Path) -> None:
    raw = json.loads((data / "vqa_eval.json").read_text(encoding="utf-8"))
    out = data / "written.json"
    write_mmedit(out, raw)
    assert "Röntgen" in out.read_text(encoding="utf-8")  # ensure_ascii=False
    assert json.loads(out.read_text(encoding="utf-8")) == raw
    assert [r.alt for r in _read(out, data)] == [r.alt for r in _read(data / "vqa_eval.json", data)]
    assert sorted(p.name for p in data.iterdir() if p.name.endswith(".tmp")) == []


def test_write_refuses_invalid_and_leaves_target_untouched(data: Path) -> None:
    raw = json.loads((data / "vqa_eval.json").read_text(encoding="utf-8"))
    out = data / "out.json"
    write_mmedit(out, raw[:1])
    before = out.read_bytes()
    del raw[1]["alt"]
    with pytest.raises(RecordError, match=r"out\.json record 1, field 'alt': missing key"):
        write_mmedit(out, raw)
    assert out.read_bytes() == before
    assert not [p for p in data.iterdir() if p.name.endswith(".tmp")]


def test_validate_record_alone() -> None:
    raw = dict.fromkeys(MMEDIT_KEYS, "x")
    raw.update(image="val2014/a.jpg", image_rephrase="r/a.png", m_loc="val2014/b.jpg")
    validate_record(raw, "gen.json record 0")
    with pytest.raises(RecordError, match=r"gen\.json record 0, field 'image': absolute image path"):
        validate_record({**raw, "image": "/abs/a.jpg"}, "gen.json record 0")


@pytest.mark.parametrize("field", ["loc_ans", "m_loc_q", "m_loc_a"])
def test_empty_locality_text_refused(data: Path, field: str) -> None:
    path = _broken(data, 1, **{field: " "})
    with pytest.raises(
        RecordError, match=rf"vqa_eval\.json record 1, field '{field}': empty locality .*fill '{field}'"
    ):
        _read(path, data)


def test_truncated_jpeg_is_refused_at_set_up(data: Path) -> None:
    """Half a JPEG: its header opens and passes PIL's verify(); only a full decode finds the cut."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.random.RandomState(0).rand(128, 128, 3) * 255).astype("uint8")).save(buffer, format="JPEG")
    whole = buffer.getvalue()
    (data / "coco" / "val2014" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    with Image.open(data / "coco" / "val2014" / "truncated.jpg") as image:
        image.verify()  # the header check alone would accept it
    path = _broken(data, 3, image="val2014/truncated.jpg")
    with pytest.raises(RecordError, match=r"vqa_eval\.json record 3, field 'image': unreadable image .*truncated\.jpg"):
        _read(path, data)
