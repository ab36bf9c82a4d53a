"""The held-out companion reader: ``<stem>.heldout.json`` beside an MMEdit file (more_lightning.data.schema,
more_lightning.data.datamodule).

Companions are written into a copy of tests/fixtures/mmedit by tests/heldout_companion.py; broken ones carry one
defect each.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from more_lightning.data.datamodule import EditStreamDataModule
from more_lightning.data.records import HELDOUT_KEYS, HeldOutRecord
from more_lightning.data.schema import (
    DataFileError,
    RecordError,
    heldout_path,
    read_heldout,
    read_mmedit,
    validate_heldout_record,
)
from tests.heldout_companion import VQA_EVAL_HELDOUT, copy_fixtures, write_companion


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A private copy of the mmedit fixture folder, without a companion."""
    return copy_fixtures(tmp_path)


def _module(data: Path, **kwargs) -> EditStreamDataModule:
    dm = EditStreamDataModule(
        data_file=str(data / "vqa_eval.json"),
        image_root=str(data / "coco"),
        rephrase_root=str(data / "rephrase"),
        shuffle=False,
        **kwargs,
    )
    dm.setup()
    return dm


def _broken(data: Path, index: int, **changes) -> Path:
    """The default companion with record ``index`` changed (``...`` deletes the key), as vqa_eval.heldout.json."""
    records = copy.deepcopy(VQA_EVAL_HELDOUT)
    for key, value in changes.items():
        if value is ...:
            del records[index][key]
        else:
            records[index][key] = value
    return write_companion(data / "vqa_eval.heldout.json", records)


def _read(data: Path, companion: Path) -> list:
    return read_mmedit(data / "vqa_eval.json", data / "coco", data / "rephrase", heldout_file=companion)


# --- finding the companion ---------------------------------------------------------------------------------


def test_heldout_path_is_stem_dot_heldout_json() -> None:
    assert heldout_path("a/b/vqa_eval.json") == Path("a/b/vqa_eval.heldout.json")
    assert heldout_path("a/vqa_eval.jsonl") == Path("a/vqa_eval.heldout.json")


def test_auto_uses_the_companion_beside_the_data_file(data: Path) -> None:
    write_companion(data / "vqa_eval.heldout.json")
    dm = _module(data)  # heldout_file defaults to "auto"
    assert dm.resolve_heldout_file() == data / "vqa_eval.heldout.json"
    records = dm.stream.records
    assert all(isinstance(r.held_out, HeldOutRecord) for r in records)
    assert records[0].held_out.rephrase == "what colour is this bus"
    assert records[3].held_out.m_loc_a == "three"


def test_no_companion_means_no_held_out_variants(data: Path) -> None:
    dm = _module(data)
    assert dm.resolve_heldout_file() is None
    assert all(r.held_out is None for r in dm.stream.records)
    item = dm.stream[0]
    assert item.held_out is None and item.held_out_queries() == {}
    assert set(item.queries()) == {"edit", "t_gen", "m_gen", "t_loc", "m_loc"}


@pytest.mark.parametrize("setting", [None, "none", "None"])
def test_none_ignores_an_existing_companion(data: Path, setting: str | None) -> None:
    write_companion(data / "vqa_eval.heldout.json")
    dm = _module(data, heldout_file=setting)
    assert dm.resolve_heldout_file() is None
    assert all(r.held_out is None for r in dm.stream.records)


def test_explicit_path_is_used(data: Path) -> None:
    companion = write_companion(data / "my_variants.json")
    dm = _module(data, heldout_file=str(companion))
    assert dm.stream.records[2].held_out.loc == "nq question: who wrote moby dick"


def test_explicit_path_must_exist(data: Path) -> None:
    missing = data / "nothing.heldout.json"
    with pytest.raises(DataFileError, match=r"nothing\.heldout\.json: held-out companion not found .*heldout_file"):
        _module(data, heldout_file=str(missing))


# --- what the records and tuples hold ----------------------------------------------------------------------


