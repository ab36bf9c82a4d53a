"""AlphaEdit's closed form against a dense least-squares solve, its null-space invariance, and its state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from more_lightning.backbones.llava import LlavaBackbone
from more_lightning.editors.alphaedit import AlphaEdit, AlphaEditOptimizer, null_space_projector, null_space_write
from more_lightning.editors.state import edit_state_dict, load_edit_state, save_edit_state
from more_lightning.module import OnlineEditModule
from tests.conftest import MMEDIT
from tests.test_module import ALPHAEDIT_RETAIN, _manual_module, _stream

D, D_OUT = 12, 7


def _low_rank_keys(n: int, rank: int) -> torch.Tensor:
    """(n, D) float64 retain keys spanning exactly ``rank`` dimensions."""
    return torch.randn(n, rank, dtype=torch.float64) @ torch.randn(rank, D, dtype=torch.float64)


def _dense_reference(R, K, P, Kp, l2):
    """argmin over D of ‖D P Kᵀ − Rᵀ‖² + l2 ‖D P‖² + ‖D P Kpᵀ‖² by one stacked least-squares solve; returns D P."""
    design = P @ torch.cat([K.T, l2**0.5 * torch.eye(D, dtype=K.dtype), Kp.T], dim=1)  # (D, n + D + p)
    target = torch.cat([R.T, torch.zeros(D_OUT, D + Kp.shape[0], dtype=K.dtype)], dim=1)  # (D_OUT, n + D + p)
    solution = torch.linalg.lstsq(design.T, target.T, driver="gelsd").solution  # (D, D_OUT) = Dᵀ
    return solution.T @ P


def test_projector_spans_exactly_the_null_space_of_the_retain_keys():
    K0 = _low_rank_keys(40, rank=8)
    P = null_space_projector(K0.T @ K0 / 40, threshold=1e-8)
    torch.testing.assert_close(P @ P, P)  # a projector
    assert round(float(torch.trace(P))) == D - 8
    assert (K0 @ P).abs().max() < 1e-10  # P k0 = 0 for every retain key


@pytest.mark.parametrize("l2", [0.3, 10.0])
def test_write_is_the_dense_least_squares_solution(l2):
    K0 = _low_rank_keys(30, rank=7)
    P = null_space_projector(K0.T @ K0 / 30, threshold=1e-8)
    K, R, Kp = torch.randn(4, D, dtype=torch.float64), torch.randn(4, D_OUT, dtype=torch.float64), _low_rank_keys(6, 6)
    delta = null_space_write(R, K, P, Kp.T @ Kp, l2)
    torch.testing.assert_close(delta, _dense_reference(R, K, P, Kp, l2), atol=1e-9, rtol=1e-8)
    assert (delta @ K0.T).abs().max() < 1e-10  # retain keys' outputs do not move
    without = null_space_write(R, K, torch.eye(D, dtype=torch.float64), torch.zeros(D, D, dtype=torch.float64), l2)
    assert (without @ K0.T).abs().max() > 1e-3  # the projection is what keeps them (the check can fail)


def test_stream_of_writes_keeps_retain_keys_and_accumulates_edited_keys():
    torch.manual_seed(0)
    linear = nn.Linear(D, D_OUT, dtype=torch.float64)
    K0 = _low_rank_keys(50, rank=9)
    opt = AlphaEditOptimizer([("m", linear)], value_lr=0.5, l2=1.0, nullspace_threshold=1e-8, stats_dtype=torch.float64)
    opt.set_retain_keys({"m": K0.T @ K0 / 50})
    W0 = linear.weight.detach().clone()
    keys, C = [], torch.zeros(D, D, dtype=torch.float64)
    for _ in range(3):
        K, G = torch.randn(5, D, dtype=torch.float64), torch.randn(D_OUT, D, dtype=torch.float64)
        P = opt.state[linear.weight]["P"]
        expected = linear.weight.detach() + null_space_write(-0.5 * K @ G.T, K, P, C, 1.0)
        opt.observe({"m": K})
        linear.weight.grad = G
        opt.step()
        opt.end_edit()
        torch.testing.assert_close(linear.weight.detach(), expected)
        keys.append(K)
        C = C + K.T @ K
    torch.testing.assert_close(opt.state[linear.weight]["C"], C)
    assert int(opt.state[linear.weight]["num_keys"]) == 15
    assert ((linear.weight.detach() - W0) @ K0.T).abs().max() < 1e-9  # K0ᵀ-side invariance over the stream


def _editor(**kwargs) -> AlphaEdit:
    return AlphaEdit(**{**ALPHAEDIT_RETAIN, "value_lr": 1.0, "l2": 1.0, **kwargs})


def test_retain_keys_come_from_every_position_of_both_train_files(tiny_llava_dir, monkeypatch):
    module, optimizer = _manual_module(tiny_llava_dir, _editor(), monkeypatch)
    queries = module.editor.retain_queries()
    assert len(queries) == 2 * 2 * 2  # two files x two records x (question + answer, text locality)
    assert sum(q.image is not None for q in queries) == 4
    covariances = module.editor.retain_covariances(module)
    rows = sum(int(module.encode_query(q).attention_mask.sum()) for q in queries)
    name = "model.language_model.layers.1.mlp.down_proj"
    capture = {}
    handle = module.model.get_submodule(name).register_forward_hook(
        lambda m, args, out: capture.setdefault("rows", []).append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        for q in queries:
            module.logits(module.encode_query(q))
    handle.remove()
    K0 = torch.cat(capture["rows"]).double()  # every position: text and image
    assert K0.shape[0] == rows
    torch.testing.assert_close(covariances[name], K0.T @ K0 / rows)
    P = optimizer.state[module.model.get_submodule(name).weight]["P"]
    torch.testing.assert_close(P, null_space_projector(K0.T @ K0 / rows, 2e-2).float(), atol=1e-5, rtol=1e-5)


def test_three_edits_write_only_the_text_ffns_and_state_round_trips(tiny_llava_dir, monkeypatch, tmp_path):
    module, optimizer = _manual_module(tiny_llava_dir, _editor(steps_per_edit=2), monkeypatch)
    stream = _stream().stream
    for i in range(3):
        module.training_step(stream[i], i)
    names = list(module.editor.written_modules())
    assert names == ["model.language_model.layers.0.mlp.down_proj", "model.language_model.layers.1.mlp.down_proj"]
    assert all(float(module.editor.delta_weight(n).norm()) > 0 for n in names)
    assert {n for n, p in module.model.named_parameters() if p.requires_grad} == {f"{n}.weight" for n in names}
    diag = module.last_diagnostics[names[0]]
    assert diag["delta_norm"] > 0 and diag["num_keys"] > 0 and 0 < diag["nullspace_dim"] <= 96
    save_edit_state(module.model, optimizer, tmp_path / "state.safetensors")
    fresh, fresh_optimizer = _manual_module(tiny_llava_dir, _editor(steps_per_edit=2), monkeypatch)
    load_edit_state(fresh.model, fresh_optimizer, tmp_path / "state.safetensors")
    saved, loaded = edit_state_dict(module.model, optimizer), edit_state_dict(fresh.model, fresh_optimizer)
    assert saved.keys() == loaded.keys() and any(k.endswith("/C") for k in saved)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_statistics_keep_their_dtype_through_a_checkpoint():
    linear = nn.Linear(D, D_OUT).to(torch.bfloat16)
    opt = AlphaEditOptimizer([("m", linear)], value_lr=1.0, l2=1.0, nullspace_threshold=1e-2)
    opt.state[linear.weight]["C"] += 1.0
    other = AlphaEditOptimizer([("m", linear)], value_lr=1.0, l2=1.0, nullspace_threshold=1e-2)
    other.load_state_dict(opt.state_dict())
    assert other.state[linear.weight]["C"].dtype == torch.float32  # torch alone would cast it to bfloat16
    assert torch.equal(other.state[linear.weight]["C"], opt.state[linear.weight]["C"])


def test_missing_retain_file_names_the_setting(tiny_llava_dir):
    editor = _editor(retain_files=[str(MMEDIT / "nope.json")])
    with pytest.raises(FileNotFoundError, match="retain_files"):
        OnlineEditModule(LlavaBackbone(path=str(tiny_llava_dir), num_text_layers=2), editor).configure_optimizers()
    with pytest.raises(ValueError, match="l2"):
        _editor(l2=0)
