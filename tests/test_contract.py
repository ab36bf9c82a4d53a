"""The stream module satisfies the typed contract callbacks and editors read (``EditEngine``)."""

from __future__ import annotations

import torch

from more_lightning.backbones.llava import LlavaBackbone
from more_lightning.contract import EditEngine, shift_for_loss
from more_lightning.editors.more import MORE
from more_lightning.module import OnlineEditModule
from tests.test_module import _stream


def test_online_edit_module_is_an_edit_engine_and_encodes_one_query(tiny_llava_dir):
    module = OnlineEditModule(LlavaBackbone(path=str(tiny_llava_dir), num_text_layers=2), MORE(r=8, alpha=16))
    assert isinstance(module, EditEngine)
    assert not isinstance(object(), EditEngine)
    query = _stream().stream[0].edit
    inputs = module.encode_query(query)
    direct = module.backbone.encode(module.processor, query, module.image_token_id)
    assert torch.equal(inputs.input_ids, direct.input_ids) and torch.equal(inputs.labels, direct.labels)
    assert inputs.pixel_values.dtype == module.model.dtype and inputs.input_ids.device == module.device
    assert torch.equal(module.encode(_stream().stream[0])["edit"].input_ids, inputs.input_ids)


def test_shift_for_loss_pairs_each_position_with_the_next_token():
    logits, labels = torch.arange(12.0).reshape(1, 4, 3), torch.tensor([[5, 6, 7, 8]])
    shifted_logits, shifted_labels = shift_for_loss(logits, labels)
    assert torch.equal(shifted_logits, logits[:, :3]) and torch.equal(shifted_labels, torch.tensor([[6, 7, 8]]))
