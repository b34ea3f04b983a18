"""tables.py -- the three papers' tables in miniature: every row from the committed tiny base, 3 seeds.

    python tables.py seg        # Seg-RISE: reward ablation (Table 4), no CoT (Table 5), no points (Table 6)
    python tables.py visrl      # VisRL: SFT / + stage 1 / + stage 2 / iteration 2 (Table 2), pairs (Table 6)
    python tables.py cot        # RISE-CoT reward ablation (RISE annotation paper, Table 5)
    python tables.py rise       # RISE-R1 against its baselines (Tables 1 and 4) + the tau sweep (Table 6)

Every row is run the way a reader would run it: the pipeline scripts with their tiny defaults and the
table's recipe (SEG_RECIPE, RISE_R1_RECIPE, VISRL_RECIPE: chosen on validation scenes with --split val)
(subprocesses, `--jobs` at a time, one thread each), seed k for the data, the sampling and the
shapes world, into OUT/seed{k}/{row}/. A finished job leaves a DONE file and is not run again:
rerun the command to continue a cut-off table. A failed job is reported and its row counted as
missing (n < seeds): one bad row never aborts a table. Writes OUT/table.md (mean +- std over
seeds, the number of seeds each cell has), OUT/table.json and OUT/table.png (bars with std error
bars). --script-args appends arguments to every pipeline command that takes them (e.g. "--max-steps 1
--n-test 4" for a plumbing check); one that starts with a script's name goes to that script alone
(`--script-args "rise_r1.py --sft-steps 200"`: RISE-R1's SFT, not RISE-CoT's steps). Repeat it for both.
"""
import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

import rewards
import rise_cot
import rise_r1
import run
import seg_rise
import visrl

ROOT = Path(__file__).resolve().parent
SPLIT = {"eval": "test", "n_train": 64}    # the split rows are scored on ("val" to choose a recipe), training scenes


def train_manifest(seed, dataset):
    """The training manifest of a row: `dataset` of the shapes world of `seed` with SPLIT's number of training
    scenes (--n-train; the validation and test scenes do not depend on it)."""
    return str(run.shapes_world(seed, SPLIT["n_train"], 32) / dataset / "train.jsonl")


def eval_manifest(seed, dataset, n_train=64, n_test=32):
    """The manifest every row of a table is scored on: the shapes world's `dataset` of `seed`, SPLIT's split."""
    return str(run.shapes_world(seed, n_train, n_test) / dataset / f"{SPLIT['eval']}.jsonl")


