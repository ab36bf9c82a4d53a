"""more-lightning command line: ``python cli.py fit --config configs/tiny_llava_eic.yaml``.

A thin LightningCLI: the model and data classes come from the config's ``class_path`` (edit
streams, the embedded world's pretraining, ...); ``--print_config`` shows every setting and
dotted overrides such as ``--data.num_edits 10`` change one.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
