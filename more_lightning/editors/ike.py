"""IKE: in-context knowledge editing (Zheng et al., 2023) — the model is never written, the prompt is.

The editor keeps an edit memory: per edit, its prompt, its new answer and the prompt's embedding. Every query the
module encodes (loss, scores, retention, callbacks, ``predict``) is rewritten through
:meth:`IKE.rewrite_query`: the ``k`` memory entries most similar to the query's prompt, by cosine similarity, are
formatted with ``demo_template`` and prepended to it, in **ascending** similarity, so that the most similar
demonstration sits next to the query (IKE's ordering). An empty memory leaves queries as they are.

Retriever: IKE uses an unsupervised sentence encoder (EasyEdit: all-MiniLM-L6-v2); here the embedding is the
backbone's own: the mean of its input-embedding rows over the prompt's tokens (no special tokens, no image).
It needs nothing beyond the model, is deterministic, and is unsupervised, as IKE's retriever is; it is a
bag-of-words encoder, blind to word order.

Simplified versus the paper: demonstrations come from the edit memory only (IKE also mixes "update" and "retain"
demonstrations from a training corpus, to teach when a fact applies); every demonstration is the "copy" kind,
``demo_template`` filled with an edit's prompt and new answer; the image of an edited query is not kept (the
demonstrations are text). The edit's own entry is retrieved for it (similarity 1): the copy demonstration.

State: the memory is tensors in the optimizer's ``state`` (prompts and answers as UTF-8 bytes, the embeddings as
(N, d) float32), on a zero-size anchor parameter: the edit state file, checkpoints and ``single_edits`` carry it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from more_lightning.editors.memory import MemoryEditor

if TYPE_CHECKING:
    from more_lightning.backbones.base import ModelInputs
    from more_lightning.contract import EditEngine
    from more_lightning.data.records import Query


def retrieve(memory: Tensor, query: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` rows of ``memory`` (N, d) most cosine-similar to ``query`` (d,), in ascending similarity
    (the most similar last); ties keep memory order."""
    sims = F.cosine_similarity(memory, query[None], dim=1, eps=1e-8)  # (N,)
    top = torch.argsort(-sims, stable=True)[:k]  # descending
    return top.flip(0).tolist()


class IKE(MemoryEditor):
    """In-context editing from a memory of the stream's edits.

    Args:
        k: demonstrations per query (fewer while the memory is smaller).
        demo_template: one demonstration; ``{prompt}`` and ``{target}`` are an edit's prompt and new answer.
    """

    def __init__(self, k: int = 4, demo_template: str = "New Fact: {prompt} {target}\n") -> None:
        if k < 1:
            raise ValueError(f"IKE: k must be >= 1, got {k}")
        if "{prompt}" not in demo_template or "{target}" not in demo_template:
            raise ValueError(f"IKE: demo_template must hold {{prompt}} and {{target}}, got {demo_template!r}")
        self.k, self.demo_template = k, demo_template

    @torch.no_grad()
    def embed(self, text: str, engine: EditEngine) -> Tensor:
        """(d,) float32: the mean of the backbone's input-embedding rows over ``text``'s tokens (zeros if none)."""
        ids = engine.processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, n)
        table = engine.model.get_input_embeddings()
        if ids.numel() == 0:
            return torch.zeros(table.embedding_dim, device=table.weight.device)
        return table(ids.to(table.weight.device))[0].float().mean(dim=0)  # (n, d) -> (d,)

    def begin_edit(
        self,
        optimizer: torch.optim.Optimizer,
        engine: EditEngine,
        queries: dict[str, Query],
        inputs: dict[str, ModelInputs],
    ) -> None:
        edit = queries["edit"]
        self.optimizer.append(edit.prompt, edit.target, self.embed(edit.prompt, engine))

    def demonstrations(self, prompt: str, engine: EditEngine) -> list[tuple[str, str]]:
        """The memory entries shown before ``prompt``, in the order they are shown."""
        entries = self.entries()
        if not entries:
            return []
        order = retrieve(self.optimizer.memory["embeddings"], self.embed(prompt, engine), self.k)
        return [entries[i] for i in order]

    def rewrite_query(self, query: Query, engine: EditEngine) -> Query:
        demos = self.demonstrations(query.prompt, engine)
        if not demos:
            return query
        context = "".join(self.demo_template.format(prompt=p, target=t) for p, t in demos)
        return replace(query, prompt=context + query.prompt)
