"""A stream you can trust: kill -9 and resume, the edit journal and its replay, failures, double application."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file

import cli
from more_lightning.data.schema import DataFileError
from more_lightning.journal import applied_edits, read_journal
from more_lightning.module import StreamError

from .conftest import MMEDIT
from .stream_helpers import stream_config

REPO = Path(__file__).resolve().parent.parent


def _config(tmp: Path, model_dir: Path, data: Path, name: str = "stream", task_file: str = "vqa_eval.json") -> Path:
    editor = "{r: 8, alpha: 16, eta: 1.0, lam: 1.0, prior: public}"
    return stream_config(
        tmp / f"{name}.yaml", model_dir, data, data_file=task_file, num_edits=4, editor=editor, save_every=2, name=name
    )


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    """A private copy of the MMEdit fixture files (tests may break its images)."""
    copy = tmp_path / "mmedit"
    shutil.copytree(MMEDIT, copy)
    return copy


def _run_dir(tmp: Path, name: str, version: int = 0) -> Path:
    return tmp / "runs" / name / f"version_{version}"


def _numbers(tree, prefix=""):
    """Every number of a metrics.json, by path, except timings."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            if "seconds" not in k:
                out |= _numbers(v, f"{prefix}/{k}")
        return out
    return {prefix: tree} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else {}


