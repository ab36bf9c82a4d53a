"""SERAC: an in-scope query is rewritten and answered with the adapters on, an out-of-scope one is untouched (its
logits are the base model's, bit for bit); the memory round-trips through safetensors; the networks file's errors;
the training run writes a file a stream loads; a short stream stops and resumes to the whole result."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cli
from more_lightning.backbones.llava import LlavaBackbone
from more_lightning.data.records import Query
from more_lightning.editors.serac import SERAC, SERACNetworks, prompt_lengths
from more_lightning.editors.state import edit_state_dict, load_edit_state, read_metadata, save_edit_state
from tests.conftest import MMEDIT
from tests.stream_helpers import stopped_and_resumed_equals_whole
from tests.test_module import _manual_module, _stream

ADAPTED = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def write_networks(model_dir: Path, path: Path, seed: int = 0) -> Path:
    """Random SERAC networks for the tiny LLaVA in ``model_dir``: the classifier on the last layer's down_proj input,
    adapters with a non-zero ``lora_B`` (so the counterfactual differs from the base model)."""
    model, _ = LlavaBackbone(path=str(model_dir), num_text_layers=2).load()
    n = model.config.text_config.num_hidden_layers
    modules = [f"model.language_model.layers.{i}.{m}" for i in range(n) for m in ADAPTED]
    shapes = {p: tuple(model.get_submodule(p).weight.shape) for p in modules}
    feature = model.get_submodule(f"model.language_model.layers.{n - 1}.mlp.down_proj")
    networks = SERACNetworks(feature_path=f"model.language_model.layers.{n - 1}.mlp.down_proj",
                             feature_width=feature.in_features, adapter_shapes=shapes, dim=16, seed=seed)  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in networks.adapters.lora_B.values():
            b.copy_(torch.randn(b.shape, generator=generator) * 0.5)
    networks.save(path)
    return path


@pytest.fixture(scope="module")
def networks_file(tiny_llava_dir, tmp_path_factory) -> Path:
    return write_networks(tiny_llava_dir, tmp_path_factory.mktemp("serac") / "serac.safetensors")


def _logits(module, inputs):
    with torch.no_grad():
        return module.logits(inputs).clone()


def _edited(tiny_llava_dir, networks_file, monkeypatch, threshold=0.99, **kwargs):
    module, optimizer = _manual_module(tiny_llava_dir, SERAC(str(networks_file), threshold), monkeypatch, **kwargs)
    return module, optimizer, _stream().stream


def test_prompt_lengths_end_before_the_first_label(tiny_llava_dir, networks_file, monkeypatch):
    module, _, stream = _edited(tiny_llava_dir, networks_file, monkeypatch)
    edit = module.backbone.encode(module.processor, stream[0].edit, module.image_token_id)
    prompt = module.backbone.encode_prompt(module.processor, stream[0].edit.prompt, stream[0].edit.image, 4)
    assert prompt_lengths(edit).tolist() == [prompt.input_ids.shape[1]] == prompt_lengths(prompt).tolist()


def test_in_scope_queries_are_routed_and_out_of_scope_ones_are_the_base_models(
    tiny_llava_dir, networks_file, monkeypatch
):
    module, _, stream = _edited(tiny_llava_dir, networks_file, monkeypatch)
    plain, _ = LlavaBackbone(path=str(tiny_llava_dir), num_text_layers=2).load()  # no hooks: the base model
    batch = stream[0]
    assert module.editor.rewrite_query(batch.edit, module) is batch.edit  # empty memory: asked as it is
    weights = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    module.training_step(batch, 0)
    assert all(torch.equal(p, weights[n]) for n, p in module.model.named_parameters())  # nothing is written
    assert module.editor.entries() == [(batch.edit.prompt, batch.edit.target)]
    # the edit itself: cosine 1 with its entry, so σ(s + c) > threshold: rewritten, adapters on
    j, prob = module.editor.scope(batch.edit, module)
    assert j == 0 and prob > 0.99
    routed = module.editor.rewrite_query(batch.edit, module)
    assert routed == Query(f"{batch.edit.prompt} {batch.edit.target}\n{batch.edit.prompt}", batch.edit.target,
                           batch.edit.image)  # fmt: skip
    inputs = module.encode_query(batch.edit)
    assert module.editor.is_routed(inputs).tolist() == [True]
    with torch.no_grad():
        base = plain(**inputs.model_kwargs()).logits
    assert not torch.allclose(_logits(module, inputs), base)  # the counterfactual answers it
    # an out-of-scope query: left as it is, logits equal the base model's exactly
    for query in (batch.t_loc, batch.m_loc, stream[1].edit):
        assert module.editor.scope(query, module)[1] <= 0.99
        assert module.editor.rewrite_query(query, module) is query
        inputs = module.encode_query(query)
        assert module.editor.is_routed(inputs).tolist() == [False]
        with torch.no_grad():
            assert torch.equal(_logits(module, inputs), plain(**inputs.model_kwargs()).logits)


def test_the_newest_edit_wins_a_tie(tiny_llava_dir, networks_file, monkeypatch):
    module, _, stream = _edited(tiny_llava_dir, networks_file, monkeypatch, threshold=0.5)
    module.training_step(stream[0], 0)
    twin = replace(stream[0], edit=Query(stream[0].edit.prompt, "red", stream[0].edit.image))
    module.training_step(twin, 1)
    assert module.editor.scope(stream[0].edit, module)[0] == 1
    assert module.editor.rewrite_query(stream[0].edit, module).prompt.startswith(f"{stream[0].edit.prompt} red\n")


def test_memory_round_trips_through_safetensors(tiny_llava_dir, networks_file, monkeypatch, tmp_path):
    module, optimizer, stream = _edited(tiny_llava_dir, networks_file, monkeypatch, threshold=0.5)
    sizes = []
    for i in range(3):
        module.training_step(stream[i], i)
        sizes.append(module.editor.state_bytes(optimizer))
    assert sizes[0] < sizes[1] < sizes[2]  # the memory grows with every edit
    save_edit_state(module.model, optimizer, tmp_path / "state.safetensors")
    fresh, fresh_optimizer, _ = _edited(tiny_llava_dir, networks_file, monkeypatch, threshold=0.5)
    load_edit_state(fresh.model, fresh_optimizer, tmp_path / "state.safetensors")
    saved, loaded = edit_state_dict(module.model, optimizer), edit_state_dict(fresh.model, fresh_optimizer)
    assert saved.keys() == loaded.keys() and {k.split("/")[-1] for k in saved} >= {"embeddings", "prompt_bytes"}
    assert all(torch.equal(saved[k], loaded[k]) and saved[k].dtype == loaded[k].dtype for k in saved)
    assert fresh.editor.entries() == module.editor.entries()
    for query in [*stream[1].queries().values(), *stream[2].queries().values()]:
        assert fresh.editor.rewrite_query(query, fresh) == module.editor.rewrite_query(query, module)
        assert torch.equal(_logits(fresh, fresh.encode_query(query)), _logits(module, module.encode_query(query)))


def test_single_edits_start_every_edit_from_an_empty_memory(tiny_llava_dir, networks_file, monkeypatch):
    module, _, stream = _edited(tiny_llava_dir, networks_file, monkeypatch, single_edits=True)
    module.training_step(stream[0], 0)
    assert module.editor.entries() == []


def test_a_missing_networks_file_says_how_to_make_it(tiny_llava_dir, tmp_path, monkeypatch):
    missing = tmp_path / "none.safetensors"
    with pytest.raises(FileNotFoundError, match=r"SERAC networks .*none\.safetensors.* not found.*serac_train\.yaml"):
        _manual_module(tiny_llava_dir, SERAC(str(missing)), monkeypatch)


def test_a_file_of_another_kind_or_shape_is_refused(tiny_llava_dir, networks_file, tmp_path, monkeypatch):
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other), metadata={"format": "something else"})
    with pytest.raises(ValueError, match=r"other\.safetensors is not a SERAC networks file"):
        SERACNetworks.load(other)
    damaged = tmp_path / "damaged.safetensors"
    tensors = load_file(networks_file)
    tensors["classifier.proj.weight"] = tensors["classifier.proj.weight"][:3]
    save_file(tensors, str(damaged), metadata=read_metadata(networks_file))  # the same settings, another shape
    with pytest.raises(ValueError, match=r"damaged\.safetensors: tensors classifier\.proj\.weight"):
        SERACNetworks.load(damaged)
    foreign = tmp_path / "foreign.safetensors"
    networks = SERACNetworks.load(networks_file)
    settings = json.loads(networks.metadata()["settings"])
    settings["feature_width"] += 1
    SERACNetworks(**settings).save(foreign)
    with pytest.raises(ValueError, match=r"foreign\.safetensors were trained for a module .*down_proj"):
        _manual_module(tiny_llava_dir, SERAC(str(foreign)), monkeypatch)


def test_training_writes_networks_a_stream_loads(tiny_llava_dir, tmp_path):
    out = tmp_path / "trained.safetensors"
    cli.main(
        [
            "fit", "--config", "configs/tiny_llava_serac_train.yaml",
            "--model.init_args.backbone.init_args.path", str(tiny_llava_dir),
            "--model.init_args.out_file", str(out),
            "--model.init_args.num_threads", "1",
            "--data.init_args.train_files", json.dumps([str(MMEDIT / "vqa_train.json")]),
            "--data.init_args.image_root", str(MMEDIT / "coco"),
            "--data.init_args.rephrase_root", str(MMEDIT / "rephrase"),
            "--trainer.max_steps", "3",
            "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    networks = SERACNetworks.load(out)
    assert any(float(b.abs().sum()) > 0 for b in networks.adapters.lora_B.values())  # the adapters were trained
    assert networks.feature_path == "model.language_model.layers.1.mlp.down_proj"
    run = cli.main(
        [
            "fit", "--config", "configs/tiny_llava_evqa_serac.yaml",
            "--model.init_args.backbone.init_args.path", str(tiny_llava_dir),
            "--model.init_args.editor.init_args.networks", str(out),
            "--data.init_args.data_file", str(MMEDIT / "vqa_eval.json"),
            "--data.init_args.image_root", str(MMEDIT / "coco"),
            "--data.init_args.rephrase_root", str(MMEDIT / "rephrase"),
            "--data.init_args.num_edits", "3",
            "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    metrics = json.loads((Path(run.trainer.logger.log_dir) / "metrics.json").read_text())
    assert (metrics["editor"], metrics["num_edits"]) == ("SERAC", 3)
    assert metrics["diagnostics"]["serac"]["entries"] == 2.0  # the mean over edits of 1, 2, 3 entries


def test_a_stopped_stream_resumes_to_the_whole_result(tiny_llava_dir, networks_file, tmp_path):
    editor = f"{{networks: {networks_file}, threshold: 0.5}}"
    stopped_and_resumed_equals_whole(tmp_path, tiny_llava_dir, MMEDIT, "more_lightning.editors.serac.SERAC", editor)
