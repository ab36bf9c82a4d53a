"""The long stream split (``--long N``): distinct edits, its own record streams, written beside the main files."""

import json
import logging
from pathlib import Path

import pytest

from more_lightning.data.schema import heldout_path, read_mmedit
from more_lightning.world import benchmark
from more_lightning.world.benchmark import (
    FILES,
    LONG_FILES,
    LONG_STAMP,
    _draft,
    build_benchmark,
    long_split_stamp,
    main,
    write_split,
)
from more_lightning.world.knowledge import build_knowledge

N = 40


def _snapshot(root: Path, long: bool = False) -> dict[str, bytes]:
    """Every file under ``root``: those of the long split (``long``) or all the others."""
    files = {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}
    return {rel: p.read_bytes() for rel, p in files.items() if ("long" in rel) == long}


def _main_build(root: Path, **kwargs) -> dict[str, int]:
    return build_benchmark(root, num_train=4, num_eval=N, mme_images=1, **kwargs)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """A small main benchmark, then the long split written alone beside it; with the main files' bytes before."""
    root = tmp_path_factory.mktemp("embedded")
    _main_build(root)
    before = _snapshot(root)
    sizes = build_benchmark(root, num_long=N, write_main=False)
    assert sizes == {name: N for name in LONG_FILES.values()}
    return root, before


def _records(root: Path, name: str) -> list[dict]:
    return json.loads((root / f"{name}.json").read_text())


def test_writing_the_long_split_alone_leaves_the_main_files_untouched(bench):
    root, before = bench
    assert _snapshot(root) == before
    assert all((root / f"{name}.json").is_file() for name in FILES.values())


def test_long_records_are_distinct_edits(bench):
    root, _ = bench
    facts = build_knowledge()
    for (task, split), name in LONG_FILES.items():
        records, truth = _records(root, name), json.loads((root / "truth" / f"{name}.json").read_text())
        assert len(records) == len(truth) == N
        draws = [t["draw"] for t in truth]
        assert draws == sorted(set(draws))  # kept in draw order, each draw once
        keys = set()
        for i, (record, draw) in enumerate(zip(records, draws, strict=True)):
            draft = _draft(task, split, draw, 0, facts)  # the record's streams are keyed by its draw index
            assert draft.record["src"] == record["src"] and draft.record["loc"] == record["loc"]
            assert record["image"] == f"{task}_{split}/{i:05d}.png"
            keys.add((repr(draft.scene), record["src"], record["alt"]))
            assert record["alt"] != record["pred"]
        assert len(keys) == N


def test_long_records_are_drawn_from_their_own_streams(bench):
    root, _ = bench
    for task, eval_name in (("vqa", "vqa_eval"), ("caption", "caption_eval_edit")):
        long, evaluation = _records(root, LONG_FILES[(task, "long")]), _records(root, eval_name)
        same = sum(
            (a["src"], a["loc"], a["m_loc_q"]) == (b["src"], b["loc"], b["m_loc_q"])
            for a, b in zip(long, evaluation, strict=True)
        )
        assert same < N // 4
        images = [(root / "images" / r["image"]).read_bytes() for r in long]
        assert images[0] != (root / "images" / evaluation[0]["image"]).read_bytes()
        assert len(set(images)) > N // 2


def test_companion_is_written_and_validates(bench):
    root, _ = bench
    for name in LONG_FILES.values():
        path = root / f"{name}.json"
        assert heldout_path(path).is_file()
        records = read_mmedit(path, root / "images", root / "images_rephrase", heldout_file=heldout_path(path))
        assert len(records) == N
        assert all(r.held_out is not None and r.held_out.m_loc.is_file() for r in records)
        assert all(r.held_out.image_rephrase.is_file() for r in records)


def test_stamp_records_size_draws_and_settings(bench):
    root, _ = bench
    stamp = long_split_stamp(root)
    assert stamp["records"] == N
    assert stamp["settings"] == {"world": 2, "seed": 0, "num_entities": 200, "knowledge_seed": 0, "model": None}
    assert all(stamp["draws"][name] >= N for name in LONG_FILES.values())


def test_a_duplicate_draw_is_skipped_for_the_next(tmp_path, monkeypatch, caplog):
    # every two consecutive draws are made the same edit: only the even ones are kept
    monkeypatch.setattr(benchmark, "edit_key", lambda draft: (str(draft.draw // 2),))
    caplog.set_level(logging.INFO)
    records = write_split(tmp_path, "vqa", "long", 6, 0, build_knowledge(), distinct=True)
    truth = json.loads((tmp_path / "truth" / "vqa_long.json").read_text())
    assert [t["draw"] for t in truth] == [0, 2, 4, 6, 8, 10]
    assert [r["image"] for r in records] == [f"vqa_long/{i:05d}.png" for i in range(6)]
    assert sorted(p.name for p in (tmp_path / "images" / "vqa_long").glob("?????.png")) == [
        f"{i:05d}.png" for i in range(6)
    ]
    assert "5 duplicate draws skipped" in caplog.text  # draws 1, 3, 5, 7, 9


def test_main_build_keeps_a_long_split_of_the_same_settings_and_removes_another(bench, tmp_path, caplog):
    import shutil

    root = tmp_path / "embedded"
    shutil.copytree(bench[0], root)
    long_before = _snapshot(root, long=True)
    _main_build(root)
    assert _snapshot(root, long=True) == long_before
    caplog.set_level(logging.INFO)
    _main_build(root, seed=1)
    assert "removed the long split" in caplog.text
    assert _snapshot(root, long=True) == {} and long_split_stamp(root) is None
    assert not (root / "images" / "vqa_long").exists()


def test_if_missing_considers_only_what_is_requested(bench, tmp_path, caplog):
    import shutil

    root = tmp_path / "embedded"
    shutil.copytree(bench[0], root)
    before = _snapshot(root) | _snapshot(root, long=True)
    caplog.set_level(logging.INFO)
    main(["--out", str(root), "--long", str(N), "--if-missing"])  # both present: nothing written
    assert _snapshot(root) | _snapshot(root, long=True) == before
    assert "already holds the long split" in caplog.text
    (root / LONG_STAMP).unlink()  # the long split now counts as missing; the main files do not
    main(["--out", str(root), "--long", str(N), "--if-missing"])
    assert _snapshot(root) == {k: v for k, v in before.items() if "long" not in k}
    assert _snapshot(root, long=True) == {k: v for k, v in before.items() if "long" in k}
    with pytest.raises(SystemExit):
        main(["--out", str(root), "--only-long"])
