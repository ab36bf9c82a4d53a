"""M-ORE's closed forms against dense reference solves (DESIGN §1, paper eq. 10–13)."""

import pytest
import torch
from torch import nn

from more_lightning.adapters.low_rank import LowRankLinear
from more_lightning.editors.more import MOREOptimizer, MORESettings, closed_form_write, sherman_morrison


def _adapter(d_in=24, d_out=10, r=6, seed=0, freeze_A=True):
    return LowRankLinear(nn.Linear(d_in, d_out), r=r, alpha=2 * r, seed=seed, freeze_A=freeze_A)


def _dense_P(Z: torch.Tensor, lam: float, prior: str) -> torch.Tensor:
    r = Z.shape[1]
    S = Z.T @ Z
    eye = torch.eye(r, dtype=torch.float64)
    if prior == "paper":  # P = (I + S)^{-1}, S_0 = λ I
        return torch.linalg.inv(eye + lam * eye + S)
    return lam * torch.linalg.inv(lam * eye + S)  # public code: P = λ (λ I + S)^{-1}


@pytest.mark.parametrize("prior", ["paper", "public"])
def test_P_after_1000_rank_one_updates_is_the_dense_inverse(prior):
    lam, r = 5.0, 12
    offset = 1.0 if prior == "paper" else lam
    P = torch.eye(r, dtype=torch.float64) / (1 + lam) if prior == "paper" else torch.eye(r, dtype=torch.float64)
    Z = torch.randn(1000, r, dtype=torch.float64)
    for z in Z:
        P = sherman_morrison(P, z, offset)
    dense = _dense_P(Z, lam, prior)
    assert (torch.linalg.norm(P - dense) / torch.linalg.norm(dense)) <= 1e-5


def test_write_minimises_eq_11():
    """ΔB = -η G (I+S)^{-1} zeroes the gradient of ‖ΔB + ηG‖² + Tr(ΔB S ΔBᵀ)."""
    r, d_out, eta = 6, 9, 0.3
    Z = torch.randn(20, r, dtype=torch.float64)
    S = 2.0 * torch.eye(r, dtype=torch.float64) + Z.T @ Z
    G = torch.randn(d_out, r, dtype=torch.float64)
    delta = closed_form_write(G, torch.linalg.inv(torch.eye(r, dtype=torch.float64) + S), eta)
    grad = 2 * (delta + eta * G) + 2 * delta @ S
    assert grad.abs().max() < 1e-10
    d = delta.clone().requires_grad_(True)
    objective = (d + eta * G).pow(2).sum() + torch.trace(d @ S @ d.T)
    (auto,) = torch.autograd.grad(objective, d)
    assert auto.abs().max() < 1e-10


def _one_edit(opt, adapter, name, keys, grad):
    opt.observe({name: keys})
    adapter.lora_B.grad = grad.clone().float()
    opt.step()
    opt.end_edit()


@pytest.mark.parametrize("prior", ["paper", "public"])
@pytest.mark.parametrize("write_with", ["current", "previous"])
def test_stream_of_writes_matches_dense_reference(prior, write_with):
    lam, eta, T = 3.0, 0.2, 6
    adapter = _adapter()
    opt = MOREOptimizer([("m", adapter, "text")], MORESettings(eta=eta, lam=lam, prior=prior, write_with=write_with))
    A = adapter.lora_A.double()
    keys = [torch.randn(4, 24) for _ in range(T)]
    grads = [torch.randn(10, 6, dtype=torch.float64) for _ in range(T)]
    B_ref = torch.zeros(10, 6, dtype=torch.float64)
    for t in range(T):
        _one_edit(opt, adapter, "m", keys[t], grads[t])
        upto = t + 1 if write_with == "current" else t
        Z = torch.stack([(k.double().mean(0) @ A.T) for k in keys[:upto]]) if upto else torch.zeros(0, 6).double()
        B_ref = B_ref - eta * grads[t] @ _dense_P(Z, lam, prior)
    torch.testing.assert_close(adapter.lora_B.double(), B_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        opt.state[adapter.lora_B]["P"],
        _dense_P(torch.stack([k.double().mean(0) @ A.T for k in keys]), lam, prior),
        atol=1e-10,
        rtol=1e-8,
    )