def read_json(path):
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def roc_auc(scores, positive):
    """ROC AUC of `scores` for telling positive from negative items (ties count one half): the
    Mann-Whitney U statistic / (n_pos * n_neg). None when one class is empty."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)                                   # average ranks: ties share
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ============================================================================ Seg-RISE
# The table's recipe on top of seg_rise.py's tiny preset, chosen on validation scenes (full-reward box IoU,
# 3 seeds, `--split val`; base 0.565): the preset (lr 2e-4, KL 5e-3) 0.468, on 256 instructions 0.511, this 0.583.
SEG_RECIPE = ["--lr", "5e-5", "--beta", "0.04"]
SEG_ROWS = [("tiny base", None), ("full reward", ["--reward", "sem,think,seg"]), ("semantic only", ["--reward", "sem"]),
            ("format only", ["--reward", "think,seg"]), ("no CoT", ["--no-cot"]), ("no points", ["--no-points"])]


def seg_jobs(seed, d):
    """One job per row: GRPO training (not for the base), then the box-executor evaluation."""
    jobs = {}
    for row, flags in SEG_ROWS:
        out = d / slug(row)
        ev = ["seg_rise.py", "--eval", "--executor", "box", "--seed", str(seed), "--out", str(out / "eval"),
              "--test", eval_manifest(seed, "seg")]
        jobs[row] = ([ev + ["--model", "tiny-base"]] if flags is None else
                     [["seg_rise.py", "--seed", str(seed), "--out", str(out), "--data", train_manifest(seed, "seg")]
                      + SEG_RECIPE + flags,
                      ev + ["--model", str(out / "final")] + [f for f in flags if f.startswith("--no-")]])
    return jobs


def seg_results(seed, d):
    table = {}
    for row, _ in SEG_ROWS:
        m = read_json(d / slug(row) / "eval" / "eval.json")
        if m:
            boxes = {tuple(p["box"]) for p in run.read_jsonl(d / slug(row) / "eval" / "predictions.jsonl") if p.get("box")}
            table[row] = {"gIoU": m["giou"], "cIoU": m["ciou"], "box IoU": m["box_iou"],
                          "distinct test boxes": len(boxes), "unparsable": m["unparsable"]}
    return {"Seg-RISE (box executor)": table}


# ============================================================================ VisRL
VISRL_STAGES = [("tiny base", "base"), ("SFT warm-up", "sft"), ("+ stage 1", "iter1/stage1"),
                ("+ stage 2", "iter1/stage2"), ("iteration 2, stage 1", "iter2/stage1"),
                ("iteration 2, stage 2 (final)", "iter2/stage2")]


# The table's recipe on top of visrl.py's tiny preset, chosen on validation scenes (`tables.py visrl --split val`,
# answer accuracy after iteration 1, seeds 0 and 1; base 0.645): the preset 0.578, lr 5e-6 0.609, sampling at the
# paper's temperature 2.0 instead of 1.0 0.660. Every stage is scored on 128 scenes.
VISRL_RECIPE = ["--temperature", "2.0", "--answer-temperature", "2.0", "--stage-eval-n", "128", "--n-test", "128"]


def visrl_jobs(seed, d):
    return {"visrl": [["visrl.py", "--seed", str(seed), "--out", str(d / "visrl"),
                       "--test", eval_manifest(seed, "vqa", 512, 512)] + VISRL_RECIPE]}


def critic_auc(candidates_path):
    """The critic's quality on one iteration's candidates: ROC AUC of s_r for right vs wrong answers
    (normalised exact match with the reference) and of s_b for crops that cover the target (hold half
    of the GT box or more) vs not."""
    right, s_r, covers, s_b = [], [], [], []
    for q in run.read_jsonl(candidates_path):
        for c in q["candidates"]:
            right.append(rewards.normalise_answer(c["answer"]) == rewards.normalise_answer(q["answer"]))
            s_r.append(c["s_r"])
            if q.get("gt_box"):
                covers.append(rewards.covers(c["box"], q["gt_box"]))
                s_b.append(c["s_b"])
    return {"AUC s_r (right vs wrong answer)": roc_auc(s_r, right),
            "AUC s_b (crop covers the target vs not)": roc_auc(s_b, covers),
            "right answers": float(np.mean(right)) if right else None, "candidates": len(right)}


def visrl_results(seed, d):
    run_dir = d / "visrl"
    stages = {p["stage"]: p for p in run.read_jsonl(run_dir / "stages.jsonl")}
    scores = {row: {"answer accuracy": stages[st]["answer_accuracy"], "box accuracy": stages[st]["box_accuracy"],
                    "mean box IoU": stages[st]["mean_box_iou"]} for row, st in VISRL_STAGES if st in stages}
    quality, critic = {}, {}
    for it in (1, 2):
        stats = read_json(run_dir / f"iter{it}" / "stats.json")
        if stats:
            quality[f"iteration {it}"] = dict(stats["quality"], pairs=len(run.read_jsonl(run_dir / f"iter{it}" /
                                                                                   "pairs.jsonl")))
            critic[f"iteration {it}"] = critic_auc(run_dir / f"iter{it}" / "candidates.jsonl")
    return {"VisRL": scores, "VisRL pairs (data quality)": quality, "VisRL critic": critic}


# ============================================================================ RISE-CoT reward ablation
# RISE-R1's recipe on top of rise_r1.py's tiny preset for every row that trains on CoTs (here, and RISE, tau 0 and
# Base-Model-CoT in the RISE table), chosen on validation scenes (the RISE row, 3 seeds, `tables.py rise --split val`;
# soft_cls JSD / det mAP@0.5): the preset's 60 SFT steps 0.111 / 0.287 +- 0.27, 200 SFT steps 0.096 / 0.282 +- 0.07,
# 256 training images 0.169 / 0.278 +- 0.34. SFT on plain answers keeps the preset: 0.019 / 0.855, against 0.026 /
# 0.796 with 200 steps and 0.015 / 0.814 on 256 images.
RISE_R1_RECIPE = ["--sft-steps", "200"]
COT_ROWS = [("full R_CoT", "sim,leak,format"), ("similarity only", "sim"), ("without the leak term", "sim,format"),
            ("without the format term", "sim,leak")]
TAU = 0.5                      # rise_r1.py's default: D_high = CoTs with R_CoT >= 0.5
# RISE-CoT's flags per task. soft_cls's classes are the colours, the only visual cue there is, so its CoTs
# may name them (the paper's leak check is numbers only); with names masked, D_high describes shapes and
# places, from which no colour distribution follows, and RISE-R1 trained on it writes 14 of 32 answers
# unparsable (16-token CoTs, one seed) against 0 with colours named.
COT_FLAGS = {"soft_cls": ["--class-names", "allow"], "det": []}


def cot_jobs(seed, d, task="soft_cls"):
    """RISE-CoT with the row's reward, then RISE-R1 (SFT on its D_high, GRPO), then evaluation."""
    s = ["--seed", str(seed)]
    return {row: [["rise_cot.py", "--data", train_manifest(seed, task), "--reward", terms, "--out", str(d / slug(row) / "cot")]
                  + COT_FLAGS[task] + s,
                  ["rise_r1.py", "--data", train_manifest(seed, task), "--cots", str(d / slug(row) / "cot" / "cots.jsonl"),
                   "--out", str(d / slug(row) / "r1")] + RISE_R1_RECIPE + s,
                  ["rise_r1.py", "--eval", "--test", eval_manifest(seed, task), "--model", str(d / slug(row) / "r1" / "final"),
                   "--out", str(d / slug(row) / "eval")] + s]
            for row, terms in COT_ROWS}


