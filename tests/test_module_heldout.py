"""Held-out generality / locality in the OnlineEditModule (DESIGN §3, "seen vs held-out"), on a tiny random LLaVA.

* held-out scores equal a plain numpy reference computed from the model's logits (token accuracy; exp(-KL) against
  the logits taken before each edit), immediately and in the retention pass;
* the held-out queries never touch the edit: the final edit state is bit-identical with and without a companion;
* metrics.json gets ``held_out`` and ``headline``, TensorBoard ``held_out/...`` tags, the printed table both rows,
  and benchmarks/results_table.py held-out columns.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cli
from more_lightning.data.datamodule import EditStream, EditStreamDataModule
from more_lightning.editors.ft_l import FTL
from more_lightning.editors.more import MORE
from more_lightning.editors.state import edit_state_dict
from tests.conftest import benchmark_script
from tests.heldout_companion import copy_fixtures, write_companion

from .stream_helpers import stream_config
from .test_module import _manual_module, _tb_tags

HELD_OUT = ("t_gen", "m_gen", "t_loc", "m_loc")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A copy of the mmedit fixtures with vqa_eval.heldout.json beside vqa_eval.json."""
    data = copy_fixtures(tmp_path)
    write_companion(data / "vqa_eval.heldout.json")
    return data


def _stream(data: Path, num_edits: int = 3, **kwargs) -> EditStream:
    dm = EditStreamDataModule(
        data_file=str(data / "vqa_eval.json"),
        image_root=str(data / "coco"),
        rephrase_root=str(data / "rephrase"),
        num_edits=num_edits,
        **kwargs,
    )
    dm.setup()
    return dm.stream


# --- a plain numpy reference (float64), from (1, T, V) logits and (1, T) labels --------------------------------


def _np_logits(module, inputs) -> np.ndarray:
    with torch.no_grad():
        return module.logits(inputs).float().numpy().astype(np.float64)


