"""benchmarks/cost_vs_horizon.py: per-edit time and editor state against t, editors side by side."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import MMEDIT, benchmark_script

ROOT = Path(__file__).resolve().parents[1]


def _module():
    return benchmark_script("cost_vs_horizon")


def test_slope_and_rolling_median():
    cost = _module()
    assert cost.slope_per_100([(1, 10), (11, 30), (21, 50)]) == 200.0
    assert cost.slope_per_100([(1, 7)]) == 0.0
    assert cost.rolling_median([3.0, 1.0, 2.0, 10.0], 2) == [3.0, 2.0, 1.5, 6.0]


def test_memory_editor_grows_and_more_stays_flat(tiny_llava_dir, tmp_path, capsys):
    out = tmp_path / "cost"
    results = _module().main(
        [
            "--configs", str(ROOT / "configs/tiny_llava_evqa.yaml"), str(ROOT / "configs/tiny_llava_evqa_grace.yaml"),
            "--edits", "4", "--every", "2", "--out", str(out),
            "--model.init_args.backbone.init_args.path", str(tiny_llava_dir),
            "--data.init_args.data_file", str(MMEDIT / "vqa_eval.json"),
            "--data.init_args.image_root", str(MMEDIT / "coco"),
            "--data.init_args.rephrase_root", str(MMEDIT / "rephrase"),
            "--model.init_args.save_every", "0",
        ]
    )  # fmt: skip
    more, grace = results
    assert (more["editor"], grace["editor"]) == ("MORE", "GRACE")
    assert [t for t, _ in more["state"]] == [1, 2, 4] and len(more["seconds"]) == 4
    assert more["state_first"] == more["state_last"] and more["state_slope_per_100"] == 0.0
    assert grace["state_last"] > grace["state_first"]  # the codebook keeps every edit
    assert json.loads((tmp_path / "cost.json").read_text())[1]["state"] == [list(p) for p in grace["state"]]
    assert (tmp_path / "cost.png").stat().st_size > 0
    assert "| GRACE | 4 |" in capsys.readouterr().out
