"""benchmarks/table1.py runs each editor's config through the engine and prints the paper's Table 1 layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import MMEDIT, benchmark_script

ROOT = Path(__file__).resolve().parents[1]


def _table1():
    return benchmark_script("table1")


def test_default_rows_are_the_papers_editors_on_both_tasks():
    table1 = _table1()
    names = ["FT-L", "FT-M", "LoRA-FT", "MEND", "AlphaEdit", "SERAC", "IKE", "LiveEdit", "GRACE", "M-ORE"]
    assert [name for name, _, _ in table1.EDITORS] == names
    assert len(table1.DEFAULT_CONFIGS) == 20 and all((ROOT / c).is_file() for c in table1.DEFAULT_CONFIGS)


def test_two_editors_two_edits(tiny_llava_dir, tmp_path, capsys):
    out = tmp_path / "table1.json"
    result = _table1().main(
        [
            "--configs", *(str(ROOT / f"configs/tiny_llava_evqa_{e}.yaml") for e in ("ft_l", "ft_m")),
            "--horizons", "1", "2", "--single-edits", "2", "--out", str(out),
            "--model.init_args.backbone.init_args.path", str(tiny_llava_dir),
            "--data.init_args.data_file", str(MMEDIT / "vqa_eval.json"),
            "--data.init_args.image_root", str(MMEDIT / "coco"),
            "--data.init_args.rephrase_root", str(MMEDIT / "rephrase"),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    immediate = result["tables"]["immediate"]
    assert immediate[0].startswith("| Method | E-VQA Rel. |") and "E-IC Avg." in immediate[0]
    assert [line.split(" | ")[0] for line in immediate[2:]] == ["| FT-L_1", "| FT-M_1", "| FT-L_2", "| FT-M_2"]
    for line in immediate[2:]:
        cells = line.strip("| ").split(" | ")
        assert len(cells) == 1 + 12 + 4
        assert all(0 <= float(c) <= 100 for c in cells[1:7]) and cells[7:13] == ["-"] * 6  # E-IC was not run
        assert float(cells[13]) > 0 and int(cells[14]) > 0  # s/edit and state bytes of the E-VQA run
    rows = {(r["editor"], r["horizon"]): r["metrics"] for r in result["rows"]}
    assert rows[("FTL", 1)]["protocol"] == "single" and rows[("FTM", 2)]["num_edits"] == 2
    assert "\n".join(immediate) in printed and "\n".join(result["tables"]["retention"]) in printed
    assert json.loads(out.read_text())["tables"] == result["tables"]


def test_merge_renders_one_table_from_earlier_runs(tmp_path, capsys):
    table1 = _table1()
    scores = {"rel": 90.0, "t_gen": 80.0, "m_gen": 70.0, "t_loc": 100.0, "m_loc": 60.0, "avg": 80.0}
    metrics = {"headline": "seen", "immediate": scores, "retention": scores, "seconds_per_edit": 0.5, "state_bytes": 7}
    for name, task, editor in (("a.json", "evqa", "FTL"), ("b.json", "eic", "MORE")):
        row = {"config": "c", "command": "x", "horizon": 100, "editor": editor, "task": task, "metrics": metrics}
        (tmp_path / name).write_text(json.dumps({"split": "eval", "rows": [row]}))
    result = table1.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    lines = result["tables"]["retention"][2:]
    assert [line.split(" | ")[0] for line in lines] == ["| FT-L_100", "| M-ORE_100"]
    assert lines[0].split(" | ")[1:7] == ["90.00", "80.00", "70.00", "100.00", "60.00", "80.00"]
    assert lines[0].split(" | ")[7:13] == ["-"] * 6 and lines[1].split(" | ")[7] == "90.00"
    with pytest.raises(SystemExit, match="eval split"):
        table1.main(["--merge", str(tmp_path / "a.json"), "--split", "train"])
