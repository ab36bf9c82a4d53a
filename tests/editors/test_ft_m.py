"""FT-M writes only the vision-side module, resets Adam per edit, and its state round-trips."""

from __future__ import annotations

import pytest
import torch

from more_lightning.backbones.blip2 import Blip2Backbone
from more_lightning.backbones.llava import LlavaBackbone
from more_lightning.editors.ft_m import FTM
from more_lightning.editors.state import edit_state_dict, load_edit_state, save_edit_state
from more_lightning.module import OnlineEditModule
from tests.test_module import _edit_gain, _manual_module, _stream
from tests.tiny_models import save_tiny_blip2

PROJECTOR = "model.multi_modal_projector."


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


def test_three_edits_write_only_the_projector_and_leave_text_queries_exact(tiny_llava_dir, monkeypatch):
    module, optimizer = _manual_module(tiny_llava_dir, FTM(lr=1e-2, steps_per_edit=2), monkeypatch)
    stream = _stream().stream
    before = _snapshot(module)
    t_loc = module.encode(stream[0])["t_loc"]
    with torch.no_grad():
        text_logits = module.logits(t_loc).clone()
    gains = []
    for i in range(3):
        gains.append(_edit_gain(module, stream[i], i))
        assert not optimizer.state  # a fresh Adam at every edit
    after = _snapshot(module)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n for n in before if n.startswith(PROJECTOR)}  # every projector parameter, nothing else
    assert {n for n, p in module.model.named_parameters() if p.requires_grad} == changed
    assert all(g > 1e-3 for g in gains)
    with torch.no_grad():
        assert torch.equal(module.logits(t_loc), text_logits)  # the language model is untouched: T-Loc exact
    linear = PROJECTOR + "linear_1"
    delta = module.editor.delta_weight(linear)
    torch.testing.assert_close(delta, after[linear + ".weight"] - before[linear + ".weight"])


def test_state_round_trips_through_safetensors(tiny_llava_dir, monkeypatch, tmp_path):
    module, optimizer = _manual_module(tiny_llava_dir, FTM(lr=1e-2, steps_per_edit=2), monkeypatch)
    module.training_step(_stream().stream[0], 0)
    save_edit_state(module.model, optimizer, tmp_path / "state.safetensors")
    fresh, fresh_optimizer = _manual_module(tiny_llava_dir, FTM(lr=1e-2, steps_per_edit=2), monkeypatch)
    assert edit_state_dict(fresh.model, fresh_optimizer).keys() == edit_state_dict(module.model, optimizer).keys()
    load_edit_state(fresh.model, fresh_optimizer, tmp_path / "state.safetensors")
    for (name, p), q in zip(module.model.named_parameters(), fresh.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_blip2_tunes_the_projection_and_the_qformer_when_asked(tmp_path, monkeypatch):
    folder = save_tiny_blip2(tmp_path / "blip2")
    backbone = Blip2Backbone(path=str(folder), num_text_layers=1)
    module = OnlineEditModule(backbone, FTM(lr=1e-2, steps_per_edit=1, modules=["language_projection", "qformer"]))
    tuned = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert tuned == {
        n for n, _ in module.model.named_parameters() if n.startswith(("language_projection.", "qformer."))
    }
    assert "language_projection" in module.editor.written_modules()
    assert any(name.startswith("qformer.") for name in module.editor.written_modules())
    default = OnlineEditModule(backbone, FTM())
    assert {n for n, p in default.model.named_parameters() if p.requires_grad} == {
        "language_projection.weight",
        "language_projection.bias",
    }


def test_a_module_that_does_not_exist_names_the_setting(tiny_llava_dir):
    with pytest.raises(ValueError, match="editor's `modules`"):
        OnlineEditModule(LlavaBackbone(path=str(tiny_llava_dir), num_text_layers=2), FTM(modules=["model.nope"]))
    with pytest.raises(ValueError, match="lr"):
        FTM(lr=0)