def test_values_stripped_and_image_paths_resolved_under_the_main_roots(data: Path) -> None:
    records = _read(data, write_companion(data / "vqa_eval.heldout.json"))
    held = records[1].held_out
    assert held.rephrase == "who is on this stamp"
    assert held.loc == "nq question: who wrote the novel"  # embedded newline folded to a space
    assert held.image_rephrase == (data / "rephrase" / "val2014_image_rephrase" / "000000000003_rephrase.png")
    assert held.m_loc == (data / "coco" / "val2014" / "COCO_val2014_000000000005.jpg")
    assert all(h.image_rephrase.is_absolute() and h.m_loc.is_file() for h in (r.held_out for r in records))


def test_m_loc_resolves_under_m_loc_root(data: Path) -> None:
    other = Path(shutil.copytree(data / "coco", data / "okvqa"))
    write_companion(data / "vqa_eval.heldout.json")
    records = _module(data, m_loc_root=str(other)).stream.records
    assert all(r.held_out.m_loc.is_relative_to(other.absolute()) for r in records)
    assert all(r.held_out.image_rephrase.is_relative_to((data / "rephrase").absolute()) for r in records)


def test_read_heldout_alone(data: Path) -> None:
    companion = write_companion(data / "vqa_eval.heldout.json")
    held = read_heldout(companion, data / "vqa_eval.json", 4, data / "rephrase", data / "coco")
    assert [h.m_loc_a for h in held] == ["soccer", "a dog", "a woman", "three"]
    with pytest.raises(DataFileError, match=r"has 4 records but its main file main\.json has 5"):
        read_heldout(companion, data / "main.json", 5, data / "rephrase", data / "coco")


def test_strip_false_keeps_values_verbatim(data: Path) -> None:
    companion = write_companion(data / "vqa_eval.heldout.json")
    records = read_mmedit(data / "vqa_eval.json", data / "coco", data / "rephrase", strip=False, heldout_file=companion)
    assert records[1].held_out.rephrase == "  who is on this stamp\n"


def test_tuple_carries_held_out_queries(data: Path) -> None:
    write_companion(data / "vqa_eval.heldout.json")
    item = _module(data).stream[0]
    record = _read(data, data / "vqa_eval.heldout.json")[0]
    queries = item.held_out_queries()
    assert set(queries) == {"t_gen", "m_gen", "t_loc", "m_loc"}
    assert (queries["t_gen"].prompt, queries["t_gen"].target) == ("what colour is this bus", "blue")
    assert queries["t_gen"].image is item.edit.image  # the edit's own image
    assert (queries["m_gen"].prompt, queries["m_gen"].target) == (item.edit.prompt, "blue")
    assert queries["m_gen"].image.tobytes() != item.m_gen.image.tobytes()  # another re-render than the seen one
    assert (queries["t_loc"].prompt, queries["t_loc"].target, queries["t_loc"].image) == (
        "nq question: who is pictured on the stamp",
        "Einstein",
        None,
    )
    assert (queries["m_loc"].prompt, queries["m_loc"].target) == ("what sport is being played", "soccer")
    assert queries["m_loc"].image.mode == "RGB" and record.held_out.m_loc.name.endswith("06.jpg")


def test_limit_reads_first_records_and_checks_full_length(data: Path) -> None:
    companion = write_companion(data / "vqa_eval.heldout.json")
    records = read_mmedit(data / "vqa_eval.json", data / "coco", data / "rephrase", limit=2, heldout_file=companion)
    assert [r.held_out.rephrase for r in records] == ["what colour is this bus", "who is on this stamp"]
    write_companion(companion, VQA_EVAL_HELDOUT[:2])  # two records match the limit, not the file
    with pytest.raises(DataFileError, match=r"has 2 records but its main file vqa_eval\.json has 4"):
        read_mmedit(data / "vqa_eval.json", data / "coco", data / "rephrase", limit=2, heldout_file=companion)


# --- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", HELDOUT_KEYS)
def test_missing_key_names_file_record_and_key(data: Path, key: str) -> None:
    companion = _broken(data, 2, **{key: ...})
    pattern = rf"vqa_eval\.heldout\.json record 2, field '{key}': missing key .* the 7 held-out keys"
    with pytest.raises(RecordError, match=pattern) as info:
        _read(data, companion)
    assert info.value.field == key


