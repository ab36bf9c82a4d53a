"""Export an edited model for use without this project.

    python -m more_lightning.export --config configs/tiny_llava_eic.yaml \\
        --edit-state runs/tiny_llava_eic/version_0/edit_state.safetensors --out exports/eic --format merged

The model and editor are built from the stream config's ``model`` section (as ``cli.py fit`` builds them), the edit
state is checked against them and written in, then:

* ``peft``: a LoRA adapter folder (``adapter_config.json``, ``adapter_model.safetensors``) for
  ``peft.PeftModel.from_pretrained(base_model, folder)``. Each low-rank write ``W + s · B A`` becomes a LoRA module
  with ``lora_A = A`` (r × d_in), ``lora_B = B`` (d_out × r) and ``lora_alpha = s · r``, since peft scales by
  ``lora_alpha / r``. Editors that write dense weights (FT-L, FT-M, AlphaEdit, MEND) have no adapter form.
* ``merged``: a checkpoint folder in the base model's own transformers class (config, safetensors weights,
  processor files) with every write folded in: ``W ← W + s · B A``, or the edited dense weight.

Nothing is unpickled: the config is YAML, the edit state safetensors. A user error is one ``error:`` line, status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from more_lightning.adapters.low_rank import LowRankLinear, unwrap_linear
from more_lightning.editors.state import apply_edit_state, check_edit_state, check_state_metadata, read_metadata
from more_lightning.module import OnlineEditModule

log = logging.getLogger(__name__)

FORMATS = ("peft", "merged")


class ExportError(RuntimeError):
    """The export cannot run as asked; the message says what to fix."""


def _require(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        hints = {
            "config": "give a stream config, e.g. configs/tiny_llava_eic.yaml",
            "edit state": "a stream writes <run folder>/edit_state.safetensors",
        }
        raise ExportError(f"{what} {path} not found; {hints[what]}")
    return path


def _innermost(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _parse_problem(message: str, section: str = "model") -> str:
    """A jsonargparse error about a config section on one line: the config key and the innermost reason."""
    lines = [line.strip() for line in message.splitlines()]
    start = next((i for i, line in enumerate(lines) if line.startswith("- ")), None)
    if start is None:
        return " ".join(lines)
    block = [lines[start][2:]]  # the first alternative (the section's class); the others are ``None``
    for line in lines[start + 1 :]:
        if line.startswith(("- ", "Given value")):
            break
        block.append(line)
    keys = [section, *re.findall(r'Parser key "([^"]+)"', "\n".join(block))]
    reasons = [line for line in block if not line.startswith(("Parser key", "Problem with given class_path"))]
    return f"{'.init_args.'.join(keys)}: {' '.join(reasons) or block[-1]}"


def build_module(config: str | Path) -> OnlineEditModule:
    """The :class:`OnlineEditModule` (backbone loaded, editor attached) that the stream config's ``model`` section
    describes, instantiated by jsonargparse as LightningCLI does."""
    return build_section(config, "model", OnlineEditModule)


def build_section(config: str | Path, key: str, base: type) -> Any:
    """The object of class ``base`` (or a subclass) that the ``key`` section of the stream config describes
    (``model``: the :class:`OnlineEditModule`; ``data``: the datamodule), instantiated by jsonargparse as
    LightningCLI does.

    Raises:
        ExportError: the config is missing, not YAML, lacks the section or sets it wrongly (names the config key).
    """
    from jsonargparse import ArgumentParser

    config = _require(config, "config")
    try:
        raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ExportError(f"config {config} is not valid YAML: {' '.join(str(exc).split())}") from exc
    section = raw.get(key) if isinstance(raw, dict) else None
    if not section:
        raise ExportError(f"config {config} has no `{key}` section; give a stream config such as the run's config.yaml")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, key, required=True, fail_untyped=False)
    try:
        parsed = parser.parse_object({key: section})
    except argparse.ArgumentError as exc:
        problem = _parse_problem(str(exc), key)
        if f"subclass of {base.__name__}" in problem:
            problem += " (give the config of an edit stream)"
        raise ExportError(f"config {config}, {problem}") from exc
    try:
        return getattr(parser.instantiate(parsed), key)
    except Exception as exc:  # jsonargparse wraps what __init__ raised
        cause = _innermost(exc)
        if isinstance(cause, (OSError, ValueError)):
            raise ExportError(f"config {config}: {cause}") from exc
        raise


def apply_state_file(module: OnlineEditModule, path: str | Path) -> None:
    """Check the edit state at ``path`` against ``module``'s editor and model, then write its parameters in.

    Optimizer statistics (P, counters) are not needed for inference and are left out.
    """
    path = _require(path, "edit state")
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"edit state {path} is not a safetensors file ({exc})") from exc
    params = {k: v for k, v in state.items() if k.startswith("param/")}
    try:
        check_state_metadata(module.editor.state_metadata(), read_metadata(path), f"edit state {path}")
        check_edit_state(module.model, params, f"edit state {path}")
    except ValueError as exc:
        raise ExportError(f"{exc} (editor {type(module.editor).__name__})") from exc
    apply_edit_state(module.model, None, params, path.name)


def _written(module: OnlineEditModule) -> dict:
    written = module.editor.written_modules()
    if not written:
        raise ExportError(f"editor {type(module.editor).__name__} writes no weights: there is nothing to export")
    return written


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def low_rank_writes(module: OnlineEditModule) -> dict[str, LowRankLinear]:
    """The editor's written modules by path, when all of them are low-rank writes ``W + s · B A``.

    Raises:
        ExportError: the editor writes dense weights (no adapter form).
    """
    written = _written(module)
    if not all(isinstance(m, LowRankLinear) for m in written.values()):
        raise ExportError(
            f"editor {type(module.editor).__name__} writes dense weights, which have no PEFT adapter form; "
            "export it with --format merged"
        )
    return written


def lora_settings(adapters: dict[str, LowRankLinear]) -> dict:
    """``LoraConfig`` arguments reproducing ``adapters``: the commonest (r, lora_alpha) as defaults, the others as
    ``rank_pattern`` / ``alpha_pattern`` entries that match one module path exactly."""
    pairs = {path: (a.r, _number(a.scaling * a.r)) for path, a in adapters.items()}  # peft: scaling = lora_alpha / r
    r, alpha = Counter(pairs.values()).most_common(1)[0][0]
    others = {re.escape(path): pair for path, pair in pairs.items() if pair != (r, alpha)}
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {key: pair[0] for key, pair in others.items()},
        "alpha_pattern": {key: pair[1] for key, pair in others.items()},
        "target_modules": sorted(adapters),
        "lora_dropout": 0.0,
        "bias": "none",
    }


@torch.no_grad()
def write_peft(module: OnlineEditModule, out: Path) -> None:
    """Save the low-rank writes of ``module`` as a peft LoRA adapter in ``out`` (``module.model`` is changed)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ExportError("--format peft needs the peft library: pip install -e '.[export]'") from exc
    adapters = low_rank_writes(module)
    config = LoraConfig(**lora_settings(adapters))
    model = module.model
    for path in adapters:
        unwrap_linear(model, path)  # back to the base model; peft wraps the same linears
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations peft still calls
        peft_model = get_peft_model(model, config)
    for path, adapter in adapters.items():
        layer = peft_model.base_model.model.get_submodule(path)
        layer.lora_A["default"].weight.copy_(adapter.lora_A)  # (r, d_in)
        layer.lora_B["default"].weight.copy_(adapter.lora_B)  # (d_out, r)
    peft_model.save_pretrained(out, save_embedding_layers=False)


