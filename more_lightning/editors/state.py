"""Saving and loading an editor's state (written weights + optimizer statistics) with safetensors.

No pickle anywhere: tensors go to a ``.safetensors`` file, written to a temporary file in the same
folder and moved into place with ``os.replace`` so a crash never leaves a half-written state.
Keys: ``param/<parameter name>`` for every trainable model parameter (B, A when trained, FT-L's
weight) and ``optim/<group index>/<param index>/<state key>`` for optimizer statistics (P, counters).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


def edit_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = {f"param/{n}": p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    for gi, group in enumerate(optimizer.param_groups):
        for pi, param in enumerate(group["params"]):
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor):
                    state[f"optim/{gi}/{pi}/{key}"] = value.detach().cpu().contiguous()
    return state


def save_edit_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    path: str | Path,
    metadata: dict[str, str] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write :func:`edit_state_dict` (or ``state``, that dict already taken) atomically to ``path``."""
    save_tensors(edit_state_dict(model, optimizer) if state is None else state, path, metadata)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to the safetensors file ``path`` atomically (a temporary file moved into place)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@torch.no_grad()
def apply_edit_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, torch.Tensor],
    source: str = "edit state",
) -> None:
    """Write a state in :func:`edit_state_dict`'s layout into ``model`` and ``optimizer`` (as copies).

    ``source`` names where the state came from in errors. ``optimizer=None`` writes the parameters only.
    """
    params = dict(model.named_parameters())
    for key, value in state.items():
        kind, _, rest = key.partition("/")
        if kind == "param":
            if rest not in params:
                raise KeyError(f"{source}: parameter {rest!r} is not in this model; was the editor configured alike?")
            params[rest].copy_(value)
        elif kind == "optim" and optimizer is not None:
            gi, pi, name = rest.split("/", 2)
            param = optimizer.param_groups[int(gi)]["params"][int(pi)]
            optimizer.state[param][name] = value.to(param.device, copy=True)


def check_edit_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "edit state") -> None:
    """Raise ``ValueError`` unless the parameters of ``state`` are exactly ``model``'s trainable parameters, shape for
    shape: a state written by another editor, rank or set of edit points does not fit."""
    expected = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    given = {k.removeprefix("param/"): tuple(v.shape) for k, v in state.items() if k.startswith("param/")}
    missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
    if missing or unexpected:
        parts = [
            f"{what} {', '.join(names[:2])}{', ...' if len(names) > 2 else ''} ({len(names)})"
            for what, names in (("it lacks", missing), ("it has no place for", unexpected))
            if names
        ]
        raise ValueError(
            f"{source} does not fit this editor and model: {'; '.join(parts)}; use the config it was written with"
        )
    for name, shape in given.items():
        if shape != expected[name]:
            raise ValueError(
                f"{source}: {name} has shape {list(shape)}, this editor has {list(expected[name])} (another rank?); "
                "use the config it was written with"
            )


def check_state_metadata(expected: dict[str, str], saved: dict[str, str], source: str = "edit state") -> None:
    """Raise ``ValueError`` where ``saved`` (an edit state's metadata) gives a setting another value than
    ``expected`` (the editor's :meth:`~more_lightning.editors.base.Editor.state_metadata`)."""
    for key, value in expected.items():
        if key in saved and saved[key] != value:
            raise ValueError(
                f"{source} was written with {key} {saved[key]}, this editor has {value}; "
                "use the config it was written with"
            )


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_edit_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path, expected: dict[str, str] | None = None
) -> dict[str, str]:
    """Restore a state written by :func:`save_edit_state` into an identically configured editor.

    ``expected``: the editor's state metadata, checked against the file's first. Returns the file's metadata
    (``num_edits``, ``records``: JSON list of the applied records' hashes, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"edit state {str(path)!r} not found (set `--model.init_args.load_edit_state`)")
    metadata = read_metadata(path)
    check_state_metadata(expected or {}, metadata, f"edit state {path}")
    apply_edit_state(model, optimizer, load_file(path), path.name)
    return metadata


def keep_stats_dtype(
    optimizer: torch.optim.Optimizer, state_dict: dict, names: tuple[str, ...], dtype: torch.dtype
) -> None:
    """After ``optimizer.load_state_dict(state_dict)``: put the statistics ``names`` back in ``dtype``, and integer
    counters (``num_keys``, ...) back in their saved dtype.

    torch casts optimizer state to its parameter's dtype on load; an editor's statistics (P, C) stay in their own
    dtype whatever the model's, and its counters stay integers.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, saved in state_dict["state"].items():
        param = params[index]
        for name, value in saved.items():
            if name in names:
                optimizer.state[param][name] = value.to(device=param.device, dtype=dtype).clone()
            elif isinstance(value, torch.Tensor) and not value.is_floating_point():
                optimizer.state[param][name] = value.clone()


