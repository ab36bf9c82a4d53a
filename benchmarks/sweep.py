"""Choose an editor's hyperparameters on the TRAIN split (never on eval).

    python benchmarks/sweep.py --config configs/tiny_llava_evqa.yaml --edits 100 \
        --grid model.init_args.editor.init_args.eta=0.1,0.3,1 model.init_args.editor.init_args.lam=10,100

Runs every combination of the grid on the config's train file (``*_eval*`` -> ``*_train*``) for
``--edits`` edits and prints them ranked by the headline retention Avg (the end-of-stream number:
held-out variants where the data has a companion, else the seen ones), with immediate Avg beside it.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_table import KEYS, run, split_file


def headline(metrics: dict, phase: str) -> float:
    """Avg of ``phase`` (``immediate`` / ``retention``) on the variants metrics.json calls its headline."""
    if metrics.get("headline") == "held_out":
        return metrics["held_out"][phase]["avg"]
    return metrics[phase]["avg"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--grid", nargs="+", required=True, help="key=v1,v2,... (dotted LightningCLI keys)")
    args = parser.parse_args()
    keys, values = zip(*(item.split("=", 1) for item in args.grid), strict=True)
    results = []
    for combo in itertools.product(*(v.split(",") for v in values)):
        overrides = [x for k, v in zip(keys, combo, strict=True) for x in (f"--{k}", v)]
        metrics, command = run(args.config, args.edits, [*split_file(args.config, "train"), *overrides])
        setting = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(keys, combo, strict=True))
        results.append((headline(metrics, "retention"), headline(metrics, "immediate"), setting, metrics, command))
        print(f"{setting}: retention avg {results[-1][0]:.2f}, immediate avg {results[-1][1]:.2f}", flush=True)
    print(f"\nranked by headline retention Avg, {args.edits} edits, train split of {args.config}:")
    for ret, imm, setting, metrics, _command in sorted(results, key=lambda r: -r[0]):
        parts = " ".join(f"{k}={metrics['retention'][k]:.1f}" for k in KEYS)
        print(f"  {ret:6.2f} (imm {imm:6.2f})  {setting}  [{parts}]")


if __name__ == "__main__":
    main()