def _assert_same_run(a: Path, b: Path) -> None:
    ma, mb = (_numbers(json.loads((d / "metrics.json").read_text())) for d in (a, b))
    assert ma.keys() == mb.keys() and len(ma) > 20
    for key in ma:
        assert math.isclose(ma[key], mb[key], rel_tol=0, abs_tol=1e-9), key
    sa, sb = (load_file(d / "edit_state.safetensors") for d in (a, b))
    assert sa.keys() == sb.keys() and sa
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _cli_subprocess(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "cli.py", "fit", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_stream_killed_with_sigkill_resumes_to_the_uninterrupted_result(tiny_llava_dir, data, tmp_path):
    whole = _config(tmp_path, tiny_llava_dir, data, "whole")
    cli.main(["fit", "--config", str(whole)])

    killed = _config(tmp_path, tiny_llava_dir, data, "killed")
    kill = ["--trainer.callbacks+=tests.stream_helpers.KillAfterEdit", "--trainer.callbacks.init_args.edit", "3"]
    result = _cli_subprocess("--config", str(killed), *kill)
    assert result.returncode == -9, result.stderr[-2000:]
    run = _run_dir(tmp_path, "killed")
    assert not (run / "metrics.json").exists() and (run / "checkpoints" / "last.ckpt").is_file()
    # the checkpoint holds what the stream changed (the editor's B), never the frozen backbone
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["state_dict"] and all("lora_B" in k for k in saved["state_dict"]), list(saved["state_dict"])
    assert saved["edit_stream"]["edits_done"] == 2

    resumed = _cli_subprocess("--config", str(killed), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not _run_dir(tmp_path, "killed", 1).exists()  # it went on in the killed run's own folder
    _assert_same_run(_run_dir(tmp_path, "whole"), run)
    events = [e.get("event") for e in read_journal(run / "journal.jsonl")]
    assert events[0] == "start" and "resume" in events and events[-1] == "end"
    assert [e.edit for e in applied_edits(run / "journal.jsonl")] == [1, 2, 3, 4]

    # going on from the final checkpoint of a finished stream changes nothing
    before = {p.name: p.read_bytes() for p in (run / "metrics.json", run / "edit_state.safetensors")}
    cli.main(["fit", "--config", str(killed), "--ckpt_path", "last"])
    assert {p.name: p.read_bytes() for p in (run / "metrics.json", run / "edit_state.safetensors")} == before
    assert read_journal(run / "journal.jsonl")[-1]["event"] == "end"
    # and another stream (here: another order) never continues from it
    with pytest.raises(StreamError, match="written by another stream"):
        cli.main(["fit", "--config", str(killed), "--ckpt_path", "last", "--data.init_args.seed", "1"])


def test_ckpt_path_last_without_a_checkpoint_is_an_error_not_a_fresh_start(tiny_llava_dir, data, tmp_path):
    config = _config(tmp_path, tiny_llava_dir, data)
    with pytest.raises(StreamError, match="no checkpoint to resume from"):
        cli.main(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert cli.run(["fit", "--config", str(config), "--ckpt_path", "last"]) == 1
    assert not list((tmp_path / "runs").rglob("journal.jsonl"))


def test_journal_replays_to_the_same_edit_state_and_checks_every_recorded_hash(tiny_llava_dir, data, tmp_path):
    config = _config(tmp_path, tiny_llava_dir, data)
    cli.main(["fit", "--config", str(config)])
    run = _run_dir(tmp_path, "stream")
    journal = run / "journal.jsonl"
    lines = [e for e in read_journal(journal) if "edit" in e and "event" not in e]
    assert [e["edit"] for e in lines] == [1, 2, 3, 4]
    assert all(len(e["record_sha256"]) == 64 and e["seconds"] > 0 and "rel" in e["scores"] for e in lines)
    assert [("state_sha256" in e) for e in lines] == [False, True, False, True]  # save_every 2

    cli.main(["fit", "--config", str(run / "config.yaml"), "--data.init_args.replay_journal", str(journal)])
    replay = _run_dir(tmp_path, "stream", 1)
    for key, value in load_file(run / "edit_state.safetensors").items():
        assert torch.equal(value, load_file(replay / "edit_state.safetensors")[key]), key

    tampered = tmp_path / "tampered.jsonl"
    text = journal.read_text().replace(lines[1]["state_sha256"], "0" * 64)
    tampered.write_text(text)
    with pytest.raises(StreamError, match="replay diverged at edit 2"):
        cli.main(["fit", "--config", str(run / "config.yaml"), "--data.init_args.replay_journal", str(tampered)])

    records = json.loads((data / "vqa_eval.json").read_text())
    records[lines[0]["record"]]["alt"] = "something else"
    (data / "vqa_eval.json").write_text(json.dumps(records))
    with pytest.raises(DataFileError, match="line 2, field 'record_sha256'"):
        cli.main(["fit", "--config", str(run / "config.yaml"), "--data.init_args.replay_journal", str(journal)])


def test_applied_edits_drop_what_a_resume_superseded(tmp_path):
    journal = tmp_path / "journal.jsonl"
    edit = lambda i: {"edit": i, "record": 10 + i, "record_sha256": f"h{i}"}  # noqa: E731
    entries = [{"event": "start"}, edit(1), edit(2), edit(3), {"event": "resume", "after_edit": 2}, edit(3), edit(4)]
    journal.write_text("".join(json.dumps(e) + "\n" for e in entries) + '{"edit": 5, "rec')  # died mid-line
    kept = [(e.edit, e.record, e.line) for e in applied_edits(journal)]
    assert kept == [(1, 11, 2), (2, 12, 3), (3, 13, 6), (4, 14, 7)]
    journal.write_text(json.dumps(edit(1)) + "\n" + json.dumps({"edit": 3, "record": 1, "record_sha256": "x"}) + "\n")
    with pytest.raises(DataFileError, match="line 2, field 'edit'"):
        applied_edits(journal)
    journal.write_text(json.dumps({"edit": 1, "record": "7", "record_sha256": "x"}) + "\n")
    with pytest.raises(DataFileError, match="line 1, field 'record'"):
        applied_edits(journal)


class _BreakImage(Callback):
    """After edit 1, replaces a later record's image with a truncated file (it changed after the set-up check)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.original = self.path.read_bytes()
            self.path.write_bytes(self.original[: len(self.original) // 3])


def test_a_failure_mid_stream_saves_the_edits_done_and_the_stream_resumes(tiny_llava_dir, data, tmp_path, caplog):
    whole = _config(tmp_path, tiny_llava_dir, data, "whole")
    cli.main(["fit", "--config", str(whole)])
    journal = applied_edits(_run_dir(tmp_path, "whole") / "journal.jsonl")
    records = json.loads((data / "vqa_eval.json").read_text())
    victim = data / "coco" / records[journal[3].record]["image"]  # the 4th edit's image

    config = _config(tmp_path, tiny_llava_dir, data, "broken")
    breaker = _BreakImage(victim)
    original = victim.read_bytes()
    from lightning.pytorch.cli import LightningCLI

    class _WithBreaker(cli.EditCLI):
        def instantiate_trainer(self, **kwargs):
            kwargs.setdefault("callbacks", []).append(breaker)
            return LightningCLI.instantiate_trainer(self, **kwargs)

    with pytest.raises(DataFileError) as failure:
        _WithBreaker(subclass_mode_model=True, subclass_mode_data=True, args=["fit", "--config", str(config)])
    message = str(failure.value)
    assert f"vqa_eval.json#{journal[3].record}" in message and "field 'image'" in message
    run = _run_dir(tmp_path, "broken")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["num_edits"] in (2, 3)
    done = metrics["num_edits"]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert [e.edit for e in applied_edits(run / "journal.jsonl")] == list(range(1, done + 1))
    assert read_journal(run / "journal.jsonl")[-1]["event"] == "failed"
    assert f"python cli.py fit --config {run / 'config.yaml'} --ckpt_path last" in caplog.text

    victim.write_bytes(original)  # the user fixes the file and goes on
    cli.main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last"])
    _assert_same_run(_run_dir(tmp_path, "whole"), run)


def test_an_edit_state_is_never_applied_twice(tiny_llava_dir, data, tmp_path):
    config = _config(tmp_path, tiny_llava_dir, data)
    cli.main(["fit", "--config", str(config)])
    state = _run_dir(tmp_path, "stream") / "edit_state.safetensors"
    with pytest.raises(StreamError, match=r"would write it\s+twice"):
        cli.main(["fit", "--config", str(config), "--model.init_args.load_edit_state", str(state)])
    assert cli.run(["fit", "--config", str(config), "--model.init_args.load_edit_state", str(state)]) == 1

    # other records on top of that state are fine, and the new state lists all seven
    captions = _config(tmp_path, tiny_llava_dir, data, "captions", "caption_eval_edit.json")
    load = ["--model.init_args.load_edit_state", str(state)]
    cli.main(["fit", "--config", str(captions), *load, "--data.init_args.num_edits", "3"])
    from safetensors import safe_open

    with safe_open(str(_run_dir(tmp_path, "captions") / "edit_state.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["num_edits"] == "7" and len(set(json.loads(metadata["records"]))) == 7


def test_empty_locality_answers_are_errors_unless_skipping_is_asked_for(tiny_llava_dir, data, tmp_path):
    records = json.loads((data / "vqa_eval.json").read_text())
    records[1]["loc_ans"] = " "
    records[2]["m_loc_a"] = ""
    (data / "vqa_eval.json").write_text(json.dumps(records))
    config = _config(tmp_path, tiny_llava_dir, data)
    with pytest.raises(DataFileError, match="record 1, field 'loc_ans'"):
        cli.main(["fit", "--config", str(config)])
    cli.main(["fit", "--config", str(config), "--data.init_args.empty_locality", "skip"])
    run = next((tmp_path / "runs" / "stream").glob("version_*/metrics.json")).parent
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["locality_skipped"] == {"t_loc": 1, "m_loc": 1}
    lines = [e for e in read_journal(run / "journal.jsonl") if "scores" in e]
    by_record = {e["record"]: e["scores"] for e in lines}
    assert "t_loc" not in by_record[1] and "m_loc" not in by_record[2] and "avg" not in by_record[1]
    scored = [s["t_loc"] for s in by_record.values() if "t_loc" in s]
    assert len(scored) == 3
    assert metrics["immediate"]["t_loc"] == pytest.approx(sum(scored) / 3, abs=1e-4)
