"""What the editors that never write the model share: their memory is tensors in their optimizer's ``state``, so
the edit state file, checkpoints and ``single_edits`` carry it like any optimizer statistics.

* :class:`MemoryOptimizer` / :class:`MemoryEditor` (IKE, SERAC): a memory of (prompt, new answer) pairs — one
  embedding row per edit (``embeddings`` (N, d) float32) and the texts as UTF-8 bytes with end offsets; the
  optimizer writes nothing, its one parameter is a zero-size anchor.
* :class:`MemoryAdam` (GRACE, LiveEdit): Adam on the entry an edit trains (a value, an expert), reset per edit;
  the memory sits in the state of its first parameter beside the moments.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from more_lightning.contract import EditPoint
from more_lightning.editors.base import Editor
from more_lightning.editors.state import adam_update, keep_stats_dtype, reset_adam, texts_from_tensors, texts_to_tensors


class MemoryOptimizer(torch.optim.Optimizer):
    """An optimizer that writes nothing: the protocol's place for a memory editor's state (on a zero-size anchor)."""

    def __init__(self, anchor: nn.Parameter) -> None:
        super().__init__([anchor], {})
        self._decoded: tuple[Tensor, list[tuple[str, str]]] | None = None  # (the prompt bytes they came from, texts)

    @property
    def memory(self) -> dict:
        return self.state[self.param_groups[0]["params"][0]]

    def step(self, closure=None):
        return None

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the text bytes and offsets stay integers."""
        super().load_state_dict(state_dict)
        keep_stats_dtype(self, state_dict, ("embeddings",), torch.float32)

    def entries(self) -> list[tuple[str, str]]:
        """(prompt, new answer) of every edit in the memory, oldest first. Retrieval reads them for every query, so
        they are decoded once per memory: every write (an edit, a load, a reset) puts new tensors in the state."""
        memory = self.memory
        if "prompt_bytes" not in memory:
            return []
        if self._decoded is None or self._decoded[0] is not memory["prompt_bytes"]:
            prompts = texts_from_tensors(memory["prompt_bytes"], memory["prompt_ends"])
            targets = texts_from_tensors(memory["target_bytes"], memory["target_ends"])
            self._decoded = (memory["prompt_bytes"], list(zip(prompts, targets, strict=True)))
        return list(self._decoded[1])

    def append(self, prompt: str, target: str, embedding: Tensor) -> None:
        """Add one edit: its prompt, new answer and embedding row (d,)."""
        entries = [*self.entries(), (prompt, target)]
        memory, row = self.memory, embedding[None]  # (1, d)
        memory["embeddings"] = torch.cat([memory["embeddings"], row]) if "embeddings" in memory else row  # (N, d)
        memory["prompt_bytes"], memory["prompt_ends"] = texts_to_tensors([p for p, _ in entries])
        memory["target_bytes"], memory["target_ends"] = texts_to_tensors([t for _, t in entries])


class MemoryEditor(Editor):
    """An editor that never writes the model and keeps its edits in a :class:`MemoryOptimizer`."""

    steps_per_edit = 0
    anchor: nn.Parameter | None = None
    optimizer: MemoryOptimizer | None = None

    def attach(self, model: nn.Module, edit_points: Sequence[EditPoint]) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        self.anchor = nn.Parameter(torch.zeros(0, device=next(model.parameters()).device))

    def configure_optimizer(self) -> torch.optim.Optimizer:
        if self.anchor is None:
            raise RuntimeError("attach() the editor to a model before configure_optimizer()")
        self.optimizer = MemoryOptimizer(self.anchor)
        return self.optimizer

    def entries(self) -> list[tuple[str, str]]:
        """(prompt, new answer) of every edit in the memory, oldest first (empty before the optimizer exists)."""
        return self.optimizer.entries() if self.optimizer is not None else []


class MemoryAdam(torch.optim.Optimizer):
    """Adam (bias-corrected) on the parameters of the entry being trained; the state of the first also holds the
    editor's memory, whose float tensors are ``float_keys``.

    Args:
        params: the trained entry's parameters (e.g. GRACE's value; LiveEdit's A and B).
        float_keys: the memory's float32 tensors, kept float32 through a checkpoint load (torch casts state to its
            parameter's dtype); other memory tensors (text bytes, flags) keep their own dtype.
        lr: Adam learning rate.
        betas: Adam's moment decays.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        float_keys: Sequence[str],
        lr: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__(list(params), {"lr": lr, "betas": betas, "eps": 1e-8})
        self.float_keys = tuple(float_keys)

    @property
    def memory(self) -> dict:
        return self.state[self.param_groups[0]["params"][0]]

    @torch.no_grad()
    def step(self, closure=None):
        """One Adam step on each parameter with a gradient (none: no step)."""
        group = self.param_groups[0]
        for p in group["params"]:
            if p.grad is not None:
                adam_update(p, self.state[p], group["lr"], group["betas"], group["eps"])
        return None

    def reset_moments(self) -> None:
        for p in self.param_groups[0]["params"]:
            reset_adam(self.state[p])

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        keep_stats_dtype(self, state_dict, self.float_keys, torch.float32)
