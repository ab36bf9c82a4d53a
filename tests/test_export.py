"""Export: a peft adapter and a merged checkpoint, reloaded without project code, reproduce the edited model.

Two-edit streams run through ``cli.py`` on the committed tiny LLaVA; the in-project reference is a fresh module
with the stream's edit state loaded. float32 throughout, so logits must agree to 1e-4.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

import cli
from more_lightning.backbones.llava import LlavaBackbone
from more_lightning.editors.ft_l import FTL
from more_lightning.editors.more import MORE
from more_lightning.editors.state import load_edit_state
from more_lightning.export import main
from more_lightning.module import OnlineEditModule

from .conftest import MMEDIT
from .stream_helpers import stream_config
from .test_module import _stream

ROOT = Path(__file__).parent.parent
TINY = ROOT / "models" / "tiny_llava"
#: r = 112 exceeds linear_1's input width (96): its rank is capped there, so the adapter needs a rank_pattern entry.
EDITORS = {
    "more": (MORE, {"r": 112, "alpha": 224, "eta": 0.3, "lam": 1.0, "prior": "public"}),
    "ft-l": (FTL, {"lr": 0.01, "steps_per_edit": 2}),
}
QUERIES = ("edit", "t_loc", "m_loc")  # an edited query, a text and a multimodal locality query
ATOL = 1e-4  # float32


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per editor: the config and the edit state of a two-edit stream."""
    out = {}
    for name, (cls, kwargs) in EDITORS.items():
        folder = tmp_path_factory.mktemp(name)
        editor = "{" + ", ".join(f"{k}: {v}" for k, v in kwargs.items()) + "}"
        config = stream_config(
            folder / "run.yaml",
            TINY,
            MMEDIT,
            num_edits=2,
            editor=editor,
            editor_class=f"{cls.__module__}.{cls.__name__}",
        )
        cli.main(["fit", "--config", str(config)])
        out[name] = (config, next(folder.rglob("edit_state.safetensors")))
    return out


@pytest.fixture(scope="module")
def queries():
    return _stream(num_edits=2).stream[0]


def _edited(name: str, state: Path) -> OnlineEditModule:
    cls, kwargs = EDITORS[name]
    module = OnlineEditModule(LlavaBackbone(path=str(TINY), num_text_layers=2), cls(**kwargs))
    load_edit_state(module.model, module.editor.configure_optimizer(), state)
    return module


@torch.no_grad()
def _logits(model, inputs) -> torch.Tensor:
    return model(**inputs.model_kwargs()).logits


def _export(config: Path, state: Path, out: Path, fmt: str) -> int:
    return main(["--config", str(config), "--edit-state", str(state), "--out", str(out), "--format", fmt])


def _max_diffs(module: OnlineEditModule, loaded, batch) -> dict[str, float]:
    inputs = module.encode(batch)
    with torch.no_grad():
        return {q: float((module.logits(inputs[q]) - _logits(loaded, inputs[q])).abs().max()) for q in QUERIES}


@pytest.mark.parametrize("name", list(EDITORS))
def test_merged_export_loads_with_transformers_alone_and_matches_the_edited_model(name, runs, queries, tmp_path):
    config, state = runs[name]
    assert _export(config, state, tmp_path / "merged", "merged") == 0
    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert type(loaded) is LlavaForConditionalGeneration
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    module = _edited(name, state)
    diffs = _max_diffs(module, loaded.eval(), queries)
    assert max(diffs.values()) <= ATOL, diffs
    base = LlavaForConditionalGeneration.from_pretrained(TINY).eval()
    edit = module.encode(queries)["edit"]
    assert (_logits(base, edit) - _logits(loaded, edit)).abs().max() > 1e-2  # the edits are in the export
    # the processor files are there and tokenise as the original processor does
    exported = module.backbone.encode(AutoProcessor.from_pretrained(tmp_path / "merged"), queries.edit, 4)
    assert torch.equal(exported.input_ids, edit.input_ids)
    torch.testing.assert_close(exported.pixel_values, edit.pixel_values, atol=0, rtol=0)


