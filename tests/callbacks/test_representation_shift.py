"""RepresentationShift: the distance functions and the stream's tags and figure."""

from __future__ import annotations

import pytest
import torch

from callbacks.representation_shift import (
    cosine_distance,
    median_bandwidth,
    pca_basis,
    project,
    rbf_mmd2,
    relative_l2,
)


def test_no_shift_is_zero() -> None:
    h = torch.randn(6, 10)
    assert cosine_distance(h, h).abs().max() < 1e-6
    assert relative_l2(h, h).max() == 0
    assert rbf_mmd2(h, h, median_bandwidth(h)) == pytest.approx(0, abs=1e-6)


def test_shift_is_positive_and_grows() -> None:
    h = torch.randn(32, 8)
    bandwidth = median_bandwidth(h)
    small, large = rbf_mmd2(h, h + 0.2, bandwidth), rbf_mmd2(h, h + 2.0, bandwidth)
    assert 0 < small < large
    torch.testing.assert_close(relative_l2(torch.ones(1, 4), 3 * torch.ones(1, 4)), torch.tensor([2.0]))
    torch.testing.assert_close(cosine_distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])), torch.ones(1))


def test_pca_basis_finds_the_spread_direction() -> None:
    x = torch.zeros(50, 3)
    x[:, 1] = torch.linspace(-5, 5, 50)
    x[:, 2] = 0.01 * torch.randn(50)
    mean, axes = pca_basis(x)
    assert axes.shape == (2, 3) and abs(float(axes[0, 1])) == pytest.approx(1, abs=1e-3)
    assert project(x, mean, axes).shape == (50, 2)


def test_stream_tags_and_figure(stream_run) -> None:
    scalars = stream_run.scalars
    for tag in (
        "representation_shift/cosine_distance",
        "representation_shift/mmd",
        "representation_shift/t_loc/cosine_distance",
        "representation_shift/m_loc/cosine_distance",
        "representation_shift/layer_1/cosine_distance",
        "representation_shift/layer_1/relative_l2",
        "representation_shift/layer_1/mmd",
    ):
        assert [step for step, _ in scalars[tag]] == [0, 2, 4], tag
    assert scalars["representation_shift/cosine_distance"][0][1] == pytest.approx(0, abs=1e-5)
    assert "representation_shift/figure" in stream_run.images
    assert (stream_run.log_dir / "representation_shift.png").stat().st_size > 0


def test_bad_layer_names_the_setting(stream_run) -> None:
    from callbacks import RepresentationShift

    callback = RepresentationShift(layers=[99])
    with pytest.raises(ValueError, match="`layers` setting"):
        callback._resolve_layers(2)