def test_pool_false_feeds_every_key_row():
    lam = 2.0
    adapter = _adapter()
    opt = MOREOptimizer([("m", adapter, "text")], MORESettings(lam=lam, pool=False))
    keys = torch.randn(5, 24)
    opt.observe({"m": keys})
    Z = keys.double() @ adapter.lora_A.double().T
    torch.testing.assert_close(opt.state[adapter.lora_B]["P"], _dense_P(Z, lam, "paper"), atol=1e-10, rtol=1e-8)


def test_projector_statistics_never_touch_text_P_and_vice_versa():
    text, proj = _adapter(seed=1), _adapter(seed=2)
    opt = MOREOptimizer([("text", text, "text"), ("proj", proj, "image")], MORESettings(lam=1.0, image_lam=50.0))
    opt.observe({"proj": 100 * torch.randn(9, 24)})
    assert torch.equal(opt.state[text.lora_B]["P"], torch.eye(6, dtype=torch.float64) / 2.0)
    proj_P = opt.state[proj.lora_B]["P"].clone()
    opt.observe({"text": torch.randn(3, 24)})
    assert torch.equal(opt.state[proj.lora_B]["P"], proj_P)
    assert opt.param_groups[1]["lam"] == 50.0 and opt.param_groups[0]["lam"] == 1.0


def test_lora_ft_is_plain_gradient_step():
    adapter = _adapter()
    opt = MOREOptimizer([("m", adapter, "text")], MORESettings(eta=0.5, precondition=False))
    g = torch.randn(10, 6)
    _one_edit(opt, adapter, "m", torch.randn(2, 24), g.double())
    torch.testing.assert_close(adapter.lora_B, -0.5 * g)


def test_top_k_writes_only_largest_gradients():
    adapters = [_adapter(seed=i) for i in range(3)]
    opt = MOREOptimizer([(f"m{i}", a, "text") for i, a in enumerate(adapters)], MORESettings(top_k=2, lam=1.0))
    for scale, a in zip([1.0, 10.0, 5.0], adapters, strict=True):
        a.lora_B.grad = scale * torch.ones(10, 6)
    opt.step()
    assert adapters[0].lora_B.abs().sum() == 0
    assert adapters[1].lora_B.abs().sum() > 0 and adapters[2].lora_B.abs().sum() > 0


def test_freeze_A_false_moves_A():
    adapter = _adapter(freeze_A=False)
    opt = MOREOptimizer([("m", adapter, "text")], MORESettings(lam=1.0))
    a0 = adapter.lora_A.detach().clone()
    adapter.lora_B.grad = torch.randn(10, 6)
    adapter.lora_A.grad = torch.randn(6, 24)
    opt.step()
    assert not torch.equal(adapter.lora_A.detach(), a0)


def test_state_dict_round_trips_exactly():
    torch.manual_seed(0)
    a1, a2 = _adapter(), _adapter()
    o1 = MOREOptimizer([("m", a1, "text")], MORESettings(lam=2.0))
    for _ in range(3):
        _one_edit(o1, a1, "m", torch.randn(3, 24), torch.randn(10, 6, dtype=torch.float64))
    o2 = MOREOptimizer([("m", a2, "text")], MORESettings(lam=2.0))
    o2.load_state_dict(o1.state_dict())
    with torch.no_grad():
        a2.lora_B.copy_(a1.lora_B)
    assert torch.equal(o2.state[a2.lora_B]["P"], o1.state[a1.lora_B]["P"])
    k, g = torch.randn(3, 24), torch.randn(10, 6, dtype=torch.float64)
    _one_edit(o1, a1, "m", k, g)
    _one_edit(o2, a2, "m", k, g)
    assert torch.equal(a1.lora_B, a2.lora_B)
    assert int(o2.state[a2.lora_B]["num_writes"]) == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eta": 0}, "eta"),
        ({"lam": -1}, "lam"),
        ({"prior": "x"}, "prior"),
        ({"write_with": "x"}, "write_with"),
        ({"top_k": 0}, "top_k"),
    ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MOREOptimizer([("m", _adapter(), "text")], MORESettings(**kwargs))