def test_peft_export_loads_with_peft_and_matches_the_edited_model(runs, queries, tmp_path):
    from peft import PeftModel

    config, state = runs["more"]
    out = tmp_path / "adapter"
    assert _export(config, state, out, "peft") == 0
    module = _edited("more", state)
    paths = [name for name, _, _ in module.editor.adapters]
    weights = load_file(out / "adapter_model.safetensors")
    assert set(weights) == {f"base_model.model.{p}.lora_{ab}.weight" for p in paths for ab in "AB"}
    settings = json.loads((out / "adapter_config.json").read_text())
    assert (settings["r"], settings["lora_alpha"], settings["peft_type"]) == (112, 224, "LORA")
    assert set(settings["rank_pattern"].values()) == {96} and set(settings["alpha_pattern"].values()) == {192}
    base = LlavaForConditionalGeneration.from_pretrained(TINY).eval()
    edit = module.encode(queries)["edit"]
    before = _logits(base, edit)
    loaded = PeftModel.from_pretrained(base, out).eval()
    diffs = _max_diffs(module, loaded, queries)
    assert max(diffs.values()) <= ATOL, diffs
    assert (before - _logits(loaded, edit)).abs().max() > 1e-2  # the adapter changes the base model


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_peft_format_of_a_dense_editor_is_one_clear_error(runs, tmp_path, caplog):
    config, state = runs["ft-l"]
    assert _export(config, state, tmp_path / "adapter", "peft") == 1
    [message] = _errors(caplog)
    assert message.startswith("error: editor FTL writes dense weights") and "--format merged" in message
    assert not (tmp_path / "adapter").exists() and not list(tmp_path.iterdir())


def _case(case: str, runs, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(config, edit state, out) of a user error ``case``."""
    (config, state), (ftl_config, ftl_state) = runs["more"], runs["ft-l"]
    out = tmp_path / "out"
    if case == "no-state":
        state = tmp_path / "nope.safetensors"
    elif case == "ft-l-state-for-more":
        state = ftl_state
    elif case == "more-state-for-ft-l":
        config = ftl_config
    elif case == "other-rank":
        config = stream_config(tmp_path / "r8.yaml", TINY, MMEDIT, editor="{r: 8, alpha: 16}")
    elif case == "other-seed":  # the same shapes, other fixed write bases A: B would mean something else
        kwargs = {**EDITORS["more"][1], "seed": 1}
        editor = "{" + ", ".join(f"{k}: {v}" for k, v in kwargs.items()) + "}"
        config = stream_config(tmp_path / "seed1.yaml", TINY, MMEDIT, editor=editor)
    elif case == "no-checkpoint":
        config = stream_config(tmp_path / "nockpt.yaml", tmp_path / "missing_model", MMEDIT)
    elif case == "unknown-option":
        config = stream_config(tmp_path / "typo.yaml", TINY, MMEDIT, editor="{r: 8, alpah: 16}")
    elif case == "out-not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    return config, state, out


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no-state", "nope.safetensors not found"),
        ("ft-l-state-for-more", "does not fit this editor and model"),
        ("more-state-for-ft-l", "does not fit this editor and model"),
        ("other-rank", "write_bases seed=0 r=112, this editor has seed=0 r=8"),
        ("other-seed", "was written with write_bases seed=0 r=112, this editor has seed=1 r=112"),
        ("no-checkpoint", "no checkpoint at"),
        ("unknown-option", "Option 'alpah' is not accepted"),
        ("out-not-empty", "is not an empty folder"),
    ],
)
def test_user_errors_are_one_line_and_status_1(case, expected, runs, tmp_path, caplog):
    config, state, out = _case(case, runs, tmp_path)
    assert _export(config, state, out, "merged") == 1
    [message] = _errors(caplog)
    assert message.startswith("error: ") and expected in message and "\n" not in message
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_missing_config_from_the_command_line(tmp_path):
    command = [sys.executable, "-m", "more_lightning.export", "--config", str(tmp_path / "nope.yaml")]
    command += ["--edit-state", str(tmp_path / "s.safetensors"), "--out", str(tmp_path / "o"), "--format", "merged"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: config {tmp_path / 'nope.yaml'} not found; give a stream config, e.g. configs/tiny_llava_eic.yaml"
    ]