def d_high_quality(cots_path, tau=TAU):
    """D_high's size and quality: pass rate (share of samples with R_CoT >= tau) and, within D_high,
    the share of CoTs that leak the annotation and of those whose format (and reconstruction parse) fails."""
    cots = run.read_jsonl(cots_path)
    high = [c for c in cots if c["reward"] >= tau]
    share = lambda key: float(np.mean([bool(c[key]) for c in high])) if high else None  # noqa: E731
    return {"pass rate": len(high) / len(cots) if cots else None, "D_high leaks": share("leak"),
            "D_high format ok": share("format")}


def cot_results(seed, d):
    scores, quality = {}, {}
    for row, _ in COT_ROWS:
        if (d / slug(row) / "cot" / "cots.jsonl").exists():
            quality[row] = d_high_quality(d / slug(row) / "cot" / "cots.jsonl")
        m = read_json(d / slug(row) / "eval" / "eval.json")
        if m:
            scores[row] = {"JSD": m["jsd"], "accuracy": m["accuracy"], "unparsable": m["unparsable"]}
    return {"RISE-R1 after each RISE-CoT reward (soft_cls)": scores, "D_high quality": quality}


# ============================================================================ RISE-R1 and baselines
RISE_TASKS = ("soft_cls", "det")
TAUS = {"soft_cls": (0.0, 0.25, 0.5, 0.75), "det": (0.0, 0.5)}      # the tau sweep (Table 6) on soft_cls only


def rise_jobs(seed, d):
    """Per task: RISE-CoT (trained, and the untrained base's CoTs: --max-steps 0), then every row."""
    s, jobs = ["--seed", str(seed)], {}
    for task in RISE_TASKS:
        t = d / task
        ev = lambda row, model, *extra: ["rise_r1.py", "--eval", "--test", eval_manifest(seed, task), "--model", model,  # noqa: E731
                                         "--out", str(t / row / "eval"), *extra] + s
        r1 = lambda row, *extra: ["rise_r1.py", "--data", train_manifest(seed, task), "--out", str(t / row),  # noqa: E731
                                  *extra] + s
        jobs[f"{task} base"] = [ev("base", "tiny-base"), ev("base_plain", "tiny-base", "--eval-prompt", "plain")]
        jobs[f"{task} sft"] = [r1("sft", "--stages", "sft", "--sft-target", "plain"),
                               ev("sft", str(t / "sft" / "final"), "--eval-prompt", "plain")]
        jobs[f"{task} grpo"] = [r1("grpo", "--stages", "grpo"), ev("grpo", str(t / "grpo" / "final"))]
        # the tau rows need the CoTs: one job, in order
        cots = str(t / "cot" / "cots.jsonl")
        jobs[f"{task} rise"] = [["rise_cot.py", "--data", train_manifest(seed, task), "--out", str(t / "cot")]
                                + COT_FLAGS[task] + s]
        for tau in TAUS[task]:
            jobs[f"{task} rise"] += [r1(f"tau{tau}", "--cots", cots, "--tau", str(tau), *RISE_R1_RECIPE),
                                     ev(f"tau{tau}", str(t / f"tau{tau}" / "final"))]
        base_cot = ["rise_cot.py", "--data", train_manifest(seed, task), "--max-steps", "0", "--out", str(t / "base_cot")]
        jobs[f"{task} base cot"] = [base_cot + COT_FLAGS[task] + s,
                                    r1("base_cot_r1", "--cots", str(t / "base_cot" / "cots.jsonl"), *RISE_R1_RECIPE),
                                    ev("base_cot_r1", str(t / "base_cot_r1" / "final"))]
    return jobs


