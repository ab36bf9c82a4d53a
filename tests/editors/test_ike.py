"""IKE: retrieval by cosine similarity (against a numpy reference), the rewritten prompt the model is asked, the
edit memory round-tripping through safetensors, single edits and a resume; the model is never written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from more_lightning.data.records import Query
from more_lightning.editors.ike import IKE, retrieve
from more_lightning.editors.memory import MemoryOptimizer
from more_lightning.editors.state import (
    edit_state_dict,
    load_edit_state,
    save_edit_state,
    texts_from_tensors,
    texts_to_tensors,
)
from tests.conftest import MMEDIT
from tests.stream_helpers import stopped_and_resumed_equals_whole
from tests.test_module import _manual_module, _stream

TEMPLATE = "{prompt} {target} . "


def _numpy_order(memory: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    sims = memory @ query / (np.linalg.norm(memory, axis=1) * np.linalg.norm(query))
    return list(np.argsort(-sims, kind="stable")[:k][::-1])  # the k most similar, ascending: the best last


@pytest.mark.parametrize("k", [1, 3, 10])
def test_retrieval_order_matches_a_numpy_reference(k):
    rng = np.random.default_rng(0)
    memory, query = rng.normal(size=(7, 16)), rng.normal(size=16)
    got = retrieve(torch.tensor(memory, dtype=torch.float32), torch.tensor(query, dtype=torch.float32), k)
    assert got == _numpy_order(memory, query, k)


def test_texts_round_trip_as_bytes():
    texts = ["Röntgen", "", "a\nb", "what colour?"]
    data, ends = texts_to_tensors(texts)
    assert data.dtype == torch.uint8 and texts_from_tensors(data, ends) == texts
    assert texts_from_tensors(data.float(), ends.float()) == texts  # as Optimizer.load_state_dict casts them


def _edited(tiny_llava_dir, monkeypatch, k=2, **kwargs):
    module, optimizer = _manual_module(tiny_llava_dir, IKE(k=k, demo_template=TEMPLATE), monkeypatch, **kwargs)
    stream = _stream().stream
    return module, optimizer, stream


def test_the_model_is_asked_the_prompt_with_demonstrations_in_ascending_similarity(tiny_llava_dir, monkeypatch):
    module, _, stream = _edited(tiny_llava_dir, monkeypatch)
    query = stream[1].t_gen
    assert module.editor.rewrite_query(query, module) is query  # empty memory: the query as it is
    weights = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    for i in range(3):
        module.training_step(stream[i], i)
    assert all(torch.equal(p, weights[n]) for n, p in module.model.named_parameters())  # nothing is written
    entries = module.editor.entries()
    assert entries == [(b.edit.prompt, b.edit.target) for b in (stream[i] for i in range(3))]
    embeddings = np.stack([module.editor.embed(p, module).numpy() for p, _ in entries])
    order = _numpy_order(embeddings, module.editor.embed(query.prompt, module).numpy(), 2)
    rewritten = module.editor.rewrite_query(query, module)
    expected = "".join(TEMPLATE.format(prompt=entries[i][0], target=entries[i][1]) for i in order) + query.prompt
    assert rewritten == Query(expected, query.target, query.image)
    assert order[-1] == 1  # its own edit's prompt (a rephrase of it) is the most similar: next to the query
    plain = module.backbone.encode(module.processor, query, module.image_token_id)
    assert module.encode_query(query).input_ids.shape[1] > plain.input_ids.shape[1]  # what the model is asked


def test_memory_round_trips_through_safetensors(tiny_llava_dir, monkeypatch, tmp_path):
    module, optimizer, stream = _edited(tiny_llava_dir, monkeypatch)
    for i in range(3):
        module.training_step(stream[i], i)
    save_edit_state(module.model, optimizer, tmp_path / "state.safetensors")
    fresh, fresh_optimizer, _ = _edited(tiny_llava_dir, monkeypatch)
    load_edit_state(fresh.model, fresh_optimizer, tmp_path / "state.safetensors")
    saved, loaded = edit_state_dict(module.model, optimizer), edit_state_dict(fresh.model, fresh_optimizer)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert fresh.editor.entries() == module.editor.entries()
    for query in stream[2].queries().values():
        assert fresh.editor.rewrite_query(query, fresh) == module.editor.rewrite_query(query, module)
        with torch.no_grad():
            assert torch.equal(fresh.logits(fresh.encode_query(query)), module.logits(module.encode_query(query)))


def test_single_edits_start_every_edit_from_an_empty_memory(tiny_llava_dir, monkeypatch):
    module, _, stream = _edited(tiny_llava_dir, monkeypatch, single_edits=True)
    module.training_step(stream[0], 0)
    assert module.editor.entries() == []


def test_a_stopped_stream_resumes_to_the_whole_result(tiny_llava_dir, tmp_path):
    editor = '{k: 2, demo_template: "{prompt} {target} . "}'
    stopped_and_resumed_equals_whole(tmp_path, tiny_llava_dir, MMEDIT, "more_lightning.editors.ike.IKE", editor)


def test_memory_texts_follow_every_write_of_the_state():

    optimizer = MemoryOptimizer(torch.nn.Parameter(torch.zeros(0)))
    assert optimizer.entries() == []
    optimizer.append("q1", "a1", torch.ones(3))
    optimizer.append("q2", "a2", torch.zeros(3))
    assert optimizer.entries() == [("q1", "a1"), ("q2", "a2")]
    saved = {k: v.clone() for k, v in optimizer.memory.items()}
    optimizer.append("q3", "a3", torch.ones(3))
    optimizer.memory.update(saved)  # a reload in place (the live service, single edits): the older texts again
    assert optimizer.entries() == [("q1", "a1"), ("q2", "a2")]
    optimizer.state.clear()
    assert optimizer.entries() == []