def _answer(logits: np.ndarray, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Logits at the positions that predict a target token, and those tokens: logits[i] predicts labels[i + 1]."""
    targets = labels[0, 1:].numpy()
    mask = targets != -100
    return logits[0, :-1][mask], targets[mask]


def _np_accuracy(logits: np.ndarray, labels: torch.Tensor) -> float:
    scores, targets = _answer(logits, labels)
    return 100 * float(np.mean(scores.argmax(-1) == targets))


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_locality(logits: np.ndarray, ref_logits: np.ndarray, labels: torch.Tensor) -> float:
    logp, _ = _answer(logits, labels)
    ref, _ = _answer(ref_logits, labels)
    logp, ref = _np_log_softmax(logp), _np_log_softmax(ref)
    kl = (np.exp(logp) * (logp - ref)).sum(-1).mean()  # mean over answer positions of KL(p_t || p_{t-1})
    return 100 * float(np.exp(-kl))


def _np_scores(module, inputs: dict, before: dict[str, np.ndarray]) -> dict[str, float]:
    after = {k: _np_logits(module, inputs[k]) for k in HELD_OUT}
    scores = {k: _np_accuracy(after[k], inputs[k].labels) for k in ("t_gen", "m_gen")}
    scores |= {k: _np_locality(after[k], before[k], inputs[k].labels) for k in ("t_loc", "m_loc")}
    return scores


def _attach_fake_trainer(module, monkeypatch, stream, tmp_path: Path, printed: list[str]) -> None:
    """Enough of a Trainer for on_train_epoch_end: the dataset, rank zero, a run folder, the printed summary."""
    trainer = SimpleNamespace(train_dataloader=SimpleNamespace(dataset=stream), is_global_zero=True)
    monkeypatch.setattr(module, "_trainer", trainer)
    monkeypatch.setattr(module, "run_dir", lambda: tmp_path)
    monkeypatch.setattr("more_lightning.module.rank_zero_info", printed.append)


# --- tests -----------------------------------------------------------------------------------------------------


def test_held_out_scores_match_a_numpy_reference(tiny_llava_dir, data, tmp_path, monkeypatch):
    stream = _stream(data)
    module, _ = _manual_module(tiny_llava_dir, MORE(r=16, alpha=32, eta=1.0, lam=1.0, prior="public"), monkeypatch)
    logged: list[tuple[int, dict]] = []
    monkeypatch.setattr(module, "_log_scalars", lambda scalars, step: logged.append((step, dict(scalars))))
    before, immediate = [], []
    for i in range(len(stream)):
        inputs = module.encode_held_out(stream[i])
        before.append({k: _np_logits(module, inputs[k]) for k in ("t_loc", "m_loc")})  # θ_{t-1}
        module.training_step(stream[i], i)
        immediate.append(_np_scores(module, inputs, before[i]))
        step_logs = {k: v for step, scalars in logged if step == i + 1 for k, v in scalars.items()}
        for k in HELD_OUT:
            assert step_logs[f"held_out/immediate/{k}"] == pytest.approx(immediate[i][k], abs=1e-3), (i, k)
        rel = step_logs["immediate/rel"]
        held_avg = (rel + sum(immediate[i][k] for k in HELD_OUT)) / 5
        assert step_logs["held_out/immediate/avg"] == pytest.approx(held_avg, abs=1e-3)

    printed: list[str] = []
    _attach_fake_trainer(module, monkeypatch, stream, tmp_path, printed)
    module.on_train_epoch_end()  # the retention pass on the final model
    retained = [_np_scores(module, module.encode_held_out(stream[i]), before[i]) for i in range(len(stream))]
    summary = module.summary
    assert summary["headline"] == "held_out"
    for phase, per_edit in (("immediate", immediate), ("retention", retained)):
        held = summary["held_out"][phase]
        assert set(held) == {*HELD_OUT, "avg"}
        for k in HELD_OUT:
            assert held[k] == pytest.approx(np.mean([s[k] for s in per_edit]), abs=1e-3), (phase, k)
        assert held["avg"] == pytest.approx((summary[phase]["rel"] + sum(held[k] for k in HELD_OUT)) / 5)
    # other text and images than the seen samples: other scores
    assert summary["held_out"]["immediate"]["t_loc"] != pytest.approx(summary["immediate"]["t_loc"], abs=1e-3)
    assert summary["held_out"]["retention"]["m_loc"] != pytest.approx(summary["retention"]["m_loc"], abs=1e-3)
    final = {k: v for step, scalars in logged if step == len(stream) for k, v in scalars.items()}
    assert final["held_out/final_retention/t_loc"] == summary["held_out"]["retention"]["t_loc"]
    assert final["held_out/final_immediate/avg"] == summary["held_out"]["immediate"]["avg"]
    # the printed table has a seen and a held-out row per phase; metrics.json is the summary
    table = printed[-1]
    for label in ("immediate seen", "immediate held_out", "retention seen", "retention held_out"):
        assert label in table
    assert json.loads((tmp_path / "metrics.json").read_text()) == summary


@pytest.mark.parametrize(
    "make_editor",
    [lambda: MORE(r=16, alpha=32, eta=1.0, lam=1.0, prior="public"), lambda: FTL(lr=1e-2, steps_per_edit=2)],
    ids=["more", "ft-l"],
)
def test_held_out_queries_do_not_change_the_edit(tiny_llava_dir, data, make_editor, monkeypatch):
    states, seen = [], []
    for heldout_file in ("auto", "none"):
        stream = _stream(data, heldout_file=heldout_file)
        assert (stream[0].held_out is not None) == (heldout_file == "auto")
        torch.manual_seed(0)  # same adapter initialisation for both runs
        module, optimizer = _manual_module(tiny_llava_dir, make_editor(), monkeypatch)
        for i in range(len(stream)):
            module.training_step(stream[i], i)
        states.append(edit_state_dict(module.model, optimizer))
        seen.append(module._summary()["immediate"])
    with_companion, without = states
    assert with_companion.keys() == without.keys()
    for key in with_companion:
        assert torch.equal(with_companion[key], without[key]), key
    assert seen[0] == seen[1]


def test_without_companion_metrics_stay_seen_only(tiny_llava_dir, tmp_path, monkeypatch):
    stream = _stream(copy_fixtures(tmp_path), num_edits=2)  # no companion
    module, _ = _manual_module(tiny_llava_dir, MORE(r=8, alpha=16), monkeypatch)
    for i in range(len(stream)):
        module.training_step(stream[i], i)
    printed: list[str] = []
    _attach_fake_trainer(module, monkeypatch, stream, tmp_path, printed)
    module.on_train_epoch_end()
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["headline"] == "seen" and "held_out" not in summary
    assert set(summary["immediate"]) == {"rel", "t_gen", "m_gen", "t_loc", "m_loc", "avg"}
    assert "held_out" not in printed[-1] and "seen" not in printed[-1]


def test_single_edits_score_held_out_immediately_only(tiny_llava_dir, data, monkeypatch):
    stream = _stream(data, num_edits=2)
    module, _ = _manual_module(tiny_llava_dir, MORE(r=8, alpha=16), monkeypatch, single_edits=True)
    for i in range(len(stream)):
        module.training_step(stream[i], i)
    held = module._summary()["held_out"]
    assert set(held["immediate"]) == {*HELD_OUT, "avg"} and held["retention"] == {}
    assert set(held["exact_match"]["immediate"]) == {"t_gen", "m_gen"}
    assert set(held["locality_agreement"]) == {"t_loc", "m_loc"}


def _results_table():
    return benchmark_script("results_table")


def test_stream_through_cli_writes_held_out_metrics_and_tags(tiny_llava_dir, data, tmp_path):
    config = stream_config(tmp_path / "run.yaml", tiny_llava_dir, data)
    cli.main(["fit", "--config", str(config)])
    run_dir = next((tmp_path / "runs").rglob("metrics.json")).parent
    metrics = json.loads((run_dir / "metrics.json").read_text())
    keys = {"rel", "t_gen", "m_gen", "t_loc", "m_loc", "avg"}
    assert set(metrics["immediate"]) == keys and set(metrics["retention"]) == keys  # seen, as before
    assert metrics["headline"] == "held_out"
    held = metrics["held_out"]
    assert set(held) == {"immediate", "retention", "locality_agreement", "exact_match"}
    assert set(held["immediate"]) == set(held["retention"]) == {*HELD_OUT, "avg"}
    assert all(0 <= v <= 100 for phase in ("immediate", "retention") for v in held[phase].values())
    tags = _tb_tags(run_dir)
    for name in (*HELD_OUT, "avg"):
        assert f"immediate/{name}" in tags and f"held_out/immediate/{name}" in tags
        assert f"held_out/final_immediate/{name}" in tags and f"held_out/final_retention/{name}" in tags
    assert "held_out/immediate/t_loc_agree" in tags and "held_out/immediate/m_gen_em" in tags

    table = _results_table()
    header, rule = table.header(held_out=True)
    row = table.format_row(metrics, 3, "cmd", held_out=True)
    assert header.count("|") == rule.count("|") == row.count("|")
    assert "t_gen (imm, held-out)" in header and "avg (ret, held-out)" in header
    assert f"{held['retention']['avg']:.1f}" in row.split("|")[-4]  # last held-out cell: avg (ret, held-out)


def test_results_table_without_held_out_is_unchanged():
    table = _results_table()
    metrics = {"editor": "MORE", "task": "evqa", "seconds_per_edit": 0.5}
    metrics |= {phase: dict.fromkeys(table.KEYS, 50.0) for phase in ("immediate", "retention")}
    header, rule = table.header(held_out=False)
    assert "held-out" not in header and rule == "|" + "---|" * 17
    assert table.format_row(metrics, 10, "cmd", held_out=False).count("|") == header.count("|")
    assert table.format_row(metrics, 10, "cmd", held_out=True).count(" - ") == 10  # a run without: dashes