RISE_ROWS = [("tiny base (think-first prompt)", "base"), ("tiny base (answer-only prompt)", "base_plain"),
             ("SFT on plain answers", "sft"), ("Visual-RFT (GRPO only)", "grpo"),
             ("SFT-Full + RFT (tau 0)", "tau0.0"), ("RISE (tau 0.5)", "tau0.5"), ("Base-Model-CoT", "base_cot_r1")]


def constant_prior(seed, task, n):
    """The input-blind answer every trained row must beat, on the first n test records (as rise_r1.py
    --eval scores them): the uniform distribution (soft_cls, JSD) or the mean training box (det, mAP@0.5)."""
    world = run.shapes_world(seed)
    test = run.read_jsonl(world / task / f"{SPLIT['eval']}.jsonl")[:n]
    if task == "soft_cls":
        return {"JSD": float(np.mean([rewards.jsd(np.ones(len(r["probs"])), r["probs"]) for r in test]))}
    mean_box = np.mean([b for r in run.read_jsonl(train_manifest(seed, task)) for b in r["boxes"]], 0).tolist()
    # scored by rise_r1's own metric (its labels: one class per target), as the trained rows are
    return {"mAP@0.5": rise_r1.metrics_of([{"boxes": [mean_box], "parsed": True}] * len(test), test, "det")["map50"]}


def distinct_thinks(preds):
    """How many different <think> texts a row's greedy test answers (predictions.jsonl records) hold
    (1: the same CoT for every image)."""
    parsed = [rewards.parse_think_answer(p["text"]) for p in preds]
    return len({p[0] for p in parsed if p})


def rise_results(seed, d):
    out = {}
    for task in RISE_TASKS:
        table = {}
        sft = {p["id"]: p["jsd"] for p in run.read_jsonl(d / task / "sft" / "eval" / "predictions.jsonl") if "jsd" in p}
        for row, folder in RISE_ROWS:
            m = read_json(d / task / folder / "eval" / "eval.json")
            if not m:
                continue
            all_preds = run.read_jsonl(d / task / folder / "eval" / "predictions.jsonl")
            if "jsd" in m:
                preds = [p for p in all_preds if p["id"] in sft]
                # the share of test images on which this row's JSD is below SFT's (rewards.win_rate, reversed)
                beats = rewards.win_rate([p["jsd"] for p in preds], [sft[p["id"]] for p in preds]) \
                    if preds and folder != "sft" else None
                table[row] = {"JSD": m["jsd"], "accuracy": m["accuracy"], "beats SFT": beats}
            else:
                table[row] = {"mAP@0.5": m["map50"]}
            table[row]["unparsable"] = m["unparsable"]
            if folder not in ("base_plain", "sft"):          # think-first rows: does the CoT depend on the image?
                table[row]["distinct thinks"] = distinct_thinks(all_preds)
            n_test = m["n"]
        if table:
            table["constant prior (uniform / mean box)"] = constant_prior(seed, task, n_test)
        out[f"RISE on {task}"] = table
        curve = [r["reward"] for r in run.read_jsonl(d / task / "cot" / "metrics.jsonl")]
        if curve:                                   # the RISE-CoT reward curve, first vs last 10 steps
            cots = run.read_jsonl(d / task / "cot" / "cots.jsonl")
            out.setdefault("RISE-CoT", {})[task] = {"R_CoT first 10 steps": np.mean(curve[:10]),
                                                    "R_CoT last 10 steps": np.mean(curve[-10:]),
                                                    "cots.jsonl mean reward": np.mean([c["reward"] for c in cots])}
        sweep = {}
        for tau in TAUS[task]:
            log = run.read_jsonl(d / task / f"tau{tau}" / "metrics.jsonl")
            m = read_json(d / task / f"tau{tau}" / "eval" / "eval.json")
            passed = [r["pass_rate"] for r in log if "pass_rate" in r]
            if m:
                sweep[f"tau {tau}"] = {"pass rate": passed[0] if passed else None,
                                       **({"JSD": m["jsd"]} if "jsd" in m else {"mAP@0.5": m["map50"]})}
        if len(sweep) > 2:
            out[f"tau sweep on {task}"] = sweep
    return out


