"""GRACE: an edited query (key within its radius) gets the new answer, a far query is untouched, the codebook
follows GRACE's add / expand / split rules and round-trips through safetensors, single edits and a resume."""

from __future__ import annotations

import torch

from more_lightning.editors.grace import GRACE, distances, key_positions
from more_lightning.editors.state import edit_state_dict, load_edit_state, save_edit_state
from tests.conftest import MMEDIT
from tests.stream_helpers import stopped_and_resumed_equals_whole
from tests.test_module import _manual_module, _stream


def _logits(module, inputs):
    with torch.no_grad():
        return module.logits(inputs).clone()


def test_key_position_is_the_last_prompt_position(tiny_llava_dir, monkeypatch):
    module, _ = _manual_module(tiny_llava_dir, GRACE(), monkeypatch)
    edit = module.encode(_stream().stream[0])["edit"]
    first_target = int((edit.labels[0] != -100).nonzero()[0])
    assert key_positions(edit).tolist() == [first_target - 1]  # predicts the first answer token
    prompt_only = module.backbone.encode_prompt(
        module.processor, "a question", None, module.image_token_id
    )  # no labels: its last token
    assert key_positions(prompt_only).tolist() == [prompt_only.input_ids.shape[1] - 1]


def test_edited_query_gets_the_new_answer_and_far_queries_are_exactly_unchanged(tiny_llava_dir, monkeypatch):
    module, _ = _manual_module(tiny_llava_dir, GRACE(lr=1.0, steps_per_edit=20, epsilon=1e-3), monkeypatch)
    batch = _stream().stream[0]
    inputs = module.encode(batch)
    far = {name: _logits(module, inputs[name]) for name in ("t_loc", "m_loc")}
    module.training_step(batch, 0)
    editor = module.editor
    key = editor.key_of(module, inputs["edit"])[0]
    for name, before in far.items():
        assert float((editor.key_of(module, inputs[name])[0] - key).norm()) > 1e-3  # outside the ball
        assert torch.equal(_logits(module, inputs[name]), before), name  # locality by construction
    scores = module.evaluate(inputs, module.references(inputs), module._score_metrics())
    assert scores["rel"] == 100.0  # every target token is the argmax on the edited query
    assert len(editor.codebook()["keys"]) == 1 and editor.labels() == [batch.edit.target]
    assert not any(p.requires_grad for p in module.model.parameters())  # nothing is written


def test_codebook_adds_expands_and_splits(tiny_llava_dir, monkeypatch):
    module, _ = _manual_module(tiny_llava_dir, GRACE(lr=1.0, steps_per_edit=1, epsilon=1e6), monkeypatch)
    stream = _stream().stream
    editor = module.editor
    module.training_step(stream[0], 0)
    assert editor.codebook()["eps"].tolist() == [1e6]
    module.training_step(stream[0], 1)  # the same key and label: entry 0 is reused
    assert editor.codebook()["eps"].tolist() == [1e6]
    keys = [editor.key_of(module, module.encode(stream[i])["edit"])[0] for i in (0, 1)]
    assert stream[1].edit.target != stream[0].edit.target
    module.training_step(stream[1], 2)  # another label within ε_0 + ε_init: both balls shrink to d/2
    d = float((keys[1] - keys[0]).norm())
    torch.testing.assert_close(editor.codebook()["eps"], torch.tensor([d / 2, d / 2]))
    assert editor.labels() == [stream[0].edit.target, stream[1].edit.target]


def test_codebook_round_trips_through_safetensors(tiny_llava_dir, monkeypatch, tmp_path):
    make = lambda: GRACE(lr=1.0, steps_per_edit=3, epsilon=5.0)  # noqa: E731
    module, optimizer = _manual_module(tiny_llava_dir, make(), monkeypatch)
    stream = _stream().stream
    for i in range(3):
        module.training_step(stream[i], i)
    save_edit_state(module.model, optimizer, tmp_path / "state.safetensors")
    fresh, fresh_optimizer = _manual_module(tiny_llava_dir, make(), monkeypatch)
    load_edit_state(fresh.model, fresh_optimizer, tmp_path / "state.safetensors")
    saved, loaded = edit_state_dict(module.model, optimizer), edit_state_dict(fresh.model, fresh_optimizer)
    assert saved.keys() == loaded.keys() and {k.split("/")[-1] for k in saved} >= {"keys", "values", "eps"}
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert fresh.editor.labels() == module.editor.labels()
    for name, query in module.encode(stream[1]).items():
        assert torch.equal(_logits(fresh, query), _logits(module, query)), name


def test_single_edits_start_every_edit_from_an_empty_codebook(tiny_llava_dir, monkeypatch):
    module, _ = _manual_module(tiny_llava_dir, GRACE(steps_per_edit=1), monkeypatch, single_edits=True)
    module.training_step(_stream().stream[0], 0)
    assert module.editor.codebook() == {}


def test_a_stopped_stream_resumes_to_the_whole_result(tiny_llava_dir, tmp_path):
    editor = "{lr: 1.0, steps_per_edit: 2, epsilon: 5.0}"
    stopped_and_resumed_equals_whole(tmp_path, tiny_llava_dir, MMEDIT, "more_lightning.editors.grace.GRACE", editor)


def test_an_expanded_ball_holds_its_key_as_a_batched_forward_sees_it(tiny_llava_dir, monkeypatch):
    module, _ = _manual_module(tiny_llava_dir, GRACE(lr=1.0, steps_per_edit=1, epsilon=1.0), monkeypatch)
    batch, editor = _stream().stream[0], module.editor
    module.training_step(batch, 0)
    key = editor.key_of(module, module.encode(batch)["edit"])[0]
    book = editor.optimizer.memory
    offset = torch.zeros_like(key)
    offset[0] = 0.75  # entry 0 now sits 0.75 from the edit's key, with radius 0.5 < 0.75 <= 0.5 + ε_init
    book["keys"], book["eps"] = book["keys"] + offset, torch.tensor([0.5])
    before = book["values"].clone()
    module.training_step(batch, 1)  # the same label: expand entry 0 to the key, plus the tolerance
    d = float(torch.linalg.vector_norm(key + offset - key))
    assert float(editor.codebook()["eps"][0]) >= d + 1e-4 * float(key.norm())
    assert not torch.equal(editor.codebook()["values"], before)  # the batched edit query reached the entry


def test_distances_are_exact_beyond_25_rows():
    torch.manual_seed(0)
    book = torch.randn(40, 64) * 30
    keys = book[[3, 17, 39]].clone()
    torch.testing.assert_close(distances(keys, book)[[0, 1, 2], [3, 17, 39]], torch.zeros(3), rtol=0, atol=0)
    torch.testing.assert_close(distances(keys, book), torch.linalg.vector_norm(keys[:, None] - book[None], dim=-1))
