"""Editors × horizons × tasks on the embedded world: the results table, one run per row.

    python benchmarks/results_table.py [--split eval] [--horizons 1 10 100] [--configs ...]

Each row runs ``python cli.py fit --config <config> --data.init_args.num_edits T`` on the chosen
split (``eval`` for reported figures, ``train`` for choosing hyperparameters) and prints
immediate and retention Rel / T-Gen / M-Gen / T-Loc / M-Loc / Avg as a markdown table, with the
exact command of every row.

T = 1 is the single-editing protocol: ``--single-edits N`` edits (default 100), each applied to
the unedited model (``--model.init_args.single_edits true``) and scored right after it; with one
edit on the model, its retention is its immediate score, so both columns show the mean over the
N edits. A single one-edit run would be one sample.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli

KEYS = ("rel", "t_gen", "m_gen", "t_loc", "m_loc", "avg")
DEFAULT_CONFIGS = (
    "configs/tiny_llava_eic.yaml",
    "configs/tiny_llava_eic_lora_ft.yaml",
    "configs/tiny_llava_eic_ft_l.yaml",
    "configs/tiny_llava_evqa.yaml",
    "configs/tiny_llava_evqa_lora_ft.yaml",
    "configs/tiny_llava_evqa_ft_l.yaml",
)


def split_file(config: str, split: str) -> list[str]:
    """Override the data file for the train split (``*_eval*.json`` -> ``*_train*.json``)."""
    if split == "eval":
        return []
    text = Path(config).read_text()
    line = next(ln for ln in text.splitlines() if "data_file:" in ln)
    eval_file = line.split("data_file:")[1].strip()
    return ["--data.init_args.data_file", eval_file.replace("_eval", "_train")]


def run(config: str, num_edits: int, extra: list[str]) -> tuple[dict, str]:
    args = ["fit", "--config", config, "--data.init_args.num_edits", str(num_edits), *extra]
    with tempfile.TemporaryDirectory() as runs:
        full = [*args, "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", runs]
        cli.main(full)
        metrics = json.loads(next(Path(runs).rglob("metrics.json")).read_text())
    return metrics, "python cli.py " + shlex.join(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=("eval", "train"), default="eval")
    parser.add_argument("--horizons", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--single-edits", type=int, default=100, help="edits averaged for the T = 1 rows")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every run, e.g. --model...")
    parser.add_argument("--out", help="also write the rows as JSON lines here")
    args = parser.parse_args()
    header = "| editor | task | T | " + " | ".join(f"{k} (imm)" for k in KEYS) + " | "
    header += " | ".join(f"{k} (ret)" for k in KEYS) + " | s/edit | command |"
    rows = [header, "|" + "---|" * (3 + 2 * len(KEYS) + 2)]
    for config in args.configs:
        for horizon in args.horizons:
            extra = [*split_file(config, args.split), *args.set]
            if horizon == 1:
                metrics, command = run(config, args.single_edits, [*extra, "--model.init_args.single_edits", "true"])
                metrics["retention"] = metrics["immediate"]  # one edit on the model: retained = immediate
            else:
                metrics, command = run(config, horizon, extra)
            cells = [f"{metrics['immediate'][k]:.1f}" for k in KEYS] + [f"{metrics['retention'][k]:.1f}" for k in KEYS]
            rows.append(
                f"| {metrics['editor']} | {metrics['task']} | {horizon} | "
                + " | ".join(cells)
                + f" | {metrics['seconds_per_edit']:.3f} | `{command}` |"
            )
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({"config": config, "command": command, **metrics}) + "\n")
            print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