def texts_to_tensors(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``texts`` as safetensors-ready tensors: their UTF-8 bytes concatenated (uint8) and each text's end offset
    (int64, so text ``i`` is ``data[ends[i-1]:ends[i]]``). :func:`texts_from_tensors` inverts it exactly."""
    encoded = [t.encode("utf-8") for t in texts]
    data = torch.tensor(list(b"".join(encoded)), dtype=torch.uint8)
    ends = torch.tensor([len(b) for b in encoded], dtype=torch.int64).cumsum(0)
    return data, ends


def texts_from_tensors(data: torch.Tensor, ends: torch.Tensor) -> list[str]:
    """The texts :func:`texts_to_tensors` stored (tolerates tensors cast to float by ``Optimizer.load_state_dict``)."""
    raw = bytes(data.to(torch.uint8).cpu().tolist())
    bounds = [0, *ends.long().cpu().tolist()]
    return [raw[a:b].decode("utf-8") for a, b in itertools.pairwise(bounds)]


def save_networks_file(module: nn.Module, path: str | Path, metadata: dict[str, str]) -> None:
    """Write a trained editor network's ``state_dict`` (and ``metadata``) to a safetensors file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, path, metadata)


def networks_file_metadata(path: str | Path, what: str, file_format: str, hint: str) -> dict[str, str]:
    """The metadata of the networks file ``path`` that ``what`` (e.g. "SERAC networks") reads, after checking that it
    exists and carries ``file_format``; ``hint`` says how to make one.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the file is not one of these networks files.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} {str(path)!r} not found: {hint} (it writes model.init_args.out_file), or set "
            "--model.init_args.editor.init_args.networks to that file"
        )
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    if metadata.get("format") != file_format:
        raise ValueError(f"{path} is not a {what} file (no {file_format!r} metadata); {hint}")
    return metadata


#: the keys :func:`adam_update` keeps in a parameter's optimizer state
ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


@torch.no_grad()
def adam_update(param: Tensor, state: dict, lr: float, betas: tuple[float, float], eps: float) -> None:
    """One bias-corrected Adam step (Kingma & Ba) of ``param`` from its ``.grad``, moments kept in ``state``.

    For the memory editors whose optimizer state also holds their memory (GRACE's codebook, LiveEdit's experts):
    the moments sit beside it under :data:`ADAM_KEYS` and are dropped per edit with :func:`reset_adam`.
    """
    b1, b2 = betas
    if "exp_avg" not in state:
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(param), torch.zeros_like(param)
        state["step"] = torch.zeros((), dtype=torch.int64)
    state["step"] += 1
    t = int(state["step"])
    state["exp_avg"].mul_(b1).add_(param.grad, alpha=1 - b1)
    state["exp_avg_sq"].mul_(b2).addcmul_(param.grad, param.grad, value=1 - b2)
    denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(eps)
    param.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))


def reset_adam(state: dict) -> None:
    """Drop the Adam moments :func:`adam_update` left in ``state`` (the editor's memory stays)."""
    for name in ADAM_KEYS:
        state.pop(name, None)
