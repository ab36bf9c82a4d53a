"""LiveEdit: an edit's own query is routed to its expert and gets the new answer, an unrelated query gets no expert
and the unedited model's logits bit for bit, the hooked layer equals the dense mixture x Wᵀ + Σ g_i x A_iᵀ B_iᵀ, and
the expert memory round-trips through safetensors, single edits and a resumed stream."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from more_lightning.editors.grace import key_positions
from more_lightning.editors.liveedit import LiveEdit
from more_lightning.editors.state import edit_state_dict, load_edit_state, save_edit_state
from tests.conftest import MMEDIT
from tests.stream_helpers import stopped_and_resumed_equals_whole
from tests.test_module import _manual_module, _stream


def _logits(module, inputs):
    with torch.no_grad():
        return module.logits(inputs).clone()


def test_the_edit_query_gets_its_expert_and_unrelated_queries_none(tiny_llava_dir, monkeypatch):
    editor = LiveEdit(rank=4, lr=0.1, steps_per_edit=20, visual_threshold=0.999, text_threshold=0.999)
    module, _ = _manual_module(tiny_llava_dir, editor, monkeypatch)
    batch = _stream().stream[0]
    inputs = module.encode(batch)
    far = {name: _logits(module, inputs[name]) for name in ("t_loc", "m_loc")}
    module.training_step(batch, 0)
    own = editor.keys_of(module, inputs["edit"])
    assert editor.last_gates.tolist() == [[1.0]]  # the edit's own query: its expert, alone
    for name, before in far.items():
        keys = editor.keys_of(module, inputs[name])
        assert editor.last_gates.tolist() == [[0.0]], name  # filtered out (t_loc: no image; m_loc: another image)
        if name == "m_loc":
            cos_v = F.cosine_similarity(keys.visual, own.visual).item()
            cos_t = F.cosine_similarity(keys.text, own.text).item()
            assert cos_v < 0.999 or cos_t < 0.999
        assert torch.equal(_logits(module, inputs[name]), before), name  # locality by construction
    scores = module.evaluate(inputs, module.references(inputs), module._score_metrics())
    assert scores["rel"] == 100.0  # every target token is the argmax on the edited query
    assert len(editor.experts()["lora_A"]) == 1
    assert not any(p.requires_grad for p in module.model.parameters())  # nothing is written


def test_the_hooked_layer_equals_the_dense_mixture(tiny_llava_dir, monkeypatch):
    editor = LiveEdit(rank=3, lr=0.1, steps_per_edit=2, visual_threshold=-1.0, text_threshold=-1.0, temperature=0.5)
    module, _ = _manual_module(tiny_llava_dir, editor, monkeypatch)
    stream = _stream().stream
    for i in range(3):
        module.training_step(stream[i], i)
    linear = module.model.get_submodule(editor.path)
    seen = {}
    handle = linear.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    query = module.encode(stream[1])["m_gen"]
    try:
        _logits(module, query)
    finally:
        handle.remove()
    x = seen["x"][0].double()  # (T, d_in)
    memory = editor.experts()
    # gates by hand: cosines of the keys, every expert passes both thresholds, softmax of cos_t / temperature
    image = query.image_mask[0]
    v, t = x[image].mean(dim=0), x[int(key_positions(query)[0])]
    cos_v = [F.cosine_similarity(v, k.double(), dim=0) for k in memory["visual_keys"]]
    cos_t = torch.stack([F.cosine_similarity(t, k.double(), dim=0) for k in memory["text_keys"]])
    assert all(c >= -1.0 for c in cos_v)
    gates = torch.softmax(cos_t / 0.5, dim=0)  # (N,)
    torch.testing.assert_close(editor.last_gates[0].double(), gates, rtol=1e-5, atol=1e-6)
    dense = x @ linear.weight.double().T  # (T, d_out)
    for g, A, B in zip(gates, memory["lora_A"].double(), memory["lora_B"].double(), strict=True):
        dense = dense + g * (x @ A.T @ B.T)
    torch.testing.assert_close(seen["y"][0].double(), dense, rtol=1e-5, atol=1e-5)
    assert all(float(B.norm()) > 0 for B in memory["lora_B"])  # every expert was trained


def test_text_only_edits_route_only_text_only_queries(tiny_llava_dir, monkeypatch):
    editor = LiveEdit(visual_threshold=-1.0, text_threshold=-1.0)
    module, _ = _manual_module(tiny_llava_dir, editor, monkeypatch)
    batch = _stream().stream[0]
    inputs = module.encode(batch)
    module.training_step(batch, 0)
    image_keys = editor.keys_of(module, inputs["edit"])
    text_keys = editor.keys_of(module, inputs["t_loc"])
    memory = {**editor.experts()}
    both = {k: torch.cat([memory[k], memory[k]]) for k in memory}
    both["with_image"] = torch.tensor([True, False])
    assert editor.gates(image_keys, both).tolist() == [[1.0, 0.0]]
    assert editor.gates(text_keys, both).tolist() == [[0.0, 1.0]]


def test_memory_round_trips_through_safetensors(tiny_llava_dir, monkeypatch, tmp_path):
    make = lambda: LiveEdit(rank=2, lr=0.1, steps_per_edit=2, visual_threshold=0.5, text_threshold=0.5)  # noqa: E731
    module, optimizer = _manual_module(tiny_llava_dir, make(), monkeypatch)
    stream = _stream().stream
    sizes = []
    for i in range(3):
        module.training_step(stream[i], i)
        sizes.append(module.editor.state_bytes(optimizer))
    assert sizes[0] < sizes[1] < sizes[2]  # the memory grows with every edit
    save_edit_state(module.model, optimizer, tmp_path / "state.safetensors")
    fresh, fresh_optimizer = _manual_module(tiny_llava_dir, make(), monkeypatch)
    load_edit_state(fresh.model, fresh_optimizer, tmp_path / "state.safetensors")
    saved, loaded = edit_state_dict(module.model, optimizer), edit_state_dict(fresh.model, fresh_optimizer)
    assert saved.keys() == loaded.keys() and not any(k.startswith("param/") for k in saved)  # no weight written
    assert {k.split("/")[-1] for k in saved} == {"lora_A", "lora_B", "visual_keys", "text_keys", "with_image"}
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert fresh.editor.experts()["with_image"].dtype == torch.bool
    for name, query in module.encode(stream[1]).items():
        assert torch.equal(_logits(fresh, query), _logits(module, query)), name


def test_single_edits_start_every_edit_from_an_empty_memory(tiny_llava_dir, monkeypatch):
    module, _ = _manual_module(tiny_llava_dir, LiveEdit(steps_per_edit=1), monkeypatch, single_edits=True)
    module.training_step(_stream().stream[0], 0)
    assert module.editor.experts() == {}


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"rank": 0}, "rank must be >= 1"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"steps_per_edit": 0}, "steps_per_edit must be >= 1"),
        ({"visual_threshold": 1.5}, "visual_threshold is a cosine"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"span": "some"}, "span must be"),
    ],
)
def test_invalid_settings_are_one_clear_error(setting, message):
    with pytest.raises(ValueError, match=message):
        LiveEdit(**setting)


def test_a_layer_outside_the_edit_points_is_named(tiny_llava_dir, monkeypatch):
    with pytest.raises(ValueError, match="layer -3 is not among the backbone's 2 text edit points"):
        _manual_module(tiny_llava_dir, LiveEdit(layer=-3), monkeypatch)


def test_a_stopped_stream_resumes_to_the_whole_result(tiny_llava_dir, tmp_path):
    editor = "{rank: 2, lr: 0.1, steps_per_edit: 2, visual_threshold: 0.5, text_threshold: 0.5}"
    stopped_and_resumed_equals_whole(
        tmp_path, tiny_llava_dir, MMEDIT, "more_lightning.editors.liveedit.LiveEdit", editor
    )
