"""The OnlineEditModule on a tiny random LLaVA: one edit, key capture, and a stream through cli.py."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cli
from more_lightning.backbones.llava import LlavaBackbone
from more_lightning.contract import shift_for_loss
from more_lightning.data.datamodule import EditStreamDataModule
from more_lightning.editors.alphaedit import AlphaEdit
from more_lightning.editors.ft_l import FTL
from more_lightning.editors.ft_m import FTM
from more_lightning.editors.lora_ft import LoRAFT
from more_lightning.editors.more import MORE
from more_lightning.editors.state import edit_state_dict
from more_lightning.keys import KeyCapture
from more_lightning.module import OnlineEditModule

from .conftest import MMEDIT
from .stream_helpers import stream_config

#: AlphaEdit's retain keys from the fixture's train files (two records each)
ALPHAEDIT_RETAIN = {
    "retain_files": [str(MMEDIT / "vqa_train.json"), str(MMEDIT / "caption_train_edit.json")],
    "image_root": str(MMEDIT / "coco"),
    "rephrase_root": str(MMEDIT / "rephrase"),
    "retain_records": 2,
}


def _stream(num_edits=3):
    dm = EditStreamDataModule(
        data_file=str(MMEDIT / "vqa_eval.json"),
        image_root=str(MMEDIT / "coco"),
        rephrase_root=str(MMEDIT / "rephrase"),
        num_edits=num_edits,
    )
    dm.setup()
    return dm


def _target_logprob(module, inputs):
    with torch.no_grad():
        logits, labels = shift_for_loss(module.logits(inputs), inputs.labels)
        logp = F.log_softmax(logits.float(), -1)
        mask = labels != -100
        return logp[mask].gather(-1, labels[mask].unsqueeze(-1)).sum().item()


def _edit_gain(module, batch, index: int) -> float:
    """Apply ``batch`` as edit ``index`` through ``training_step``; returns the rise of its target log-probability."""
    inputs = module.encode(batch)
    start = _target_logprob(module, inputs["edit"])
    module.training_step(batch, index)
    return _target_logprob(module, inputs["edit"]) - start


class _FakeOptimizer:
    def __init__(self, optimizer):
        self.optimizer = optimizer

    def zero_grad(self):
        self.optimizer.zero_grad()

    def step(self):
        self.optimizer.step()


def _manual_module(tiny_llava_dir, editor, monkeypatch, **kwargs):
    module = OnlineEditModule(LlavaBackbone(path=str(tiny_llava_dir), num_text_layers=2), editor, **kwargs)
    optimizer = module.configure_optimizers()
    monkeypatch.setattr(module, "optimizers", lambda: _FakeOptimizer(optimizer))
    monkeypatch.setattr(module, "manual_backward", lambda loss: loss.backward())
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    monkeypatch.setattr(module, "_log_scalars", lambda *a, **k: None)
    return module, optimizer


@pytest.mark.parametrize(
    "editor",
    [
        MORE(r=16, alpha=32, eta=1.0, lam=1.0, prior="public"),
        MORE(r=16, alpha=32, eta=50.0, lam=1.0, prior="paper"),
        LoRAFT(r=16, alpha=32, eta=1.0),
        FTL(lr=1e-2, steps_per_edit=3),
        FTM(lr=1e-2, steps_per_edit=3),
        AlphaEdit(**ALPHAEDIT_RETAIN, value_lr=1.0, l2=1.0, steps_per_edit=2),
    ],
    ids=["more-public", "more-paper", "lora-ft", "ft-l", "ft-m", "alphaedit"],
)
def test_one_edit_raises_the_target_logprob(tiny_llava_dir, editor, monkeypatch):
    module, _ = _manual_module(tiny_llava_dir, editor, monkeypatch)
    batch = _stream().stream[0]
    inputs = module.encode(batch)
    before = _target_logprob(module, inputs["edit"])
    module.training_step(batch, 0)
    after = _target_logprob(module, inputs["edit"])
    assert after > before + 1e-3


def test_apply_edit_writes_one_edit_outside_a_trainer(tiny_llava_dir):
    """The per-edit path the live edit service runs: no Trainer, a raw optimizer, only the queries given."""
    module = OnlineEditModule(LlavaBackbone(path=str(tiny_llava_dir), num_text_layers=2), MORE(r=16, alpha=32))
    optimizer = module.configure_optimizers()
    batch = _stream().stream[0]
    queries = {k: q for k, q in batch.queries().items() if k in ("edit", "t_loc")}  # no rephrase, no image locality
    inputs = module.encode(batch)
    before = _target_logprob(module, inputs["edit"])
    done = module.apply_edit(optimizer, queries, "live edit")
    assert _target_logprob(module, inputs["edit"]) > before + 1e-3
    assert set(done.scores) == {"rel", "rel_em", "t_loc", "t_loc_agree"} and set(done.refs) == {"t_loc"}
    assert module.timings == [{"edit_seconds": done.seconds, "editor_seconds": done.editor_seconds}]
    assert module.immediate["rel"].update_count == 1


def test_keys_pool_image_positions_for_projector_and_text_positions_for_text(tiny_llava_dir):
    backbone = LlavaBackbone(path=str(tiny_llava_dir), num_text_layers=1)
    module = OnlineEditModule(backbone, MORE(r=8, alpha=16))
    query = module.encode(_stream().stream[0])["edit"]
    n_image = int(query.image_mask.sum())
    assert n_image == (32 // 16) ** 2  # one image of 32 px, patch 16, CLS dropped
    seen = {}
    capture = KeyCapture(module.editor.key_modules(), pool=False)
    with capture.record(query.positions("text")), torch.no_grad():
        module.logits(query)
    seen = {name: keys.shape[0] for name, keys in capture.keys().items()}
    text_name = "model.language_model.layers.1.mlp.down_proj"
    assert seen[text_name] == int(query.text_mask.sum()) == query.input_ids.shape[1] - n_image
    assert seen["model.multi_modal_projector.linear_1"] == n_image
    assert seen["model.multi_modal_projector.linear_2"] == n_image
    # pooled: the text key is the mean of the text rows only
    pooled = KeyCapture(module.editor.key_modules(), pool=True)
    with pooled.record(query.positions("target")), torch.no_grad():
        module.logits(query)
    assert pooled.keys()[text_name].shape == (1, 96)


def _tb_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_three_edit_stream_through_cli_writes_scalars_and_metrics_json(tiny_llava_dir, tmp_path):
    config = stream_config(tmp_path / "run.yaml", tiny_llava_dir, MMEDIT)
    cli.main(["fit", "--config", str(config), "--model.init_args.editor.init_args.lam", "2.0"])
    run_dir = next((tmp_path / "runs").rglob("metrics.json")).parent
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["editor"] == "MORE" and metrics["task"] == "evqa" and metrics["num_edits"] == 3
    keys = {"rel", "t_gen", "m_gen", "t_loc", "m_loc", "avg"}
    assert set(metrics["immediate"]) == keys and set(metrics["retention"]) == keys
    assert set(metrics["locality_agreement"]) == {"t_loc", "m_loc"}
    assert all(0 <= v <= 100 for phase in ("immediate", "retention") for v in metrics[phase].values())
    assert metrics["seconds_per_edit"] > 0
    tags = _tb_tags(run_dir)
    # write diagnostics: per module per edit in TensorBoard, stream means in metrics.json
    diag = metrics["diagnostics"]
    proj = "model.multi_modal_projector.linear_2"
    assert {"grad_norm", "delta_norm", "removed_share", "z_sq", "s_above_lam", "effective_rank"} <= set(diag[proj])
    assert set(diag["edit_fit"]) == {"nll_before", "nll_after", "margin_before", "margin_after"}
    assert f"diag/{proj}/removed_share" in tags and "edit/margin_after" in tags
    split = metrics["retention_by_question"]
    assert sum(group["num_edits"] for group in split.values()) == 3 and all("rel" in g for g in split.values())
    for name in ("rel", "t_gen", "m_gen", "t_loc", "m_loc", "avg"):
        assert f"immediate/{name}" in tags
        assert f"final_retention/{name}" in tags


def test_edit_state_round_trips_through_safetensors(tiny_llava_dir, tmp_path):
    from more_lightning.editors.state import load_edit_state, save_edit_state

    def build():
        module = OnlineEditModule(LlavaBackbone(path=str(tiny_llava_dir), num_text_layers=2), MORE(r=8, alpha=16))
        return module, module.configure_optimizers()

    m1, o1 = build()
    with torch.no_grad():
        for p in m1.model.parameters():
            if p.requires_grad:
                p.normal_()
    o1.observe({name: torch.randn(2, a.in_features) for name, a in o1.adapters.items()})
    save_edit_state(m1.model, o1, tmp_path / "state.safetensors")
    m2, o2 = build()
    load_edit_state(m2.model, o2, tmp_path / "state.safetensors")
    for (n, p1), p2 in zip(m1.model.named_parameters(), m2.model.parameters(), strict=True):
        assert torch.equal(p1, p2), n
    for g1, g2 in zip(o1.param_groups, o2.param_groups, strict=True):
        assert torch.equal(o1.state[g1["params"][0]]["P"], o2.state[g2["params"][0]]["P"])
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "make_editor",
    [
        lambda: MORE(r=16, alpha=32, eta=1.0, lam=1.0, prior="public"),
        lambda: FTL(lr=1e-2, steps_per_edit=2),
        lambda: FTM(lr=1e-2, steps_per_edit=2),
        lambda: AlphaEdit(**ALPHAEDIT_RETAIN, value_lr=1.0, l2=1.0),
    ],
    ids=["more", "ft-l", "ft-m", "alphaedit"],
)
def test_single_edits_apply_every_edit_to_the_unedited_model(tiny_llava_dir, make_editor, monkeypatch):
    stream = _stream().stream
    single, single_opt = _manual_module(tiny_llava_dir, make_editor(), monkeypatch, single_edits=True)
    before = {k: v.clone() for k, v in edit_state_dict(single.model, single_opt).items()}
    assert any(k.startswith("param/") for k in before)
    for i in range(2):
        single.training_step(stream[i], i)
    after = edit_state_dict(single.model, single_opt)  # written parameters and statistics are back
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert single.immediate["rel"].update_count == 2 and not single.retention

    # a third edit, kept this time, leaves the model a fresh module makes of that edit alone
    single.single_edits = False
    single.training_step(stream[2], 2)
    fresh, _ = _manual_module(tiny_llava_dir, make_editor(), monkeypatch)
    fresh.training_step(stream[2], 0)
    inputs = fresh.encode(stream[2])
    assert _target_logprob(single, inputs["edit"]) == pytest.approx(_target_logprob(fresh, inputs["edit"]), abs=1e-4)


def test_retention_keeps_only_the_answer_positions_of_each_reference(tiny_llava_dir, monkeypatch):
    """What the retention pass keeps per edit: n answer rows × V, never the (T-1) × V of the sequence."""
    module, _ = _manual_module(tiny_llava_dir, MORE(r=16, alpha=32, eta=1.0, lam=1.0), monkeypatch)
    stream = _stream().stream
    for i in range(2):
        module.training_step(stream[i], i)
    vocab = module.model.config.text_config.vocab_size
    for index, refs in module._references.items():
        inputs = module.encode(stream[index])
        for name, ref in refs.items():
            answer_rows = int((inputs[name].labels[:, 1:] != -100).sum())
            assert ref.logp.shape == (answer_rows, vocab) and ref.mask.sum() == answer_rows
            assert answer_rows < inputs[name].labels.shape[1] - 1  # fewer rows than the sequence


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_every_curve_is_indexed_by_the_edit_and_retention_logs_the_forgetting_curve(tiny_llava_dir, tmp_path):
    config = stream_config(tmp_path / "run.yaml", tiny_llava_dir, MMEDIT)
    cli.main(["fit", "--config", str(config)])
    run_dir = next((tmp_path / "runs").rglob("metrics.json")).parent
    scalars = _scalars(run_dir)
    per_edit = {tag: points for tag, points in scalars.items() if "final_" not in tag}
    assert {"rel", "loc", "immediate/rel", "retention/rel", "retention/m_loc_agree", "edit/loss"} <= set(per_edit)
    assert {tag: [step for step, _ in points] for tag, points in per_edit.items()} == {t: [1, 2, 3] for t in per_edit}
    assert all(step == 3 for tag, points in scalars.items() if "final_" in tag for step, _ in points)

    # the retention curve: edit t's score on the final model, at step t; its mean is the retention figure
    lines = [json.loads(line) for line in (run_dir / "retention.jsonl").read_text().splitlines()]
    assert [line["edit"] for line in lines] == [1, 2, 3] and all("held_out_scores" not in x for x in lines)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("rel", "t_gen", "m_gen", "t_loc", "m_loc", "avg"):
        curve = [value for _, value in per_edit[f"retention/{key}"]]
        assert curve == pytest.approx([line["scores"][key] for line in lines], abs=1e-4)
        assert sum(curve) / 3 == pytest.approx(metrics["retention"][key], abs=1e-3)


def test_an_edit_state_names_its_fixed_write_bases_and_refuses_others(tiny_llava_dir, tmp_path):
    """A frozen A is rebuilt from (seed, r), not saved: a state loaded under another seed is an error, not noise."""
    from more_lightning.editors.more import MORE
    from more_lightning.editors.state import load_edit_state, read_metadata, save_edit_state

    module = OnlineEditModule(LlavaBackbone(path=str(tiny_llava_dir), num_text_layers=1), MORE(r=4, alpha=8, seed=0))
    optimizer = module.editor.configure_optimizer()
    path = tmp_path / "state.safetensors"
    save_edit_state(module.model, optimizer, path, module.editor.state_metadata())
    assert read_metadata(path)["write_bases"] == "seed=0 r=4"
    same = OnlineEditModule(LlavaBackbone(path=str(tiny_llava_dir), num_text_layers=1), MORE(r=4, alpha=8, seed=0))
    load_edit_state(same.model, same.editor.configure_optimizer(), path, same.editor.state_metadata())
    other = OnlineEditModule(LlavaBackbone(path=str(tiny_llava_dir), num_text_layers=1), MORE(r=4, alpha=8, seed=1))
    with pytest.raises(ValueError, match="written with write_bases seed=0 r=4, this editor has seed=1 r=4"):
        load_edit_state(other.model, other.editor.configure_optimizer(), path, other.editor.state_metadata())
