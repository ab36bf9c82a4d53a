"""CrossModalStatistics: streamed moments and the stream's tags and figure."""

from __future__ import annotations

import pytest
import torch

from callbacks.cross_modal import Moments


def test_streamed_log_variance_matches_torch() -> None:
    rows = torch.randn(50, 6) * torch.arange(1, 7)
    moments = Moments()
    for chunk in rows.split(7):
        moments.update(chunk)
    torch.testing.assert_close(moments.log_variance(), rows.double().var(dim=0, unbiased=False).log().float())
    assert moments.mean_energy() == pytest.approx(float(rows.pow(2).sum(1).mean()), rel=1e-5)
    assert Moments().log_variance().numel() == 0


def test_stream_tags_and_figure(stream_run) -> None:
    scalars = stream_run.scalars
    points = stream_run.module.edit_points
    for point in points:
        sides = ("text", "image") if point.modality == "text" else ("image",)
        for side in sides:
            tag = f"cross_modal/{point.path}/log_var_{side}"
            assert [s for s, _ in scalars[tag]] == [0, 2, 4], tag
    for tag in (
        "cross_modal/projector_out/log_var",
        "cross_modal/energy/projector",
        "cross_modal/energy/layer_0/attn_text",
        "cross_modal/energy/layer_1/mlp_image",
        "cross_modal/hidden/layer_0/log_var_text",
        "cross_modal/hidden/layer_1/log_var_image",
    ):
        assert [s for s, _ in scalars[tag]] == [0, 2, 4], tag
    # the projector's input (vision features) is not edited, so its keys do not move
    first = f"cross_modal/{next(p.path for p in points if p.modality == 'image')}/log_var_image"
    assert len({v for _, v in scalars[first]}) == 1
    assert "cross_modal/figure" in stream_run.images
    assert (stream_run.log_dir / "cross_modal.png").stat().st_size > 0
