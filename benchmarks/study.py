"""The equal-budget study on the TRAIN split: every editor's grids on both tasks, ranked, and the choice.

    python benchmarks/study.py --out docs/study                       # every task, editor and round
    python benchmarks/study.py --out docs/study --tasks evqa --editors more --rounds 2
    python benchmarks/study.py --out docs/study --report-only         # re-rank what is in --out

Each (task, editor, round) runs its grid of :data:`GRIDS` with ``sweep.py``'s runner: 100 edits of the
task's train file per run, never the eval file. Every editor gets the same number of runs per task: 32 on
E-VQA, 16 on E-IC (16 per round; E-VQA has two rounds, E-IC one; SERAC's first round swept its one
stream-time knob in 4 runs, so its runs are 4 + 12 + 16 on E-VQA and 4 + 9 + 3 on E-IC). Round 2 starts
from round 1's choice (its fixed values are written in the grid) and varies what round 1 left open.
Networks a grid names that their own training run makes (SERAC's) are trained first when missing
(:func:`ensure_networks`). The runs of a (task, editor, round) go to
``<out>/<task>_<editor>_r<round>.json`` (setting, command, every metrics.json figure);
``<out>/README.md`` is the ranked report.

**Choice.** A setting is a candidate when its edits land: immediate exact-match Rel (the share of edits
whose every target token is the model's argmax, teacher-forced, right after their write) is at least
``--min-landed`` (default 50). Without that rule an editor that writes nothing wins on E-IC: its target
captions differ from the model's own in one word, so a no-op keeps token Rel ≈ 92.6 and perfect locality
(held-out retention Avg 95.4 on the train split). Candidates are ranked by the headline retention Avg
(held-out variants); the first one is the choice. Where no setting of a grid lands half its edits, the
choice is the setting that lands most.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep import sweep

E = "model.init_args.editor.init_args"
B = "model.init_args.backbone.init_args"
PROJECTOR = "[model.multi_modal_projector.linear_1,model.multi_modal_projector.linear_2]"

CONFIGS = {
    "more": "configs/tiny_llava_{task}.yaml",
    "ft_l": "configs/tiny_llava_{task}_ft_l.yaml",
    "lora_ft": "configs/tiny_llava_{task}_lora_ft.yaml",
    "alphaedit": "configs/tiny_llava_{task}_alphaedit.yaml",
    "ft_m": "configs/tiny_llava_{task}_ft_m.yaml",
    "mend": "configs/tiny_llava_{task}_mend.yaml",
    "grace": "configs/tiny_llava_{task}_grace.yaml",
    "liveedit": "configs/tiny_llava_{task}_liveedit.yaml",
    "serac": "configs/tiny_llava_{task}_serac.yaml",
    "ike": "configs/tiny_llava_{task}_ike.yaml",
}

#: (task, editor, round) -> grid items (``key=v1,v2``; 16 runs each). Round 1 is the same grid on both tasks.
GRIDS: dict[tuple[str, str, int], list[str]] = {}
for _task in ("evqa", "eic"):
    GRIDS[(_task, "more", 1)] = [
        f"{B}.projector_modules={PROJECTOR},[]",
        f"{E}.write_with=current,previous",
        f"{E}.lam=100,1000",
        f"{E}.steps_per_edit=3,5",
        f"{E}.image_lam=1000",
    ]
    GRIDS[(_task, "ft_l", 1)] = [f"{E}.lr=0.003,0.01,0.03,0.1", f"{E}.steps_per_edit=1,3,5,10"]
    GRIDS[(_task, "ft_m", 1)] = [f"{E}.lr=0.003,0.01,0.03,0.1", f"{E}.steps_per_edit=1,3,5,10"]
    GRIDS[(_task, "lora_ft", 1)] = [
        f"{E}.eta=0.003,0.01,0.03,0.1",
        f"{B}.projector_modules={PROJECTOR},[]",
        f"{E}.steps_per_edit=1,3",
    ]
GRIDS[("evqa", "more", 2)] = [
    f"{E}.eta=0.03,0.1",
    f"{E}.image_eta=0.01,0.03",
    f"{E}.key_positions=text,target",
    f"{E}.image_lam=1000,10000",
    f"{E}.lam=100",
    f"{E}.steps_per_edit=5",
]
GRIDS[("evqa", "lora_ft", 2)] = [
    f"{E}.eta=0.01,0.03,0.1,0.3",
    f"{E}.image_eta=0.01,0.03",
    f"{E}.steps_per_edit=3,5",
]
# AlphaEdit on E-VQA: its two rounds were fixed in advance and run side by side (same budget: 32 runs).
GRIDS[("evqa", "alphaedit", 1)] = [
    f"{E}.value_lr=0.3,1,3,10",
    f"{E}.nullspace_threshold=0.02,0.005",
    f"{E}.steps_per_edit=3,5",
]
GRIDS[("evqa", "alphaedit", 2)] = [
    f"{E}.value_lr=0.3,1,3,10",
    f"{E}.nullspace_threshold=0.002,0.0005",
    f"{E}.l2=1,10",
]
# AlphaEdit on E-IC: 16 runs over E-VQA round 2's grid (run in two halves).
GRIDS[("eic", "alphaedit", 1)] = list(GRIDS[("evqa", "alphaedit", 2)])
# MEND: two meta-trained networks (configs/tiny_llava_mend_train.yaml as committed, edit_weight 0.1, and the same
# run with --model.init_args.edit_weight 1.0 --model.init_args.out_file models/tiny_llava_mend_edit1.safetensors)
# times the stream-time knobs; the same round-1 grid on both tasks.
MEND_NETWORKS = "models/tiny_llava_mend.safetensors,models/tiny_llava_mend_edit1.safetensors"
for _task in ("evqa", "eic"):
    GRIDS[(_task, "mend", 1)] = [
        f"{E}.networks={MEND_NETWORKS}",
        f"{E}.lr_scale=0.25,0.5,1,2",
        f"{E}.steps_per_edit=1,3",
    ]
# FT-M on E-VQA, round 2: round 1's best was its smallest lr with one step; smaller steps, and the projector's
# second layer alone against the whole projector.
GRIDS[("evqa", "ft_m", 2)] = [
    f"{E}.lr=0.0005,0.001,0.002,0.003",
    f"{E}.steps_per_edit=1,2",
    f"{E}.modules=[model.multi_modal_projector],[model.multi_modal_projector.linear_2]",
]
# MEND on E-VQA, round 2: round 1 wrote best at its smallest lr_scale with one step; smaller scales and two steps.
GRIDS[("evqa", "mend", 2)] = [
    f"{E}.networks={MEND_NETWORKS}",
    f"{E}.lr_scale=0.1,0.15,0.2,0.3",
    f"{E}.steps_per_edit=1,2",
]
# The parameter-preserving editors, round 1 on both tasks: GRACE and LiveEdit 16 runs each; SERAC has one
# stream-time knob (its capacity is its training run's), so 4.
for _task in ("evqa", "eic"):
    GRIDS[(_task, "grace", 1)] = [f"{E}.epsilon=0.5,1,2,4", f"{E}.steps_per_edit=5,10", f"{E}.lr=0.3,1.0"]
    GRIDS[(_task, "liveedit", 1)] = [
        f"{E}.visual_threshold=0.95,0.98,0.99,0.995",
        f"{E}.text_threshold=0.8,0.9",
        f"{E}.lr=0.05,0.1",
    ]
    GRIDS[(_task, "serac", 1)] = [f"{E}.threshold=0.3,0.5,0.7,0.9"]
# SERAC, round 2: its capacity is its networks' training run, so round 2 varies that (the trainings are outside
# the run budget, as MEND's second meta-training was). Each grid networks file is made by
# ``python cli.py fit --config configs/tiny_llava_serac_train.yaml`` with the overrides below (``ensure_networks``
# runs it when the file is missing; one thread; 5-10 min each here). "default" is the committed 1,500-step run.
SERAC_TRAIN = "configs/tiny_llava_serac_train.yaml"
SERAC_DIR = "runs/serac_networks"
T = "model.init_args"
VQA_ONLY = ["--data.init_args.train_files", "[data/embedded/vqa_train.json]"]
CAPTIONS_ONLY = ["--data.init_args.train_files", "[data/embedded/caption_train_edit.json]"]
ALL_LINEAR = (
    "["
    + ",".join(
        f'"model.language_model.layers.{{i}}.{m}"'
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    )
    + "]"
)
SERAC_NETWORKS: dict[str, list[str]] = {
    "both_4000": ["--trainer.max_steps", "4000"],
    "vqa_4000": [*VQA_ONLY, "--trainer.max_steps", "4000"],
    "vqa_lr4e-3_loc0": [*VQA_ONLY, "--trainer.max_steps", "2000", f"--{T}.lr", "0.004", f"--{T}.loc_weight", "0"],
    "vqa_r32_ffn": [
        *VQA_ONLY, "--trainer.max_steps", "2000", f"--{T}.rank", "32", f"--{T}.alpha", "64",
        f"--{T}.adapter_modules", ALL_LINEAR,
    ],
    "cap_1500": [*CAPTIONS_ONLY, "--trainer.max_steps", "1500"],
    "cap_lr4e-3_loc0": [
        *CAPTIONS_ONLY, "--trainer.max_steps", "1500", f"--{T}.lr", "0.004", f"--{T}.loc_weight", "0",
    ],
    # round 3 (E-VQA): round 2's best trained on both tasks, longer, wider or freer
    "both_8000": ["--trainer.max_steps", "8000"],
    "both_4000_r32_ffn": [
        "--trainer.max_steps", "4000", f"--{T}.rank", "32", f"--{T}.alpha", "64", f"--{T}.adapter_modules", ALL_LINEAR,
    ],
    "both_4000_lr4e-3_loc0": ["--trainer.max_steps", "4000", f"--{T}.lr", "0.004", f"--{T}.loc_weight", "0"],
    "both_4000_loc0": ["--trainer.max_steps", "4000", f"--{T}.loc_weight", "0"],
}  # fmt: skip


def serac_file(name: str) -> str:
    return f"{SERAC_DIR}/{name}.safetensors"


GRIDS[("evqa", "serac", 2)] = [
    f"{E}.networks={','.join(serac_file(n) for n in ('both_4000', 'vqa_4000', 'vqa_lr4e-3_loc0', 'vqa_r32_ffn'))}",
    f"{E}.threshold=0.5,0.7,0.9",
]
# E-VQA round 3: the networks trained on both tasks scored best in round 2 (4,000 steps over 1,500) and the highest
# threshold did on every networks file, so: four more trainings of that kind, thresholds from 0.7 up.
GRIDS[("evqa", "serac", 3)] = [
    f"{E}.networks="
    + ",".join(serac_file(n) for n in ("both_8000", "both_4000_r32_ffn", "both_4000_lr4e-3_loc0", "both_4000_loc0")),
    f"{E}.threshold=0.7,0.9,0.95,0.99",
]
GRIDS[("eic", "serac", 2)] = [
    f"{E}.networks={','.join(serac_file(n) for n in ('both_4000', 'cap_1500', 'cap_lr4e-3_loc0'))}",
    f"{E}.threshold=0.5,0.7,0.9",
]
# E-IC round 3 (3 runs, to 16): the longest training on both tasks.
GRIDS[("eic", "serac", 3)] = [f"{E}.networks={serac_file('both_8000')}", f"{E}.threshold=0.5,0.7,0.9"]


def ensure_networks(grid: list[str], log=print) -> None:
    """Train every SERAC networks file ``grid`` names that does not exist yet (:data:`SERAC_NETWORKS`)."""
    for name, overrides in SERAC_NETWORKS.items():
        path = serac_file(name)
        if not any(path in item for item in grid) or Path(path).is_file():
            continue
        command = [sys.executable, "cli.py", "fit", "--config", SERAC_TRAIN, *overrides, f"--{T}.out_file", path,
                   f"--{T}.num_threads", "1", "--trainer.logger.init_args.name", f"serac_{name}",
                   "--trainer.enable_progress_bar", "false"]  # fmt: skip
        log(f"training SERAC networks {path}: {' '.join(command[1:])}")
        subprocess.run(command, check=True)


# E-VQA round 2 of GRACE (round 1's best ε was its largest) and LiveEdit (round 1's choice held fixed).
GRIDS[("evqa", "grace", 2)] = [
    f"{E}.epsilon=3,4,6,8",
    f"{E}.steps_per_edit=10,20",
    f"{E}.replace=after,last",
    f"{E}.lr=1.0",
]
GRIDS[("evqa", "liveedit", 2)] = [
    f"{E}.rank=2,4,8,16",
    f"{E}.steps_per_edit=3,5",
    f"{E}.temperature=0.05,0.1",
    f"{E}.visual_threshold=0.98",
    f"{E}.text_threshold=0.8",
    f"{E}.lr=0.05",
]
# IKE, round 1 on both tasks: demonstrations per query times four ways of writing one; the last writes each as an
# earlier turn of the conversation ("... ASSISTANT: answer</s>USER: ..."), the format the tiny model's stage-3
# pretraining saw (three questions about one image as turns).
IKE_TEMPLATES = (
    "{prompt} {target} . ",
    "New Fact: {prompt} {target}\n",
    "{prompt} ASSISTANT: {target}\n",
    "{prompt} ASSISTANT: {target}</s>USER: ",
)
for _task in ("evqa", "eic"):
    GRIDS[(_task, "ike", 1)] = [f"{E}.k=1,2,3,4", f"{E}.demo_template={','.join(IKE_TEMPLATES)}"]
# IKE on E-VQA, round 2: four more ways of writing a demonstration (each edit as two turns; a turn without
# "ASSISTANT:"; "ASSISTANT:" with a full stop; a whole "USER: ... ASSISTANT: ...</s>" turn).
IKE_TEMPLATES_2 = (
    "{prompt} ASSISTANT: {target}</s>USER: {prompt} ASSISTANT: {target}</s>USER: ",
    "{prompt} {target}</s>USER: ",
    "{prompt} ASSISTANT: {target} . ",
    "USER: {prompt} ASSISTANT: {target}</s>",
)
GRIDS[("evqa", "ike", 2)] = [f"{E}.k=1,2,3,4", f"{E}.demo_template={','.join(IKE_TEMPLATES_2)}"]
GRIDS[("evqa", "ft_l", 2)] = [f"{E}.lr=0.05,0.1,0.2,0.3", f"{E}.steps_per_edit=2,3", f"{E}.layer=-1,-2"]


def short(setting: str) -> str:
    """``setting`` for a Markdown table cell: the projector list named, a template's newline and tags visible."""
    setting = setting.replace(PROJECTOR, "on").replace("projector_modules=[]", "projector_modules=off")
    return setting.replace("\n", "\\n").replace("<", "&lt;").replace("|", "\\|")


