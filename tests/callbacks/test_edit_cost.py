"""EditCost: tags every edit, constant M-ORE state, figure."""

from __future__ import annotations

import json

import pytest

from callbacks.edit_cost import current_rss_bytes, peak_rss_bytes, slope


def test_slope_and_memory_probes() -> None:
    assert slope([1, 2, 3], [2, 4, 6]) == pytest.approx(2)
    assert slope([1], [5]) == 0
    assert 0 < current_rss_bytes() <= peak_rss_bytes() * 1.01


def test_stream_tags_and_figure(stream_run) -> None:
    scalars = stream_run.scalars
    for tag in (
        "cost/edit_seconds",
        "cost/edit_seconds_rolling",
        "cost/forward_backward_seconds",
        "cost/editor_seconds",
        "cost/step_seconds",
        "cost/rss_mb",
        "cost/rss_growth_mb",
        "cost/peak_rss_increase_mb",
        "cost/state_bytes",
    ):
        assert [s for s, _ in scalars[tag]] == [1, 2, 3, 4], tag
    assert "cost/cuda_peak_increase_mb" not in scalars  # CPU run
    assert len({v for _, v in scalars["cost/state_bytes"]}) == 1  # M-ORE's state does not grow with edits
    assert all(v > 0 for _, v in scalars["cost/edit_seconds"])
    assert "edit_cost/figure" in stream_run.images
    assert (stream_run.log_dir / "edit_cost.png").stat().st_size > 0
    summary = json.loads((stream_run.log_dir / "edit_cost.json").read_text())
    assert summary["num_edits"] == 4 and summary["state_bytes_first"] == summary["state_bytes_last"]
