"""Greedy answers of a (possibly edited) model to a query: the ``predict`` subcommand's decoding.

Every step runs the whole sequence through :meth:`Backbone.logits` — the same forward the edit stream
scores with, through whatever wrappers or hooks the editor installed; given the stream's ``engine``, through its
``logits`` and on the query as its editor rewrites it — and appends the argmax token,
until the tokenizer's end-of-sequence token or ``max_new_tokens``. No key-value cache: answers are a
few tokens, and the cost is ``max_new_tokens`` forwards of at most prompt + answer length.
"""

from __future__ import annotations

import torch
from torch import nn

from more_lightning.backbones.base import Backbone
from more_lightning.contract import EditEngine
from more_lightning.data.records import Query


@torch.no_grad()
def greedy_tokens(
    backbone: Backbone,
    model: nn.Module,
    processor: object,
    query: Query,
    max_new_tokens: int = 32,
    image_token_id: int | None = None,
    engine: EditEngine | None = None,
) -> list[int]:
    """Token ids of the greedy answer to ``query.prompt`` (about ``query.image``; its ``target`` is not used).

    The end-of-sequence token is not included. ``image_token_id`` defaults to the backbone's. ``engine``: the edit
    stream's module, whose editor may rewrite the query and must see every forward (IKE, GRACE).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    token_id = backbone.image_token_id(processor, model) if image_token_id is None else image_token_id
    device = next(model.parameters()).device
    if engine is not None:
        query = engine.editor.rewrite_query(query, engine)
    forward = engine.logits if engine is not None else (lambda inputs: backbone.logits(model, inputs))
    inputs = backbone.encode_prompt(processor, query.prompt, query.image, token_id).to(device, model.dtype)
    eos = processor.tokenizer.eos_token_id
    answer: list[int] = []
    for _ in range(max_new_tokens):
        next_id = forward(inputs)[:, -1].argmax(-1)  # (1,)
        if eos is not None and int(next_id) == eos:
            break
        answer.append(int(next_id))
        # the answer so far is labelled as such, as a teacher-forced target is: the prompt keeps ending where it did
        inputs = inputs.append(next_id[:, None], supervised=True)  # (1, T+1)
    return answer


def greedy_answer(
    backbone: Backbone,
    model: nn.Module,
    processor: object,
    query: Query,
    max_new_tokens: int = 32,
    image_token_id: int | None = None,
    engine: EditEngine | None = None,
) -> str:
    """The greedy answer to ``query`` as text (:func:`greedy_tokens`, decoded without special tokens)."""
    ids = greedy_tokens(backbone, model, processor, query, max_new_tokens, image_token_id, engine)
    return processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
