"""MEND: the rank-one gradient identity against autograd, the networks' identity init and shape, their file, and
edits on the tiny model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from more_lightning.backbones.llava import LlavaBackbone
from more_lightning.editors.mend import (
    MEND,
    EditorNetwork,
    GradientFactors,
    MENDNetworks,
    MENDOptimizer,
    rank_one_gradient,
)
from more_lightning.editors.mend_train import MENDTrainModule, added_deltas
from more_lightning.editors.state import edit_state_dict, load_edit_state, save_edit_state
from more_lightning.module import OnlineEditModule
from tests.test_module import _edit_gain, _manual_module, _stream

TEXT = [f"model.language_model.layers.{i}.mlp.down_proj" for i in (0, 1)]  # the tiny fixture's 2 layers


def test_weight_gradient_is_the_sum_of_outer_products_of_the_captured_factors():
    torch.manual_seed(0)
    first, second = nn.Linear(6, 5, dtype=torch.float64), nn.Linear(5, 3, dtype=torch.float64)
    factors = GradientFactors({"first": first, "second": second})
    with factors.record():  # two passes (batch and sequence dims), one backward through a nonlinear loss
        loss = sum((second(torch.tanh(first(torch.randn(2, 4, 6, dtype=torch.float64)))) ** 3).sum() for _ in range(2))
    loss.backward()
    for name, module in {"first": first, "second": second}.items():
        u, delta = factors.factors()[name]
        assert u.shape == (16, module.in_features) and delta.shape == (16, module.out_features)
        torch.testing.assert_close(rank_one_gradient(u, delta), module.weight.grad, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # no graph: nothing is caught
        factors.clear()
        with factors.record():
            first(torch.randn(1, 6, dtype=torch.float64))
    assert factors.factors() == {}


def test_untrained_network_is_the_identity_and_a_trained_one_is_not():
    net = EditorNetwork(d_in=6, d_out=4, rank=3, n_hidden=1, n_modes=2).eval()
    u, delta = torch.randn(7, 6), torch.randn(7, 4)
    out_u, out_delta = net(u, delta, mode=1)
    assert out_u.shape == (7, 6) and out_delta.shape == (7, 4)
    torch.testing.assert_close(out_u, u)
    torch.testing.assert_close(out_delta, delta)
    with torch.no_grad():
        net.layers[0].U.normal_()
    assert not torch.allclose(net(u, delta)[0], u)  # the check can fail


def test_untrained_mend_writes_one_gradient_step_and_statistics_standardise():
    networks = MENDNetworks({"a": (4, 6), "b": (4, 6), "c": (5, 6)}, rank=3, edit_lr=0.5).eval()
    assert set(networks.nets) == {"4x6", "5x6"} and networks.route["b"] == ("4x6", 1)  # shared by shape, a mode each
    u, delta = torch.randn(9, 6), torch.randn(9, 4)
    torch.testing.assert_close(networks.delta("b", u, delta), -0.5 * delta.T @ u)
    net = networks.nets["4x6"].train()
    rows = torch.randn(50, 10) * 3 + 1
    net.update_stats(rows[:20])
    net.update_stats(rows[20:])
    torch.testing.assert_close(net.mean, rows.double().mean(0))
    torch.testing.assert_close(net.m2 / 49, rows.double().var(0))
    standard = net.eval().standardise(rows)
    torch.testing.assert_close(standard.mean(0), torch.zeros(10), atol=1e-5, rtol=0)


def test_networks_round_trip_through_their_file_and_a_missing_file_says_how_to_make_it(tmp_path):
    networks = MENDNetworks({"a": (4, 6), "b": (5, 6)}, rank=3, n_hidden=2, share=False, edit_lr=0.1)
    with torch.no_grad():
        for p in networks.parameters():
            p.add_(torch.randn_like(p))
    networks.nets["layer0"].train().update_stats(torch.randn(8, 10))
    networks.save(tmp_path / "nets.safetensors")
    loaded = MENDNetworks.load(tmp_path / "nets.safetensors")
    assert (loaded.rank, loaded.n_hidden, loaded.share, loaded.shapes) == (3, 2, False, networks.shapes)
    u, delta = torch.randn(5, 6), torch.randn(5, 4)
    torch.testing.assert_close(loaded.eval().delta("a", u, delta), networks.eval().delta("a", u, delta))
    with pytest.raises(FileNotFoundError, match=r"mend_train\.yaml"):
        MENDNetworks.load(tmp_path / "missing.safetensors")


def _networks_file(folder, tiny_llava_dir, edit_lr=0.05) -> str:
    """Untrained networks (rank 8) for the tiny model's two text edit points, saved in ``folder``."""
    model, _ = LlavaBackbone(path=str(tiny_llava_dir)).load()
    shapes = {path: tuple(model.get_submodule(path).weight.shape) for path in TEXT}
    path = folder / "mend.safetensors"
    MENDNetworks(shapes, rank=8, edit_lr=edit_lr).save(path)
    return str(path)


