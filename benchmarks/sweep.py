"""Choose an editor's hyperparameters on the TRAIN split (never on eval).

    python benchmarks/sweep.py --config configs/tiny_llava_evqa.yaml --edits 100 \
        --grid model.init_args.editor.init_args.eta=0.1,0.3,1 model.init_args.editor.init_args.lam=10,100

Runs every combination of the grid on the config's train file (``*_eval*`` -> ``*_train*``) for
``--edits`` edits and prints them ranked by the headline retention Avg (the end-of-stream number:
held-out variants where the data has a companion, else the seen ones), with immediate Avg and immediate
Rel beside it. ``--out FILE`` also writes every run (setting, command, full metrics.json) as JSON, ranked.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_table import KEYS, run, split_file


def headline(metrics: dict, phase: str) -> float:
    """Avg of ``phase`` (``immediate`` / ``retention``) on the variants metrics.json calls its headline."""
    if metrics.get("headline") == "held_out":
        return metrics["held_out"][phase]["avg"]
    return metrics[phase]["avg"]


def split_values(values: str) -> list[str]:
    """``v1,v2,...`` split on the commas outside brackets, so a value may be a list: ``[a,b],[]``."""
    parts, depth, current = [], 0, ""
    for char in values:
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += {"[": 1, "]": -1}.get(char, 0)
        current += char
    return [*parts, current]


def sweep(config: str, edits: int, grid: list[str], log=print) -> list[dict]:
    """Every combination of ``grid`` (``key=v1,v2`` items) on the train split, ranked by headline retention Avg.

    Each row: ``retention_avg``, ``immediate_avg``, ``setting`` (short keys), ``overrides``, ``command``, ``metrics``.
    """
    keys, values = zip(*(item.split("=", 1) for item in grid), strict=True)
    rows = []
    for combo in itertools.product(*(split_values(v) for v in values)):
        overrides = [x for k, v in zip(keys, combo, strict=True) for x in (f"--{k}", v)]
        metrics, command = run(config, edits, [*split_file(config, "train"), *overrides])
        setting = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(keys, combo, strict=True))
        row = {
            "retention_avg": headline(metrics, "retention"),
            "immediate_avg": headline(metrics, "immediate"),
            "setting": setting,
            "overrides": overrides,
            "command": command,
            "metrics": metrics,
        }
        rows.append(row)
        log(f"{setting}: retention avg {row['retention_avg']:.2f}, immediate avg {row['immediate_avg']:.2f}")
    return sorted(rows, key=lambda r: -r["retention_avg"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument(
        "--grid",
        nargs="+",
        required=True,
        help="key=v1,v2,... (dotted LightningCLI keys; a value may be a list: key=[a,b],[])",
    )
    parser.add_argument("--out", help="write the ranked runs (setting, command, metrics) to this JSON file")
    args = parser.parse_args()
    ranked = sweep(args.config, args.edits, args.grid, log=lambda line: print(line, flush=True))
    print(f"\nranked by headline retention Avg, {args.edits} edits, train split of {args.config}:")
    for row in ranked:
        metrics = row["metrics"]
        parts = " ".join(f"{k}={metrics['retention'][k]:.1f}" for k in KEYS)
        scores = (
            f"{row['retention_avg']:6.2f} (imm {row['immediate_avg']:6.2f}, imm rel {metrics['immediate']['rel']:5.1f})"
        )
        print(f"  {scores}  {row['setting']}  [{parts}]")
    if args.out:
        Path(args.out).write_text(json.dumps({"config": args.config, "edits": args.edits, "runs": ranked}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
