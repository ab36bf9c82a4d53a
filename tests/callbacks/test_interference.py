"""Interference: the matrices on hand-built ΔW sequences, the bounded window, and the stream's tags."""

from __future__ import annotations

import json
import math

import pytest
import torch

from callbacks.interference import (
    _ModuleWindow,
    cosine_matrix,
    entanglement_horizon,
    gaussian_sketch_factors,
    lag_profile,
    overlap_matrix,
    sketch,
    support_overlap,
    top_k_support,
)


def test_identical_updates_have_cosine_one() -> None:
    delta = torch.randn(6, 5)
    cos = cosine_matrix(torch.stack([delta.flatten(), delta.flatten(), 3 * delta.flatten()]))
    torch.testing.assert_close(cos, torch.ones(3, 3))


def test_orthogonal_and_opposite_updates() -> None:
    a, b = torch.zeros(4, 4), torch.zeros(4, 4)
    a[0, 0], b[1, 1] = 1.0, 2.0
    cos = cosine_matrix(torch.stack([a.flatten(), b.flatten(), -a.flatten()]))
    assert cos[0, 1] == 0 and cos[0, 2] == pytest.approx(-1)


def test_zero_update_has_undefined_cosine() -> None:
    cos = cosine_matrix(torch.stack([torch.ones(4), torch.zeros(4)]))
    assert math.isnan(cos[0, 1]) and cos[0, 0] == pytest.approx(1)


def test_disjoint_supports_have_zero_overlap() -> None:
    a, b = torch.zeros(8, 8), torch.zeros(8, 8)
    a[:4] = torch.randn(4, 8)  # rows 0-3
    b[4:] = torch.randn(4, 8)  # rows 4-7
    supports = [top_k_support(a, 10), top_k_support(b, 10), top_k_support(a, 10)]
    ovl = overlap_matrix(supports)
    assert ovl[0, 1] == 0 and ovl[1, 2] == 0
    assert ovl[0, 2] == 1 and ovl[0, 0] == 1


def test_top_k_support_skips_zeros_and_picks_largest() -> None:
    delta = torch.tensor([[0.0, -5.0, 1.0], [0.0, 0.0, 3.0]])
    assert top_k_support(delta, 2).tolist() == [1, 5]
    assert top_k_support(delta, 10).tolist() == [1, 2, 5]  # only the 3 nonzeros
    assert support_overlap(torch.tensor([1, 2]), torch.tensor([2, 3, 4])) == 0.5
    assert math.isnan(support_overlap(torch.tensor([], dtype=torch.long), torch.tensor([1])))


def test_lag_profile_and_horizon() -> None:
    matrix = torch.tensor([[1.0, 0.5, 0.1], [0.5, 1.0, 0.3], [0.1, 0.3, 1.0]])
    torch.testing.assert_close(lag_profile(matrix), torch.tensor([0.4, 0.1]))
    assert entanglement_horizon(torch.tensor([0.4, 0.1, 0.5]), threshold=0.2) == 1
    assert entanglement_horizon(torch.tensor([0.05, 0.5]), threshold=0.2) == 0
    assert entanglement_horizon(torch.tensor([0.3, float("nan")]), threshold=0.2) == 1


def test_sketch_preserves_identity_and_approximates_inner_products() -> None:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 30, generator=generator), torch.randn(40, 30, generator=generator)
    y = 0.8 * x + 0.6 * y / y.norm() * x.norm()  # cosine ≈ 0.8
    left, right = gaussian_sketch_factors(40, 30, m=24, seed=0)
    sx, sy, s2x = sketch(x, left, right), sketch(y, left, right), sketch(2 * x, left, right)
    cos = cosine_matrix(torch.stack([sx, sy, s2x]))
    exact = float(torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0))
    assert cos[0, 2] == pytest.approx(1, abs=1e-5)
    assert abs(float(cos[0, 1]) - exact) < 0.15


def test_window_is_bounded_and_lags_accumulate() -> None:
    """Identical updates every edit: cosine 1 at every lag < window; the window never exceeds its size."""
    delta = torch.randn(5, 7)
    state = _ModuleWindow(torch.zeros(5, 7), None, size=3)
    for t in range(1, 11):
        out = state.push(t, delta, k=6)
        assert len(state.vectors) <= 3 and len(state.supports) <= 3
    assert out["cosine_lag1"] == pytest.approx(1) and out["overlap_lag1"] == 1
    profiles = state.profiles()
    torch.testing.assert_close(profiles["cosine"], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(profiles["overlap"], torch.ones(2, dtype=torch.float64))
    assert state.cos_count.tolist() == [0, 9, 8]  # lag 1: pairs (1,2)..(9,10); lag 2: (1,3)..(8,10)


def test_invalid_settings_are_rejected() -> None:
    from callbacks import Interference

    with pytest.raises(ValueError, match="window"):
        Interference(window=1)
    with pytest.raises(ValueError, match="top_k"):
        Interference(top_k=1.5)


def test_stream_tags_figure_and_summary(stream_run) -> None:
    for tag in (
        "interference/cosine_lag1",
        "interference/abs_cosine_window",
        "interference/overlap_lag1",
        "interference/overlap_window",
        "interference/horizon",
        "interference/forgetting/retained_rel",
        "interference/forgetting/drop",
    ):
        assert [step for step, _ in stream_run.scalars[tag]] == [2, 4], tag
    assert "interference/figure" in stream_run.images
    assert (stream_run.log_dir / "interference.png").stat().st_size > 0
    summary = json.loads((stream_run.log_dir / "interference.json").read_text())
    assert len(summary["lag_profile"]["cosine"]) == 2  # window 3 -> lags 1, 2
    assert set(summary["lag1_per_module"]) == set(stream_run.module.editor.written_modules())
    callback = stream_run.callbacks["interference"]
    assert all(len(m.vectors) <= 3 for m in callback.modules.values())


def test_memory_bound_does_not_depend_on_stream_length(stream_run) -> None:
    """A 4-edit stream and the formula agree: window * (ΔW floats + top-k int32) + one D_{t-1} per module."""
    callback = stream_run.callbacks["interference"]
    expected = 0
    for path in callback.modules:
        numel = stream_run.module.editor.delta_weight(path).numel()
        expected += 4 * numel + 3 * (4 * numel + 4 * max(1, round(0.05 * numel)))
    assert callback.memory_bytes() == expected
    held = sum(
        sum(v.numel() * v.element_size() for v in m.vectors) + sum(s.numel() * s.element_size() for s in m.supports)
        for m in callback.modules.values()
    )
    assert held <= callback.memory_bytes()
