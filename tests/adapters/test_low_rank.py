import pytest
import torch
from torch import nn

from more_lightning.adapters.low_rank import LowRankLinear, orthonormal_rows, unwrap_linear, wrap_linear


def test_A_has_orthonormal_rows_and_is_seeded():
    a = orthonormal_rows(8, 32, seed=3)
    torch.testing.assert_close(a @ a.T, torch.eye(8), atol=1e-6, rtol=0)
    torch.testing.assert_close(a, orthonormal_rows(8, 32, seed=3), atol=0, rtol=0)
    assert not torch.equal(a, orthonormal_rows(8, 32, seed=4))


def test_zero_B_equals_base_and_A_is_a_frozen_buffer():
    base = nn.Linear(16, 12)
    x = torch.randn(5, 16)
    expected = base(x)
    layer = LowRankLinear(base, r=4, alpha=8)
    torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)
    assert "lora_A" in dict(layer.named_buffers())
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_B"]


def test_A_does_not_move_under_training():
    layer = LowRankLinear(nn.Linear(16, 12), r=4, alpha=8)
    a0 = layer.lora_A.clone()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(5, 16)).pow(2).sum().backward()
        opt.step()
    torch.testing.assert_close(layer.lora_A, a0, atol=0, rtol=0)
    assert layer.lora_B.abs().sum() > 0


def test_freeze_A_false_makes_A_a_parameter():
    layer = LowRankLinear(nn.Linear(16, 12), r=4, alpha=8, freeze_A=False)
    assert isinstance(layer.lora_A, nn.Parameter)


def test_merged_equals_unmerged_and_unmerge_restores():
    base = nn.Linear(16, 12)
    w0 = base.weight.detach().clone()
    layer = LowRankLinear(base, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(7, 16)
    unmerged = layer(x)
    torch.testing.assert_close(layer.get_delta_weight(), layer.scaling * layer.lora_B @ layer.lora_A)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)


def test_wrap_linear_replaces_by_path_and_caps_rank():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    wrapper = wrap_linear(model, "2", r=16, alpha=32)
    assert model[2] is wrapper and wrapper.r == 8 and wrapper.scaling == 2.0
    assert wrap_linear(model, "2", r=16, alpha=32) is wrapper  # idempotent
    with pytest.raises(TypeError, match=r"only nn\.Linear"):
        wrap_linear(model, "1", r=4, alpha=8)


def test_unwrap_linear_restores_the_base_layer_with_or_without_the_write():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(3, 8)
    base = model[2]
    w0 = base.weight.detach().clone()
    for merge in (False, True):
        wrapper = wrap_linear(model, "2", r=4, alpha=8)
        with torch.no_grad():
            wrapper.lora_B.normal_()
        edited = model(x)
        assert unwrap_linear(model, "2", merge=merge) is base and model[2] is base
        if merge:
            torch.testing.assert_close(model(x), edited)
        else:
            assert torch.equal(base.weight, w0)
    with pytest.raises(TypeError, match="not a LowRankLinear"):
        unwrap_linear(model, "2")
