"""The editor's own tensors follow the module to its device and dtype (Lightning moves the module after the editor
was attached on the CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from more_lightning.backbones.llava import LlavaBackbone
from more_lightning.editors.grace import GRACE
from more_lightning.editors.ike import IKE
from more_lightning.editors.liveedit import LiveEdit
from more_lightning.module import OnlineEditModule


def _editor_tensors(editor) -> dict[str, torch.Tensor]:
    found = {}
    for name, value in vars(editor).items():
        if isinstance(value, torch.Tensor):
            found[name] = value
        elif isinstance(value, nn.Module):
            found |= {f"{name}.{k}": v for k, v in value.state_dict().items()}
    return found


EDITORS = {"GRACE": GRACE, "LiveEdit": LiveEdit, "IKE": IKE}


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_a_dtype_change_reaches_the_editor_in_place(name, tiny_llava_dir):
    editor = EDITORS[name]()
    module = OnlineEditModule(LlavaBackbone(path=str(tiny_llava_dir), num_text_layers=2), editor)
    before = _editor_tensors(editor)
    assert before and all(t.dtype == torch.float32 for t in before.values())
    module.double()
    after = _editor_tensors(editor)
    assert after.keys() == before.keys()
    assert all(t.dtype == torch.float64 for t in after.values())
    for key, tensor in before.items():
        if isinstance(tensor, nn.Parameter):
            assert after[key] is tensor  # the same parameter, changed in place: an optimizer holding it still does


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_a_device_move_reaches_the_editor(name, tiny_llava_dir):
    editor = EDITORS[name]()
    module = OnlineEditModule(LlavaBackbone(path=str(tiny_llava_dir), num_text_layers=2), editor)
    module.to("meta")
    assert next(module.model.parameters()).device.type == "meta"
    assert all(t.device.type == "meta" for t in _editor_tensors(editor).values())


def test_serac_networks_follow_the_module():
    from more_lightning.editors.serac import SERAC

    root = Path(__file__).resolve().parents[1]
    editor = SERAC(networks=str(root / "models/tiny_llava_serac.safetensors"))
    backbone = LlavaBackbone(path=str(root / "models/tiny_llava"), num_text_layers=2)
    module = OnlineEditModule(backbone, editor)
    module.to("meta")
    tensors = _editor_tensors(editor)
    assert any(k.startswith("networks.") for k in tensors)
    assert all(t.device.type == "meta" for t in tensors.values())