@torch.no_grad()
def write_merged(module: OnlineEditModule, out: Path) -> None:
    """Save ``module``'s edited model with every write folded into its weights, and its processor, in ``out``."""
    model = module.model
    for path, layer in _written(module).items():
        if isinstance(layer, LowRankLinear):
            unwrap_linear(model, path, merge=True)
    model.save_pretrained(out)
    module.processor.save_pretrained(out)


def export(config: str | Path, edit_state: str | Path, out: str | Path, fmt: str) -> Path:
    """Build the edited model from ``config`` and ``edit_state`` and write it to the new folder ``out`` in format
    ``fmt`` (``peft`` or ``merged``). The folder appears complete or not at all."""
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder; give a new one")
    _require(config, "config")  # both before the model loads
    _require(edit_state, "edit state")
    module = build_module(config)
    apply_state_file(module, edit_state)
    if fmt == "peft":
        low_rank_writes(module)  # refuse dense writers before writing anything
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        (write_peft if fmt == "peft" else write_merged)(module, tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the export; a user error is logged as one ``error:`` line and gives status 1."""
    parser = argparse.ArgumentParser(
        prog="python -m more_lightning.export",
        description="Export an edited model as a peft LoRA adapter or a merged checkpoint.",
    )
    parser.add_argument("--config", required=True, help="the stream config the edit state was written with")
    parser.add_argument("--edit-state", required=True, help="edit_state.safetensors of a run")
    parser.add_argument("--out", required=True, help="new folder to write")
    parser.add_argument("--format", required=True, choices=FORMATS, help="peft: LoRA adapter; merged: checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export(args.config, args.edit_state, args.out, args.format)
    except ExportError as exc:
        log.error("error: %s", exc)
        return 1
    log.info("wrote the %s export to %s", args.format, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