TABLES = {"seg": (seg_jobs, seg_results), "visrl": (visrl_jobs, visrl_results), "cot": (cot_jobs, cot_results),
          "rise": (rise_jobs, rise_results)}


# ============================================================================ running and summarising
def slug(row):
    return "".join(ch if ch.isalnum() else "_" for ch in row.lower()).strip("_")


def taken(script, extra):
    """The `extra` arguments a script takes: an option it has no use for (--n-test for rise_cot.py, which
    evaluates nothing) is left out with its value."""
    module = {"rise_cot.py": rise_cot, "rise_r1.py": rise_r1, "seg_rise.py": seg_rise, "visrl.py": visrl}[script]
    options = {o for action in module.parser()._actions for o in action.option_strings} | {"--preset"}
    kept, k = [], 0
    while k < len(extra):
        value = k + 1 < len(extra) and not extra[k + 1].startswith("--")
        if extra[k].split("=")[0] in options or not extra[k].startswith("--"):
            kept += extra[k:k + 1 + value]
        k += 1 + value
    return kept


def split_script_args(values):
    """--script-args values -> {script: args}: "rise_r1.py --sft-steps 200" -> {"rise_r1.py": [...]}; one
    without a script's name goes under None (every script, filtered by `taken`)."""
    out = {}
    for value in values:
        words = shlex.split(value)
        script = words.pop(0) if words and words[0].endswith(".py") else None
        out.setdefault(script, []).extend(words)
    return out


def run_job(name, commands, folder, script_args, threads):
    """Run one job's commands in order (stop at the first failure); DONE marks a finished job.
    `script_args` as `split_script_args` returns. Returns (name, seconds, error or None)."""
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / f"DONE_{slug(name)}"
    if done.exists():
        return name, 0.0, None
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               RISE_CACHE=str(run.vlm.CACHE))                # the shapes worlds main() made
    with open(folder / f"{slug(name)}.log", "w") as log:
        for cmd in commands:
            full = ([sys.executable, str(ROOT / cmd[0])] + cmd[1:] + taken(cmd[0], script_args.get(None, []))
                    + script_args.get(cmd[0], []))
            log.write("$ " + shlex.join(full) + "\n")
            log.flush()
            if subprocess.run(full, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode:
                return name, time.time() - t0, f"failed: {shlex.join(cmd)} (see {log.name})"
    done.write_text(f"{time.time() - t0:.0f} s\n")
    return name, time.time() - t0, None


def summarise(per_seed):
    """[{section: {row: {metric: value}}} per seed] -> {section: {row: {metric: [mean, std, n]}}}
    (std: the sample standard deviation over seeds, 0 for one seed; None values are left out)."""
    out = {}
    for results in per_seed:
        for section, rows in results.items():
            for row, metrics in rows.items():
                for metric, value in metrics.items():
                    out.setdefault(section, {}).setdefault(row, {}).setdefault(metric, [])
                    if value is not None:
                        out[section][row][metric].append(float(value))
    return {section: {row: {m: [float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)]
                            if v else [None, None, 0] for m, v in metrics.items()} for row, metrics in rows.items()}
            for section, rows in out.items()}


def number(x, digits):
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.{digits}g}"      # 3 significant digits, no 1.01e+03


