"""The paper's Table 1 on the embedded world: every editor on both tasks, T = 1 and T = 100, one engine.

    python benchmarks/table1.py [--split eval] [--horizons 1 100] [--configs ...] [--out table1.json]
    python benchmarks/table1.py --merge evqa.json eic.json [--out table1.json]   # one table from earlier runs

Rows are editors with their horizon as in the paper (``FT-L_1`` ... ``M-ORE_100``), columns Rel / T-Gen / M-Gen /
T-Loc / M-Loc / Avg per task (E-VQA, then E-IC), then seconds per edit and the editor's state bytes at the end of
the stream for each task. One table for the immediate scores (right after each edit) and one for retention (every
edit re-scored on the final model); T = 1 is the single-editing protocol of ``results_table.py`` (``--single-edits``
edits each applied to the unedited model), whose retention is its immediate score. Figures are the runs' headline
variants (held-out where the data has a companion, ``--variant seen`` for MMEdit's protocol). Every run is
``results_table.py``'s: ``python cli.py fit --config <config>`` with the horizon and split overrides, listed under
the tables. ``--out`` writes the tables, the rows and every run's ``metrics.json`` as JSON. Any other argument is a
dotted override for every run (``--trainer.accelerator cpu``), as ``--set`` is.

MEND's and SERAC's configs need their networks (committed; remade by ``python cli.py fit --config
configs/tiny_llava_mend_train.yaml`` and ``configs/tiny_llava_serac_train.yaml``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_table import KEYS, run_horizon

#: the paper's rows, in its order (LoRA-FT is its "naive fine-tuning"; GRACE is not in the paper's table, it sits
#: with the parameter-preserving editors): display name, config suffix, editor class
EDITORS = (
    ("FT-L", "_ft_l", "FTL"),
    ("FT-M", "_ft_m", "FTM"),
    ("LoRA-FT", "_lora_ft", "LoRAFT"),
    ("MEND", "_mend", "MEND"),
    ("AlphaEdit", "_alphaedit", "AlphaEdit"),
    ("SERAC", "_serac", "SERAC"),
    ("IKE", "_ike", "IKE"),
    ("LiveEdit", "_liveedit", "LiveEdit"),
    ("GRACE", "_grace", "GRACE"),
    ("M-ORE", "", "MORE"),
)
TASKS = (("evqa", "E-VQA"), ("eic", "E-IC"))
DEFAULT_CONFIGS = tuple(f"configs/tiny_llava_{task}{suffix}.yaml" for _, suffix, _ in EDITORS for task, _ in TASKS)
NAME_OF = {cls: name for name, _, cls in EDITORS}
COLUMNS = ("Rel.", "T-Gen.", "M-Gen.", "T-Loc.", "M-Loc.", "Avg.")


def scores(metrics: dict, phase: str, variant: str) -> dict[str, float]:
    """Rel … Avg of ``phase`` on ``variant`` (``seen``, ``held_out`` or the run's ``headline``); held-out Rel is
    the edit's own."""
    variant = metrics.get("headline", "seen") if variant == "headline" else variant
    if variant == "held_out" and "held_out" in metrics:
        return {"rel": metrics[phase]["rel"], **metrics["held_out"][phase]}
    return metrics[phase]


def table(rows: list[dict], phase: str, variant: str) -> list[str]:
    """Markdown lines of one phase: a row per (editor, horizon), tasks side by side; ``-`` where a run is missing."""
    head = ["Method"] + [f"{label} {c}" for _, label in TASKS for c in COLUMNS]
    head += [f"{label} {c}" for _, label in TASKS for c in ("s/edit", "state bytes")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {cls: i for i, (_, _, cls) in enumerate(EDITORS)}
    keys = sorted({(r["horizon"], r["editor"]) for r in rows}, key=lambda k: (k[0], order.get(k[1], len(order)), k[1]))
    for horizon, editor in keys:
        by_task = {r["task"]: r["metrics"] for r in rows if (r["horizon"], r["editor"]) == (horizon, editor)}
        cells = []
        for task, _ in TASKS:
            row = scores(by_task[task], phase, variant) if task in by_task else {}
            cells += [f"{row[k]:.2f}" if k in row else "-" for k in KEYS]
        for task, _ in TASKS:
            m = by_task.get(task)
            cells += [f"{m['seconds_per_edit']:.3f}", str(m.get("state_bytes", "-"))] if m else ["-", "-"]
        lines.append(f"| {NAME_OF.get(editor, editor)}_{horizon} | " + " | ".join(cells) + " |")
    return lines


def report(rows: list[dict], variant: str) -> dict[str, list[str]]:
    return {phase: table(rows, phase, variant) for phase in ("immediate", "retention")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=("eval", "train"), default="eval")
    parser.add_argument("--horizons", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--single-edits", type=int, default=100, help="edits averaged for the T = 1 rows")
    parser.add_argument("--variant", choices=("headline", "seen", "held_out"), default="headline")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every run (or give them after all)")
    parser.add_argument("--out", help="also write the tables and every run's metrics here (JSON)")
    parser.add_argument(
        "--merge", nargs="+", metavar="FILE", help="run nothing: one table from the rows of earlier --out files"
    )
    args, overrides = parser.parse_known_args(argv)  # unknown arguments: dotted CLI overrides for every run
    args.set = [*args.set, *overrides]
    rows = []
    for path in args.merge or []:
        earlier = json.loads(Path(path).read_text())
        if earlier.get("split") != args.split:
            raise SystemExit(f"{path}: its runs are on the {earlier.get('split')} split, not --split {args.split}")
        rows += earlier["rows"]
    for config in [] if args.merge else args.configs:
        for horizon in args.horizons:
            metrics, command = run_horizon(config, horizon, args.split, args.single_edits, args.set)
            rows.append(
                {"config": config, "command": command, "horizon": horizon, **_keys(metrics), "metrics": metrics}
            )
            print(f"done: {command}", file=sys.stderr, flush=True)
    tables = report(rows, args.variant)
    for phase, lines in tables.items():
        print(f"\n{phase} ({args.variant} variants, {args.split} split)\n" + "\n".join(lines))
    print("\ncommands:\n" + "\n".join(f"  {r['command']}" for r in rows))
    result = {"split": args.split, "variant": args.variant, "tables": tables, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


def _keys(metrics: dict) -> dict[str, str]:
    return {"editor": metrics["editor"], "task": metrics["task"]}


if __name__ == "__main__":
    main()