@pytest.mark.parametrize("prior", ["paper", "public"])
@pytest.mark.parametrize("write_with", ["current", "previous"])
def test_write_diagnostics_match_a_dense_computation(prior, write_with):
    import math

    lam, eta, steps = 4.0, 0.3, 2
    adapter = _adapter()
    opt = MOREOptimizer([("m", adapter, "text")], MORESettings(eta=eta, lam=lam, prior=prior, write_with=write_with))
    A = adapter.lora_A.double()
    history = [torch.randn(3, 24) for _ in range(5)]
    for keys in history[:-1]:
        _one_edit(opt, adapter, "m", keys, torch.randn(10, 6, dtype=torch.float64))
    keys = history[-1]
    grads = [torch.randn(10, 6, dtype=torch.float64) for _ in range(steps)]
    B_before = adapter.lora_B.detach().double().clone()
    opt.observe({"m": keys})
    P_write = opt.state[adapter.lora_B]["P"].clone()  # P_t (current) or P_{t-1} (previous)
    for g in grads:
        adapter.lora_B.grad = g.clone().float()
        opt.step()
    opt.end_edit()
    diag = opt.edit_diagnostics()["m"]

    z = keys.double().mean(0) @ A.T
    G = grads[0].float().double()
    assert diag["z_sq"] == pytest.approx(float(z @ z), rel=1e-6)
    assert diag["z_sq_over_lam"] == pytest.approx(float(z @ z) / lam, rel=1e-6)
    assert diag["grad_norm"] == pytest.approx(float(torch.linalg.norm(G)), rel=1e-6)
    share = 1 - float(torch.linalg.norm(G @ P_write)) / float(torch.linalg.norm(G))
    assert diag["removed_share"] == pytest.approx(share, rel=1e-6, abs=1e-9)
    assert diag["delta_norm"] == pytest.approx(float(torch.linalg.norm(adapter.lora_B.double() - B_before)), rel=1e-4)
    Z = torch.stack([k.double().mean(0) @ A.T for k in history])
    s = torch.linalg.eigvalsh(Z.T @ Z).clamp_min(0)  # dense S = Σ z zᵀ, never formed by the optimizer
    assert diag["s_max"] == pytest.approx(float(s.max()), rel=1e-6)
    assert diag["s_above_lam"] == float((s > lam).sum())
    p = s[s > 1e-9 * s.max()] / s.sum()
    assert diag["effective_rank"] == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-4)
    assert 1 <= diag["effective_rank"] <= 5  # five pooled keys span at most five directions


def test_lora_ft_and_unwritten_modules_report_plain_steps():
    text, proj = _adapter(seed=1), _adapter(seed=2)
    opt = MOREOptimizer([("text", text, "text"), ("proj", proj, "image")], MORESettings(eta=0.5, precondition=False))
    opt.observe({})
    text.lora_B.grad = torch.randn(10, 6)
    opt.step()
    opt.end_edit()
    diag = opt.edit_diagnostics()
    assert diag["text"]["removed_share"] == pytest.approx(0.0, abs=1e-7)
    assert diag["text"]["delta_norm"] == pytest.approx(0.5 * float(text.lora_B.grad.norm()), rel=1e-5)
    assert diag["proj"] == {"delta_norm": 0.0}  # no gradient, no write, no statistics


@pytest.mark.parametrize("offset", [1.0, 7.0])
def test_woodbury_block_update_equals_sequential_sherman_morrison_and_the_dense_inverse(offset):
    from more_lightning.editors.more import woodbury

    r = 10
    P0 = torch.eye(r, dtype=torch.float64) / 3.0
    Z = torch.randn(13, r, dtype=torch.float64) * 4
    sequential = P0
    for z in Z:
        sequential = sherman_morrison(sequential, z, offset)
    block = woodbury(P0, Z, offset)
    dense = torch.linalg.inv(torch.linalg.inv(P0) + Z.T @ Z / offset)  # (P0⁻¹ + ZᵀZ / c)⁻¹
    torch.testing.assert_close(block, sequential, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(block, dense, atol=1e-12, rtol=1e-10)