def markdown(summary, seeds):
    lines = []
    for section, rows in summary.items():
        metrics = list(dict.fromkeys(m for r in rows.values() for m in r))
        lines += [f"### {section}", "", "| | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for row, cells in rows.items():
            text = []
            for m in metrics:
                mean, std, n = cells.get(m, [None, None, 0])
                missing = "" if n == len(seeds) else f" (n={n})"
                text.append("-" if mean is None else f"{number(mean, 3)} +- {number(std, 2)}{missing}")
            lines.append(f"| {row} | " + " | ".join(text) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(summary, path):
    """One row of panels per section, one panel per metric: a bar per row with its std as the error bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = {section: [m for m in dict.fromkeys(m for r in rows.values() for m in r) if m != "unparsable"]
              for section, rows in summary.items()}
    n_cols = max(len(ms) for ms in panels.values())
    fig, axes = plt.subplots(len(panels), n_cols, figsize=(3.2 * n_cols, 3.9 * len(panels)), squeeze=False)
    for ax_row, (section, metrics) in zip(axes, panels.items()):
        rows = summary[section]
        for ax, m in zip(ax_row, metrics):
            names = [r for r in rows if rows[r].get(m, [None])[0] is not None]
            ax.bar(range(len(names)), [rows[r][m][0] for r in names], yerr=[rows[r][m][1] for r in names],
                   capsize=3, color="tab:blue")
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{section}: {m}", fontsize=8)
        for ax in ax_row[len(metrics):]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("table", choices=sorted(TABLES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2, help="pipeline runs at a time (one thread each when > 1)")
    p.add_argument("--out", default=None, help="default: runs/tables/TABLE")
    p.add_argument("--script-args", action="append", default=[],
                   help='appended to every pipeline command that takes them; "rise_r1.py ARGS" to one script alone')
    p.add_argument("--rows", default=None, help="comma-separated job names to run (as printed), e.g. 'tiny base'")
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="what every row is scored on: val to choose a recipe, test to report it")
    p.add_argument("--n-train", type=int, default=64, help="training scenes of the RISE and Seg-RISE rows")
    args = p.parse_args(argv)
    SPLIT.update(eval=args.split, n_train=args.n_train)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out or ROOT / "runs" / "tables" / args.table)
    make_jobs, results = TABLES[args.table]
    threads = 1 if args.jobs > 1 else (os.cpu_count() or 1)
    for seed in seeds:                        # the default shapes worlds, made here once: jobs run at once
        run.shapes_world(seed), run.shapes_world(seed, 512, 512), run.shapes_world(seed, args.n_train, 32)
    todo = [(f"seed{seed} {name}", cmds, out / f"seed{seed}") for seed in seeds
            for name, cmds in make_jobs(seed, out / f"seed{seed}").items()]
    if args.rows:
        wanted = {r.strip() for r in args.rows.split(",")}
        unknown = wanted - {name.split(" ", 1)[1] for name, _, _ in todo}
        if unknown:
            p.error(f"--rows: no job named {sorted(unknown)} in table {args.table}")
        todo = [job for job in todo if job[0].split(" ", 1)[1] in wanted]
    t0, failed = time.time(), []
    print(f"[tables] {args.table}: {len(todo)} jobs over seeds {seeds}, {args.jobs} at a time -> {out}")
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_job, name, cmds, folder, split_script_args(args.script_args), threads)
                   for name, cmds, folder in todo]
        for k, f in enumerate(futures, 1):
            name, seconds, error = f.result()
            print(f"[tables] {k}/{len(todo)} {name}: {error or 'done'} ({seconds:.0f} s)", flush=True)
            failed += [f"{name}: {error}"] if error else []
    summary = summarise([results(seed, out / f"seed{seed}") for seed in seeds])
    wall = time.time() - t0
    base = hashlib.sha256((ROOT / "tiny-base" / "model.safetensors").read_bytes()).hexdigest()
    (out / "table.json").write_text(json.dumps({"seeds": seeds, "split": args.split, "n_train": args.n_train,
                                                "summary": summary, "failed": failed,
                                                "seconds": round(wall), "script_args": args.script_args,
                                                "tiny_base_sha256": base}, indent=1))
    text = markdown(summary, seeds) + (f"\nFailed jobs: {failed}\n" if failed else "")
    (out / "table.md").write_text(text)
    plot(summary, out / "table.png")
    print(text)
    print(f"[tables] {wall / 60:.1f} min; {out / 'table.md'}, {out / 'table.png'}")
    return summary


if __name__ == "__main__":
    main()
