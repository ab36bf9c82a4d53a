"""SERAC: an in-scope query is rewritten and answered with the adapters on, an out-of-scope one is untouched (its
logits are the base model's, bit for bit); the memory round-trips through safetensors; the networks file's errors;
the training run writes a file a stream loads; a short stream stops and resumes to the whole result; the classifier on
a sentence encoder (a tiny random BERT): its features, the networks file that records its folder, its errors."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cli
from more_lightning.backbones.llava import LlavaBackbone
from more_lightning.data.records import Query
from more_lightning.editors.serac import SERAC, SentenceEncoder, SERACNetworks, prompt_lengths
from more_lightning.editors.serac_train import SERACTrainModule
from more_lightning.editors.state import edit_state_dict, load_edit_state, read_metadata, save_edit_state
from tests.conftest import MMEDIT, networks_training_args
from tests.stream_helpers import stopped_and_resumed_equals_whole
from tests.test_module import _manual_module, _stream

TRAIN_CONFIG = "configs/tiny_llava_serac_train.yaml"

ADAPTED = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def write_networks(
    model_dir: Path, path: Path, seed: int = 0, encoder: Path | None = None, feature_path: str | None = None
) -> Path:
    """Random SERAC networks for the tiny LLaVA in ``model_dir``: the classifier on the last layer's down_proj input
    (or on the sentence encoder in the folder ``encoder``), adapters with a non-zero ``lora_B`` (so the counterfactual
    differs from the base model); ``feature_path`` records another feature module."""
    model, _ = LlavaBackbone(path=str(model_dir), num_text_layers=2).load()
    n = model.config.text_config.num_hidden_layers
    modules = [f"model.language_model.layers.{i}.{m}" for i in range(n) for m in ADAPTED]
    shapes = {p: tuple(model.get_submodule(p).weight.shape) for p in modules}
    feature = model.get_submodule(f"model.language_model.layers.{n - 1}.mlp.down_proj")
    networks = SERACNetworks(feature_path=feature_path or f"model.language_model.layers.{n - 1}.mlp.down_proj",
                             feature_width=feature.in_features, adapter_shapes=shapes, dim=16, seed=seed,
                             encoder=None if encoder is None else str(encoder))  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in networks.adapters.lora_B.values():
            b.copy_(torch.randn(b.shape, generator=generator) * 0.5)
    networks.save(path)
    return path


@pytest.fixture(scope="module")
def networks_file(tiny_llava_dir, tmp_path_factory) -> Path:
    return write_networks(tiny_llava_dir, tmp_path_factory.mktemp("serac") / "serac.safetensors")


@pytest.fixture(scope="module")
def encoder_networks_file(tiny_llava_dir, tiny_bert_dir, tmp_path_factory) -> Path:
    return write_networks(tiny_llava_dir, tmp_path_factory.mktemp("serac") / "bert.safetensors", encoder=tiny_bert_dir)


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
    extra = ("--model.init_args.num_threads", "1")
    cli.main(networks_training_args(TRAIN_CONFIG, tiny_llava_dir, out, ["vqa_train.json"], tmp_path, *extra, steps=3))
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


# --- the classifier on a sentence encoder ------------------------------------------------------------------------


def test_sentence_encoder_features_are_unit_mean_pooled_and_padding_invariant(tiny_bert_dir):
    encoder = SentenceEncoder(str(tiny_bert_dir))
    assert (encoder.hidden_size, encoder.max_length) == (32, 64)  # 64 positions, the tokenizer unbounded
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.model.parameters())
    short, long = "what color is the bus?", "who wrote the novel moby dick? " * 4
    batched = encoder.features([short, long])  # (2, 32): the short one padded
    assert batched.shape == (2, 32) and batched.dtype == torch.float32
    assert torch.allclose(batched.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(encoder.features([short])[0], batched[0], atol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)
    assert encoder.features(["dog " * 500]).shape == (1, 32)  # truncated to the 64 positions


def test_encoder_networks_round_trip_with_the_folder_but_not_its_weights(
    tiny_bert_dir, encoder_networks_file, networks_file, tmp_path
):
    networks = SERACNetworks.load(encoder_networks_file)
    assert networks.encoder.folder == str(tiny_bert_dir)
    assert json.loads(read_metadata(encoder_networks_file)["settings"])["encoder"] == str(tiny_bert_dir)
    tensors = load_file(encoder_networks_file)
    assert all(k.startswith(("classifier.", "adapters.")) for k in tensors)  # no encoder weights in the file
    assert tensors["classifier.proj.weight"].shape == (16, 32)  # in_dim = the encoder's hidden size
    networks.save(tmp_path / "again.safetensors")
    again = SERACNetworks.load(tmp_path / "again.safetensors")
    assert again.encoder.folder == str(tiny_bert_dir)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in networks.state_dict().items())
    moved = tmp_path / "moved_bert"
    shutil.copytree(tiny_bert_dir, moved)
    assert SERACNetworks.load(encoder_networks_file, encoder=str(moved)).encoder.folder == str(moved)
    # files without the setting (written before it existed, as the committed ones) load as before
    for old in (networks_file, Path("models/tiny_llava_serac.safetensors")):
        assert "encoder" not in json.loads(read_metadata(old)["settings"])
        assert SERACNetworks.load(old).encoder is None
    with pytest.raises(ValueError, match=r"trained on the backbone's own features.*editor\.init_args\.encoder"):
        SERACNetworks.load(networks_file, encoder=str(moved))


def test_the_encoder_reads_the_prompt_text_only_and_routes_the_edit(
    tiny_llava_dir, tiny_bert_dir, encoder_networks_file, monkeypatch
):
    module, _, stream = _edited(tiny_llava_dir, encoder_networks_file, monkeypatch)
    editor, batch = module.editor, stream[0]
    assert editor.hooks._handles and len(editor.hooks._handles) == len(editor.networks.adapters.shapes)  # no feature
    z = editor.embed(batch.edit, module)
    expected = editor.networks.classifier.embed(SentenceEncoder(str(tiny_bert_dir)).features([batch.edit.prompt]))
    assert torch.allclose(z, expected[0], atol=1e-6)
    editor._embeddings.clear()
    assert torch.allclose(editor.embed(replace(batch.edit, image=batch.m_loc.image), module), z, atol=1e-6)
    editor._embeddings.clear()
    assert torch.allclose(editor.embed(replace(batch.edit, image=None), module), z, atol=1e-6)
    module.training_step(batch, 0)
    j, prob = editor.scope(batch.m_gen, module)  # the image rephrase: the edit's own prompt text
    assert j == 0 and prob > 0.99
    assert editor.rewrite_query(batch.edit, module).prompt.startswith(f"{batch.edit.prompt} {batch.edit.target}\n")
    bert_bytes = sum(t.numel() * t.element_size() for t in editor.networks.encoder.model.state_dict().values())
    networks_bytes = sum(t.numel() * t.element_size() for t in editor.networks.state_dict().values())
    assert editor.state_bytes(module.editor.optimizer) > bert_bytes + networks_bytes


def test_with_an_encoder_the_feature_module_is_not_needed(tiny_llava_dir, tiny_bert_dir, tmp_path, monkeypatch):
    file = write_networks(tiny_llava_dir, tmp_path / "n.safetensors", encoder=tiny_bert_dir, feature_path="no.such")
    module, _, _ = _edited(tiny_llava_dir, file, monkeypatch)  # attaches: only the adapters are checked
    assert module.editor.networks.feature_path == "no.such"


def test_a_missing_or_invalid_encoder_folder_is_one_clear_error(tiny_llava_dir, encoder_networks_file, tmp_path):
    missing = tmp_path / "no_bert"
    hint = r"huggingface-cli download bert-base-uncased --local-dir data/bert-base-uncased"
    stream_key = r"--model\.init_args\.editor\.init_args\.encoder"
    with pytest.raises(FileNotFoundError, match=rf"no_bert.* not found.*{hint}.*{stream_key}"):
        SERAC(str(encoder_networks_file), encoder=str(missing))
    invalid = tmp_path / "invalid_bert"
    invalid.mkdir()
    (invalid / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"invalid_bert.* cannot be loaded as a BERT-class encoder.*{stream_key}"):
        SERACNetworks.load(encoder_networks_file, encoder=str(invalid))
    backbone = LlavaBackbone(path=str(tiny_llava_dir), num_text_layers=2)
    train_key = r"--model\.init_args\.encoder to"
    with pytest.raises(FileNotFoundError, match=rf"no_bert.* not found.*{hint}.*{train_key}"):
        SERACTrainModule(backbone, str(tmp_path / "out.safetensors"), ["x"], encoder=str(missing))


def test_the_command_line_says_a_missing_encoder_in_one_line(tiny_llava_dir, tmp_path, capsys):
    out, extra = tmp_path / "out.safetensors", ("--model.init_args.encoder", str(tmp_path / "no_bert"))
    code = cli.run(networks_training_args(TRAIN_CONFIG, tiny_llava_dir, out, ["vqa_train.json"], tmp_path, *extra))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err  # one line
    assert "no_bert" in errors[0] and "--model.init_args.encoder " in errors[0] and "huggingface-cli" in errors[0]


def test_training_on_an_encoder_writes_networks_a_stream_loads(tiny_llava_dir, tiny_bert_dir, tmp_path):
    out = tmp_path / "trained.safetensors"
    extra = ("--model.init_args.encoder", str(tiny_bert_dir), "--model.init_args.num_threads", "1")
    cli.main(networks_training_args(TRAIN_CONFIG, tiny_llava_dir, out, ["vqa_train.json"], tmp_path, *extra))
    networks = SERACNetworks.load(out)
    assert networks.encoder.folder == str(tiny_bert_dir) and networks.classifier.proj.in_features == 32
    assert float(networks.classifier.offset) != -5.0  # the head was trained (from its initial offset)