@pytest.mark.parametrize(("value", "found"), [(3, "number"), (None, "null"), (["a"], "array")])
def test_wrong_type_names_file_record_field_and_type(data: Path, value, found: str) -> None:
    companion = _broken(data, 1, loc_ans=value)
    with pytest.raises(RecordError, match=rf"vqa_eval\.heldout\.json record 1, field 'loc_ans': .*found {found}"):
        _read(data, companion)


def test_non_object_record_refused(data: Path) -> None:
    records = [*VQA_EVAL_HELDOUT[:3], "not a record"]
    companion = write_companion(data / "vqa_eval.heldout.json", records)
    with pytest.raises(RecordError, match=r"vqa_eval\.heldout\.json record 3 \(whole record\): expected a JSON obj"):
        _read(data, companion)


@pytest.mark.parametrize("records", [VQA_EVAL_HELDOUT[:3], [*VQA_EVAL_HELDOUT, VQA_EVAL_HELDOUT[0]]])
def test_length_mismatch_names_both_files_and_lengths(data: Path, records: list) -> None:
    companion = write_companion(data / "vqa_eval.heldout.json", records)
    pattern = rf"vqa_eval\.heldout\.json: held-out companion has {len(records)} records but its main file "
    pattern += r"vqa_eval\.json has 4"
    with pytest.raises(DataFileError, match=pattern):
        _read(data, companion)
    with pytest.raises(DataFileError, match=pattern):
        _module(data)  # auto-detected, so validated just the same


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image_rephrase", "../coco/val2014/COCO_val2014_000000000001.jpg"),
        ("m_loc", "../rephrase/val2014_image_rephrase/000000000001_rephrase.png"),
    ],
)
def test_path_outside_root_refused(data: Path, field: str, value: str) -> None:
    companion = _broken(data, 3, **{field: value})
    with pytest.raises(RecordError, match=rf"vqa_eval\.heldout\.json record 3, field '{field}': .* leaves its root"):
        _read(data, companion)


def test_absolute_path_refused(data: Path) -> None:
    absolute = str((data / "coco" / "val2014" / "COCO_val2014_000000000001.jpg").absolute())
    with pytest.raises(RecordError, match=r"heldout\.json record 0, field 'm_loc': absolute image path"):
        _read(data, _broken(data, 0, m_loc=absolute))


def test_missing_and_unreadable_images_checked_like_the_main_file(data: Path) -> None:
    companion = _broken(data, 2, image_rephrase="val2014_image_rephrase/nope.png")
    with pytest.raises(RecordError, match=r"heldout\.json record 2, field 'image_rephrase': image file not found"):
        _read(data, companion)
    assert read_mmedit(
        data / "vqa_eval.json", data / "coco", data / "rephrase", check_images=False, heldout_file=companion
    )  # the check can be turned off
    (data / "coco" / "val2014" / "garbage.jpg").write_bytes(b"not a JPEG" * 10)
    with pytest.raises(RecordError, match=r"heldout\.json record 1, field 'm_loc': unreadable image .*garbage"):
        _read(data, _broken(data, 1, m_loc="val2014/garbage.jpg"))


def test_malformed_json_and_non_list_top_level(data: Path) -> None:
    companion = data / "vqa_eval.heldout.json"
    companion.write_text(json.dumps(VQA_EVAL_HELDOUT)[:-20], encoding="utf-8")
    with pytest.raises(DataFileError, match=r"vqa_eval\.heldout\.json: malformed JSON at line"):
        _read(data, companion)
    companion.write_text(json.dumps({"records": VQA_EVAL_HELDOUT}), encoding="utf-8")
    with pytest.raises(DataFileError, match=r"vqa_eval\.heldout\.json: top level is a JSON object"):
        _read(data, companion)


def test_validate_heldout_record_alone() -> None:
    raw = dict(VQA_EVAL_HELDOUT[0])
    validate_heldout_record(raw, "gen.heldout.json record 0")
    with pytest.raises(RecordError, match=r"gen\.heldout\.json record 0, field 'image_rephrase': empty image path"):
        validate_heldout_record({**raw, "image_rephrase": " "}, "gen.heldout.json record 0")
