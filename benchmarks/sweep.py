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
    keys, values = zip(*(item.split("=", 1) for item in args.grid), strict=True)
    results = []
    for combo in itertools.product(*(split_values(v) for v in values)):
        overrides = [x for k, v in zip(keys, combo, strict=True) for x in (f"--{k}", v)]
        metrics, command = run(args.config, args.edits, [*split_file(args.config, "train"), *overrides])
        setting = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(keys, combo, strict=True))
        results.append((headline(metrics, "retention"), headline(metrics, "immediate"), setting, metrics, command))
        print(f"{setting}: retention avg {results[-1][0]:.2f}, immediate avg {results[-1][1]:.2f}", flush=True)
    ranked = sorted(results, key=lambda r: -r[0])
    print(f"\nranked by headline retention Avg, {args.edits} edits, train split of {args.config}:")
    for ret, imm, setting, metrics, _command in ranked:
        parts = " ".join(f"{k}={metrics['retention'][k]:.1f}" for k in KEYS)
        print(f"  {ret:6.2f} (imm {imm:6.2f}, imm rel {metrics['immediate']['rel']:5.1f})  {setting}  [{parts}]")
    if args.out:
        rows = [
            {"retention_avg": ret, "immediate_avg": imm, "setting": setting, "command": command, "metrics": metrics}
            for ret, imm, setting, metrics, command in ranked
        ]
        Path(args.out).write_text(json.dumps({"config": args.config, "edits": args.edits, "runs": rows}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
