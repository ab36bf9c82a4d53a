"""configs/analysis_tiny_llava_eic.yaml turns every callback on and runs through ``cli.py fit``.

The shipped file is run with only its paths swapped for the test fixtures (tiny random LLaVA, MMEdit
and MME fixtures) and a 2-edit horizon.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

import cli
from callbacks import __all__ as CALLBACKS
from tests.conftest import FIXTURES, MMEDIT

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "analysis_tiny_llava_eic.yaml"


def test_every_callback_is_on() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    names = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert sorted(names) == sorted(f"callbacks.{name}" for name in CALLBACKS)


def test_config_runs_with_fixture_paths(yes_no_llava_dir: Path, tmp_path: Path) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    config["model"]["init_args"]["backbone"]["init_args"]["path"] = str(yes_no_llava_dir)
    config["data"]["init_args"].update(
        data_file=str(MMEDIT / "caption_eval_edit.json"),
        image_root=str(MMEDIT / "coco"),
        rephrase_root=str(MMEDIT / "rephrase"),
        num_edits=2,
    )
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    config["trainer"]["enable_progress_bar"] = False
    for callback in config["trainer"]["callbacks"]:
        args = callback.setdefault("init_args", {})
        args["every_k_edits"] = 1
        for key in ("num_samples",):
            if key in args:
                args[key] = 2
        if callback["class_path"].endswith("GeneralCapability"):
            args.update(mme_root=str(FIXTURES / "mme"), categories=["existence"])
    path = tmp_path / "analysis.yaml"
    path.write_text(yaml.safe_dump(config))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = cli.main(["fit", "--config", str(path)])
    finally:
        torch.set_num_threads(threads)
    log_dir = Path(run.trainer.logger.log_dir)
    for name in ("representation_shift", "interference", "cross_modal", "edit_cost", "general_capability"):
        assert (log_dir / f"{name}.png").is_file(), name
