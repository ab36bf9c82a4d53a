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

When a run's data carries held-out variants (a ``<stem>.heldout.json`` companion, so ``metrics.json`` has a
``held_out`` block), each phase also gets held-out T-Gen / M-Gen / T-Loc / M-Loc / Avg columns, marked
``(imm, held-out)`` / ``(ret, held-out)``, beside the seen ones (the plain columns, MMEdit's convention); rows
without held-out variants show ``-`` there.
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
HELD_OUT_KEYS = ("t_gen", "m_gen", "t_loc", "m_loc", "avg")
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


def run_horizon(config: str, horizon: int, split: str, single_edits: int, overrides: list[str]) -> tuple[dict, str]:
    """One table row: ``horizon`` sequential edits, or for ``horizon == 1`` the mean of ``single_edits`` single edits.

    ``overrides`` (dotted CLI arguments) come after the split's data file, so they win.
    """
    extra = [*split_file(config, split), *overrides]
    if horizon != 1:
        return run(config, horizon, extra)
    metrics, command = run(config, single_edits, [*extra, "--model.init_args.single_edits", "true"])
    metrics["retention"] = metrics["immediate"]  # one edit on the model: retained = immediate
    metrics["exact_match"]["retention"] = metrics["exact_match"]["immediate"]
    if "held_out" in metrics:
        metrics["held_out"]["retention"] = metrics["held_out"]["immediate"]
    return metrics, command


def header(held_out: bool) -> list[str]:
    """The markdown header and rule; held-out columns follow each phase's seen columns if ``held_out``."""
    columns = []
    for phase in ("imm", "ret"):
        columns += [f"{k} ({phase})" for k in KEYS]
        columns += [f"{k} ({phase}, held-out)" for k in HELD_OUT_KEYS] if held_out else []
    columns += ["s/edit", "command"]
    return ["| editor | task | T | " + " | ".join(columns) + " |", "|" + "---|" * (3 + len(columns))]


def cells(metrics: dict, held_out: bool) -> list[str]:
    """One row's score cells in :func:`header`'s order; ``-`` where a run has no held-out figures."""
    row = []
    for phase in ("immediate", "retention"):
        row += [f"{metrics[phase][k]:.1f}" for k in KEYS]
        if held_out:
            scores = metrics.get("held_out", {}).get(phase, {})
            row += [f"{scores[k]:.1f}" if k in scores else "-" for k in HELD_OUT_KEYS]
    return row


def format_row(metrics: dict, horizon: int, command: str, held_out: bool) -> str:
    return (
        f"| {metrics['editor']} | {metrics['task']} | {horizon} | "
        + " | ".join(cells(metrics, held_out))
        + f" | {metrics['seconds_per_edit']:.3f} | `{command}` |"
    )


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def summary(rows: list[dict]) -> str:
    """The README's results table from ``--out`` JSON lines: Avg seen / held-out, Rel, exact match, twin split."""
    lines = [
        "| editor | task | T | Avg imm. seen / held-out | Avg ret. seen / held-out | Rel imm. / ret. "
        "| EM imm. / ret. | T-Loc / M-Loc ret. held-out | Avg ret. held-out, shared text / unique (n) | s/edit |",
        "|---|---|---:|---|---|---|---|---|---|---:|",
    ]
    for m in rows:
        ho, em = m.get("held_out", {}), m["exact_match"]
        ho_imm, ho_ret = ho.get("immediate", {}).get("avg"), ho.get("retention", {}).get("avg")
        by_text = m.get("retention_by_question") or {}
        split = " / ".join(
            f"{by_text[k]['held_out_avg']:.1f} ({by_text[k]['num_edits']})" if by_text.get(k) else "-"
            for k in ("shared", "unique")
        )
        horizon = str(m["num_edits"]) if m.get("protocol") == "sequential" else f"1 (×{m['num_edits']})"
        ret_ho = ho.get("retention", {})
        lines.append(
            f"| {m['editor']} | {m['task']} | {horizon} | {m['immediate']['avg']:.1f} / {fmt(ho_imm)} "
            f"| {m['retention']['avg']:.1f} / {fmt(ho_ret)} "
            f"| {m['immediate']['rel']:.1f} / {m['retention']['rel']:.1f} "
            f"| {em['immediate']['rel']:.0f} / {em['retention']['rel']:.0f} "
            f"| {fmt(ret_ho.get('t_loc'))} / {fmt(ret_ho.get('m_loc'))} | {split} | {m['seconds_per_edit']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=("eval", "train"), default="eval")
    parser.add_argument("--horizons", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--single-edits", type=int, default=100, help="edits averaged for the T = 1 rows")
    parser.add_argument(
        "--set", nargs="*", default=[], help="extra overrides for every run as key=value (dotted CLI keys)"
    )
    parser.add_argument("--out", help="also write the rows as JSON lines here")
    parser.add_argument("--summary", nargs="+", help="only print the README's summary table of these --out files")
    args = parser.parse_args()
    if args.summary:
        print(summary([json.loads(line) for path in args.summary for line in Path(path).read_text().splitlines()]))
        return
    runs = []  # (metrics, horizon, command)
    for config in args.configs:
        for horizon in args.horizons:
            overrides = [x for item in args.set for x in (f"--{item.split('=', 1)[0]}", item.split("=", 1)[1])]
            metrics, command = run_horizon(config, horizon, args.split, args.single_edits, overrides)
            runs.append((metrics, horizon, command))
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({"config": config, "command": command, **metrics}) + "\n")
            print(format_row(metrics, horizon, command, "held_out" in metrics), flush=True)
    held_out = any("held_out" in metrics for metrics, _, _ in runs)
    rows = [format_row(metrics, horizon, command, held_out) for metrics, horizon, command in runs]
    print("\n".join([*header(held_out), *rows]))


if __name__ == "__main__":
    main()
