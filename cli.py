"""more-lightning command line: ``python cli.py fit --config configs/tiny_llava_eic.yaml``.

A thin LightningCLI: the model and data classes come from the config's ``class_path`` (edit
streams, the embedded world's pretraining, ...); ``--print_config`` shows every setting and
dotted overrides such as ``--data.init_args.num_edits 10`` change one. Two subcommands: ``fit`` runs
an edit stream (or a training), ``predict`` answers the questions of ``--data.init_args.predict_file``
with the config's model and ``--model.init_args.load_edit_state``.

``--ckpt_path last`` continues the newest run of the config's logger (``<save_dir>/<name>/version_*``)
from its ``checkpoints/last.ckpt``, in that run's folder; a path to a checkpoint continues from it.
A user error (bad file, bad record, an invalid setting, a stream that cannot go on) ends with one
``error:`` line and exit status 1, not a traceback; ``--debug`` (or ``MORE_LIGHTNING_DEBUG=1``) shows
the traceback. A run that fails before it produced anything leaves no run folder behind.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import logging
import warnings
from argparse import ArgumentError

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.model_helpers import is_overridden

from more_lightning.data.schema import DataFileError
from more_lightning.errors import SettingError, plain_parse_error, setting_error
from more_lightning.module import StreamError
from more_lightning.progress import EditProgressBar
from more_lightning.run_folder import new_run_folders, remove_unused


class EditCLI(LightningCLI):
    """LightningCLI that resolves ``--ckpt_path last`` to a run folder and resumes in it.

    It offers ``fit`` and ``predict`` (``validate`` / ``test`` would score nothing an edit stream defines),
    raises parse errors and invalid settings as exceptions that :func:`run` words in one line, counts edits
    on the progress bar, and removes the run folder of a run that failed before producing anything.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {key: value for key, value in LightningCLI.subcommands().items() if key in ("fit", "predict")}

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        kwargs.setdefault("exit_on_error", False)  # parse errors are raised, for run() to print in one line
        return super().init_parser(**kwargs)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as exc:
            if user_error(exc) is not None:  # already says what to fix (a missing file, a bad record)
                raise
            error = setting_error(exc, self.config.get(str(self.subcommand), self.config))
            if error is None:
                raise
            raise error from exc

    def _instantiate_trainer(self, config: dict, callbacks: list[Callback]) -> Trainer:
        listed = config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        has_bar = any(isinstance(c, ProgressBar) for c in [*listed, *callbacks])
        if config.get("enable_progress_bar") is not False and not has_bar:
            callbacks = [*callbacks, EditProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def _run_subcommand(self, subcommand: str) -> None:
        fresh = new_run_folders(self.trainer.logger)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            remove_unused(fresh)
            raise
        if subcommand == "predict":  # answers written elsewhere (data.init_args.predict_out): no folder of config only
            remove_unused(fresh)

    def before_predict(self) -> None:
        if not is_overridden("predict_step", self.model):
            raise SettingError(
                f"predict needs an edit-stream config: {type(self.model).__name__} answers no questions "
                "(e.g. --config tiny_llava_eic.yaml)"
            )

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
    "world's pretraining) from a config in configs/, e.g. `python cli.py fit --config configs/tiny_llava_eic.yaml`; "
    "`predict` answers the questions of --data.init_args.predict_file with a saved edit state "
    "(--model.init_args.load_edit_state). --debug shows the traceback of an error."
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
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_advert)
    # Lightning's own use of a torch API that torch has deprecated: nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    return EditCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION},
        args=args,
    )


def _no_advert(record: logging.LogRecord) -> bool:
    """Drop Lightning's tips that advertise its cloud services."""
    return not str(record.msg).startswith("💡 Tip")


USER_ERRORS = (DataFileError, StreamError, FileNotFoundError, SettingError)
#: ``--debug`` anywhere on the command line, or this variable set, shows the full traceback of a user error.
DEBUG_FLAG, DEBUG_ENV = "--debug", "MORE_LIGHTNING_DEBUG"


def user_error(exc: BaseException) -> BaseException | None:
    """The user error behind ``exc`` (itself, or what it was raised from: jsonargparse wraps errors of ``__init__``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, USER_ERRORS):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


def one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def run(args: list[str] | None = None) -> int:
    """:func:`main`, with user errors reported as one line on stderr and exit status 1 (``--debug``: raised)."""
    argv = sys.argv[1:] if args is None else list(args)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    if args is None:
        sys.argv[1:] = argv
    try:
        main(None if args is None else argv)
    except ArgumentError as exc:
        if debug:
            raise
        command = next((f"{a} " for a in argv if a in EditCLI.subcommands()), "")
        print(
            f"error: {plain_parse_error(str(exc))} (`python cli.py {command}--help` lists the settings)",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:
        cause = user_error(exc)
        if cause is None or debug:
            raise
        print(f"error: {one_line(cause)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