def landed(row: dict) -> float:
    return row["metrics"]["exact_match"]["immediate"]["rel"]


def choose(rows: list[dict], min_landed: float) -> dict:
    """The best candidate by headline retention Avg (``rows`` come ranked); see the module docstring."""
    candidates = [r for r in rows if landed(r) >= min_landed]
    if not candidates:  # no setting lands half its edits: the one that lands most (then retention)
        return max(rows, key=lambda r: (landed(r), r["retention_avg"]))
    return max(candidates, key=lambda r: r["retention_avg"])


def report(out: Path, min_landed: float) -> str:
    lines = [
        "# Equal-budget study (train split)",
        "",
        "`python benchmarks/study.py --out docs/study`. 100 edits per run; ranked by held-out retention Avg;",
        f"a candidate lands ≥ {min_landed:g} % of its edits exactly (EM imm.; where none does, the one that lands",
        "most is chosen). `*`: each round's choice; the first table takes the best over all rounds.",
    ]
    rounds = {path.stem: json.loads(path.read_text()) for path in sorted(out.glob("*_r*.json"))}
    lines += [
        "",
        "| task | editor | runs | choice (over all rounds) | ret. Avg | imm. Avg | EM imm. / ret. |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    for task in ("evqa", "eic"):
        for editor in CONFIGS:
            rows = [
                r for stem, data in rounds.items() if stem.rsplit("_", 1)[0] == f"{task}_{editor}" for r in data["runs"]
            ]
            if not rows:
                continue
            best = choose(rows, min_landed)
            em = best["metrics"]["exact_match"]
            lines.append(
                f"| {task} | {editor} | {len(rows)} | {short(best['setting'])} | {best['retention_avg']:.1f} "
                f"| {best['immediate_avg']:.1f} | {em['immediate']['rel']:.0f} / {em['retention']['rel']:.0f} |"
            )
    for stem, data in rounds.items():
        rows = data["runs"]
        best = choose(rows, min_landed)
        lines += [
            "",
            f"## {stem} ({data['config']}, {len(rows)} runs)",
            "",
            "| ret. Avg | imm. Avg | Rel imm. / ret. | EM imm. / ret. | T-Loc ret. | M-Loc ret. | setting |",
            "|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in rows:
            m, em = row["metrics"], row["metrics"]["exact_match"]
            mark = " *" if row is best else ""
            lines.append(
                f"| {row['retention_avg']:.1f}{mark} | {row['immediate_avg']:.1f} "
                f"| {m['immediate']['rel']:.1f} / {m['retention']['rel']:.1f} "
                f"| {em['immediate']['rel']:.0f} / {em['retention']['rel']:.0f} "
                f"| {m['retention']['t_loc']:.1f} | {m['retention']['m_loc']:.1f} | {short(row['setting'])} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the runs (JSON) and the ranked report")
    parser.add_argument("--tasks", nargs="+", default=["evqa", "eic"])
    parser.add_argument("--editors", nargs="+", default=list(CONFIGS))
    parser.add_argument("--rounds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--min-landed", type=float, default=50.0)
    parser.add_argument("--report-only", action="store_true", help="only re-rank the runs already in --out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for (task, editor, rnd), grid in GRIDS.items():
            if task not in args.tasks or editor not in args.editors or rnd not in args.rounds:
                continue
            config = CONFIGS[editor].format(task=task)
            ensure_networks(grid, log=lambda line: print(line, flush=True))
            rows = sweep(config, args.edits, grid, log=lambda line: print(line, flush=True))
            path = out / f"{task}_{editor}_r{rnd}.json"
            path.write_text(json.dumps({"config": config, "edits": args.edits, "grid": grid, "runs": rows}, indent=1))
            print(f"wrote {path}", flush=True)
    text = report(out, args.min_landed)
    (out / "README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
