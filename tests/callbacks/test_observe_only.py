"""Callbacks observe: a stream with every callback ends with bit-identical weights to one without."""

from __future__ import annotations

import torch
from torch import nn

from callbacks.base import observing


def test_callbacks_leave_weights_bit_identical(stream_run, plain_weights) -> None:
    observed = stream_run.module.model.state_dict()
    assert observed.keys() == plain_weights.keys()
    for name, value in plain_weights.items():
        assert torch.equal(observed[name], value), name
    assert any(v.abs().sum() > 0 for k, v in plain_weights.items() if k.endswith("lora_B"))  # edits did write


def test_observing_restores_each_module_mode() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model.train()
    model[0].eval()  # a module the engine keeps in eval mode
    with observing(model):
        assert not any(m.training for m in model.modules())
        assert not torch.is_grad_enabled()
    assert [m.training for m in model.modules()] == [True, False, True]