def test_three_edits_write_only_the_text_layers(tiny_llava_dir, monkeypatch, tmp_path):
    editor = MEND(networks=_networks_file(tmp_path, tiny_llava_dir))
    module, optimizer = _manual_module(tiny_llava_dir, editor, monkeypatch)
    assert isinstance(optimizer, MENDOptimizer)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    stream = _stream().stream
    gains = []
    for i in range(3):
        gains.append(_edit_gain(module, stream[i], i))
        assert set(module.last_diagnostics) == set(TEXT)
        assert all(d["delta_norm"] > 0 and d["rows"] > 0 for d in module.last_diagnostics.values())
    changed = {n for n, p in module.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {f"{path}.weight" for path in TEXT}
    assert all(g > 1e-3 for g in gains), gains
    networks_bytes = sum(t.numel() * t.element_size() for t in editor.networks.state_dict().values())
    assert editor.state_bytes(optimizer) == networks_bytes + sum(
        module.model.get_submodule(p).weight.numel() * 4 for p in TEXT
    )


def test_edit_state_round_trips(tiny_llava_dir, monkeypatch, tmp_path):
    networks = _networks_file(tmp_path, tiny_llava_dir)
    module, optimizer = _manual_module(tiny_llava_dir, MEND(networks=networks), monkeypatch)
    module.training_step(_stream().stream[0], 0)
    save_edit_state(module.model, optimizer, tmp_path / "state.safetensors")
    fresh, fresh_optimizer = _manual_module(tiny_llava_dir, MEND(networks=networks), monkeypatch)
    assert edit_state_dict(fresh.model, fresh_optimizer).keys() == edit_state_dict(module.model, optimizer).keys()
    load_edit_state(fresh.model, fresh_optimizer, tmp_path / "state.safetensors")
    for (name, p), q in zip(module.model.named_parameters(), fresh.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_lr_scale_multiplies_the_write_of_the_optimizer():
    torch.manual_seed(0)
    writes = {}
    for scale in (1.0, 2.5):
        linear = nn.Linear(6, 4, dtype=torch.float32)
        linear.weight.data = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 24
        linear.bias.data = torch.zeros(4)
        networks = MENDNetworks({"m": (4, 6)}, rank=3, edit_lr=0.3)
        factors = GradientFactors({"m": linear})
        optimizer = MENDOptimizer([("m", linear)], networks, factors, lr_scale=scale)
        before = linear.weight.detach().clone()
        with factors.record():
            loss = (linear(torch.linspace(-1, 1, 18).reshape(3, 6)) ** 2).sum()
        loss.backward()
        expected = -0.3 * scale * linear.weight.grad
        optimizer.step()
        writes[scale] = linear.weight.detach() - before
        torch.testing.assert_close(writes[scale], expected)  # untrained networks: a scaled gradient step
    torch.testing.assert_close(writes[2.5], 2.5 * writes[1.0])
    with pytest.raises(ValueError, match="lr_scale"):
        MEND(networks="unused.safetensors", lr_scale=0)


def test_networks_of_another_backbone_are_refused(tiny_llava_dir, tmp_path):
    path = tmp_path / "other.safetensors"
    MENDNetworks({TEXT[1]: (64, 96)}, rank=4).save(path)  # one layer: this backbone declares two
    with pytest.raises(ValueError, match="num_text_layers"):
        OnlineEditModule(LlavaBackbone(path=str(tiny_llava_dir), num_text_layers=2), MEND(networks=str(path)))


def test_added_deltas_equal_a_written_weight():
    torch.manual_seed(0)
    linear, x = nn.Linear(6, 4), torch.randn(3, 6)
    delta = torch.randn(4, 6)
    with added_deltas({"m": linear}, {"m": delta}):
        hooked = linear(x)
    written = nn.Linear(6, 4)
    written.load_state_dict({"weight": linear.weight + delta, "bias": linear.bias})
    torch.testing.assert_close(hooked, written(x))
    torch.testing.assert_close(linear(x), x @ linear.weight.T + linear.bias)  # the hook is gone


def test_a_meta_training_step_trains_the_networks_not_the_backbone(tiny_llava_dir, tmp_path):
    backbone = LlavaBackbone(path=str(tiny_llava_dir), num_text_layers=2)
    module = MENDTrainModule(backbone, out_file=str(tmp_path / "mend.safetensors"), rank=8, edit_lr=0.05, lr=1e-3)
    optimizer = module.configure_optimizers()
    backbone_before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    nets_before = {n: p.detach().clone() for n, p in module.networks.named_parameters()}
    module.log_dict = lambda *a, **k: None
    loss = module.training_step(_stream().stream[0], 0)
    loss.backward()
    optimizer.step()
    assert all(torch.equal(p, backbone_before[n]) for n, p in module.model.named_parameters())
    moved = {n for n, p in module.networks.named_parameters() if not torch.equal(p, nets_before[n])}
    assert "edit_lrs" in moved and any(n.endswith(".U") for n in moved)  # U leaves zero: the networks learn
    assert int(module.networks.nets["64x96"].count) > 0  # statistics gathered in training mode
    module.save_networks()
    assert MENDNetworks.load(tmp_path / "mend.safetensors").shapes == module.networks.shapes
