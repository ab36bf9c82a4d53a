"""more-lightning command line: ``python cli.py fit --config configs/tiny_llava_eic.yaml``.

A thin LightningCLI: the model and data classes come from the config's ``class_path`` (edit
streams, the embedded world's pretraining, ...); ``--print_config`` shows every setting and
dotted overrides such as ``--data.num_edits 10`` change one.

``--ckpt_path last`` continues the newest run of the config's logger (``<save_dir>/<name>/version_*``)
from its ``checkpoints/last.ckpt``, in that run's folder; a path to a checkpoint continues from it.
A user error (bad file, bad record, a stream that cannot go on) ends with one message, not a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import warnings

from lightning.pytorch.cli import LightningCLI

from more_lightning.data.schema import DataFileError
from more_lightning.module import StreamError


class EditCLI(LightningCLI):
    """LightningCLI that resolves ``--ckpt_path last`` to a run folder and resumes in it."""

    def before_fit(self) -> None:
        config = self.config_init[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            return
        logger = self.trainer.logger
        root = Path(logger.root_dir) if logger is not None and getattr(logger, "root_dir", None) else None
        path = find_last_checkpoint(root) if ckpt_path == "last" else Path(ckpt_path)
        if not path.is_file():
            raise StreamError(f"checkpoint {path} not found — pass a run's checkpoints/last.ckpt or `last`")
        run_dir = path.parent.parent
        if root is not None and run_dir.parent.resolve() == root.resolve() and hasattr(logger, "_version"):
            logger._version = run_dir.name  # log on into the run's own folder (TensorBoard / CSV loggers)
        config["ckpt_path"] = str(path)


def find_last_checkpoint(root: Path | None) -> Path:
    """The most recently written ``<root>/version_*/checkpoints/last.ckpt``.

    Raises:
        StreamError: there is none (no silent fresh start).
    """
    candidates = sorted(root.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime) if root else []
    if not candidates:
        where = f"{root}/*/checkpoints/last.ckpt" if root else "this run (it has no logger folder)"
        raise StreamError(
            f"--ckpt_path last: no checkpoint to resume from in {where}. A stream writes one every "
            "model.init_args.save_every edits; run without --ckpt_path to start a new stream."
        )
    return candidates[-1]


DESCRIPTION = (
    "more-lightning: online (lifelong) editing of multimodal LLMs. `fit` runs an edit stream (or the embedded "
    "world's pretraining) from a config in configs/, e.g. `python cli.py fit --config configs/tiny_llava_eic.yaml`."
)
#: Where configs live; ``--config NAME.yaml`` that is not a path is looked up here.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def resolve_config_args(args: list[str]) -> list[str]:
    """``args`` with every ``--config X`` / ``-c X`` / ``--config=X`` that names no file but a file of
    ``configs/`` pointed at that file.

    Raises:
        FileNotFoundError: ``X`` is neither, naming where the configs are.
    """
    out = list(args)
    for i, arg in enumerate(out):
        value, prefix = None, ""
        if arg in ("--config", "-c") and i + 1 < len(out):
            value, i = out[i + 1], i + 1
        elif arg.startswith("--config="):
            value, prefix = arg.split("=", 1)[1], "--config="
        if value is None or value.lstrip().startswith(("{", "[")) or Path(value).is_file():
            continue
        candidate = CONFIG_DIR / value
        if candidate.is_file():
            out[i] = prefix + str(candidate)
            continue
        names = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))[:6])
        raise FileNotFoundError(
            f"config {value} not found, nor {candidate}; the configs are in {CONFIG_DIR} ({names}, ...)"
        )
    return out


def main(args: list[str] | None = None) -> LightningCLI:
    if args is None:  # from the command line: LightningCLI reads sys.argv itself
        sys.argv[1:] = resolve_config_args(sys.argv[1:])
    else:
        args = resolve_config_args(args)
    # the frozen backbone is kept in eval mode on purpose (no dropout while editing); only the editor trains
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
    return EditCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION},
        args=args,
    )


USER_ERRORS = (DataFileError, StreamError, FileNotFoundError)


def user_error(exc: BaseException) -> BaseException | None:
    """The user error behind ``exc`` (itself, or what it was raised from: jsonargparse wraps errors of ``__init__``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, USER_ERRORS):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


def run(args: list[str] | None = None) -> int:
    """:func:`main`, with user errors reported as one line on stderr and exit status 1."""
    try:
        main(args)
    except Exception as exc:
        cause = user_error(exc)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
