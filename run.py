"""run.py -- the run directory the four pipeline scripts share (SPEC 7 and 8).

Why a file of its own: rise_cot.py, rise_r1.py, seg_rise.py and visrl.py would otherwise each
repeat the same plumbing. Nothing here knows about models or papers:

  common_args()      the command line every script has (--model --data --out --seed ...)
  start()            distributed start, per-rank seeds, OUT/args.json
  log()              one JSON line per step in OUT/metrics.jsonl (rank 0), flushed
  append_jsonl(), done_ids()   record-by-record outputs that survive kill -9 and resume
  gather_records()   per-rank records -> rank 0, so one file gets every record exactly once
  save_checkpoint(), load_checkpoint()   model, optimizer, scheduler, step, RNG, data position
  save_final()       OUT/final/ (save_pretrained, loadable by --model; ZeRO-3 weights gathered)
  NonFiniteGuard     skip a non-finite loss, stop after three in a row
  plot()             reward / KL / length curves of a run as PNG: python run.py plot RUN_DIR
"""
import argparse
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import vlm


def common_args(script, description, **defaults):
    """The shared command line (SPEC 9). `defaults` overrides per script (e.g. lr=2e-6)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=vlm.TINY_BASE, help="hub id or local dir (default: the tiny base)")
    p.add_argument("--data", default=None, help="training manifest (default: shapes world)")
    p.add_argument("--test", default=None, help="test manifest for --eval (default: shapes world)")
    p.add_argument("--out", default=f"runs/{script}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--num-generations", "-G", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=1, help="prompts per rank per micro-step")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-6)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (0: no reference model)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-prompt-len", type=int, default=1024)
    p.add_argument("--max-pixels", type=int, default=None, help="cap on image pixels (paper: 401408)")
    p.add_argument("--loss-norm", default="seq", choices=["seq", "token", "fixed"])
    p.add_argument("--scale-rewards", default="group", choices=["group", "none"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--deepspeed", default=None, help="ZeRO config JSON (default ds_zero2.json)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (for --resume)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt")
    p.add_argument("--eval", action="store_true", help="evaluate --model on --test (no training)")
    p.add_argument("--n-test", type=int, default=None, help="evaluate on the first N test records")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad manifest records")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)   # set by the launcher
    p.set_defaults(**defaults)
    return p


def start(args):
    """Distributed start (one rank without a launcher), per-rank seeds, OUT/args.json.

    Every rank gets its own seed so ranks sample different completions; model initialisation
    is not seeded here (weights come from a checkpoint and DeepSpeed broadcasts them).
    """
    rank, world = vlm.init_distributed(force=True)
    seed = args.seed + 1000 * rank
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=1, default=str))
    vlm.barrier()
    return rank, world, out


def log(out, rank, record):
    """Append one step's metrics to OUT/metrics.jsonl (rank 0 only), flushed at once."""
    if rank == 0:
        append_jsonl(Path(out) / "metrics.jsonl", record)


def append_jsonl(path, record):
    """Append one record and flush it to disk: a kill -9 loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path):
    """All complete records of a JSONL file; a torn last line (killed mid-write) is cut off."""
    path = Path(path)
    if not path.exists():
        return []
    records, good_bytes = [], 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                records.append(json.loads(raw))
                good_bytes += len(raw)
            except json.JSONDecodeError:
                break
    if good_bytes < path.stat().st_size:        # drop the torn tail so new appends start clean
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return records


def prepare_out(out, rank, resume, step, outputs, stage=None):
    """A fresh run deletes the old outputs; a resumed one drops metrics logged after the
    checkpoint it restarts from (they will be logged again), so no step appears twice."""
    if rank == 0:
        if not resume:
            for name in outputs:
                (Path(out) / name).unlink(missing_ok=True)
        else:
            kept = [r for r in read_jsonl(Path(out) / "metrics.jsonl")
                    if (stage is not None and r.get("stage") != stage) or r["step"] < step]
            (Path(out) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    vlm.barrier()


def done_ids(path):
    return {r["id"] for r in read_jsonl(path)}


def gather_records(records):
    """Every rank's list of records -> the concatenation on all ranks (one list per world)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return list(records)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, list(records))
    return [r for part in gathered for r in part]


def shard(items, rank, world):
    """This rank's share of a list (round robin): ranks never process the same item."""
    return items[rank::world]


def data_order(n, seed):
    """A seeded permutation of range(n): the order training walks the data in."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def step_items(items, order, step, per_rank, rank, world):
    """This rank's items at a global step: `order` walked per_rank * world items a step, wrapping.
    It depends only on the step, so --resume (which restores the step) restores the data position."""
    per_step = per_rank * world
    idx = [order[(step * per_step + k) % len(order)] for k in range(per_step)]
    return [items[i] for i in shard(idx, rank, world)]


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(engine, out, step, state):
    """DeepSpeed checkpoint (model, optimizer, scheduler) + our state (step, data position, RNG).

    DeepSpeed writes the tag folder first and the `latest` pointer last, so a kill during a
    save leaves `latest` on the previous complete checkpoint.
    """
    state = dict(state, step=step, rng=_rng_state())
    engine.save_checkpoint(str(Path(out) / "ckpt"), tag=f"step{step}", client_state={"run_state": state})
    if torch.distributed.get_rank() == 0:           # keep only the newest complete checkpoint
        for old in (Path(out) / "ckpt").glob("step*"):
            if old.name != f"step{step}":
                shutil.rmtree(old, ignore_errors=True)
    vlm.barrier()


def load_checkpoint(engine, out):
    """Restore the newest checkpoint of OUT/ckpt; returns our state dict, or None if none."""
    ckpt = Path(out) / "ckpt"
    if not (ckpt / "latest").exists():
        return None
    _, client = engine.load_checkpoint(str(ckpt))
    state = client["run_state"]
    _set_rng_state(state.pop("rng"))
    return state


def _rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s):
    random.setstate(_tuple(s["python"]))            # tuples may come back as lists
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


def save_final(engine, processor, out, name="final"):
    """save_pretrained to OUT/<name> (via a temp dir + rename); ZeRO-3 weights are gathered first."""
    module = getattr(engine, "module", engine)
    target = Path(out) / name
    tmp = target.with_name(name + ".tmp")
    with vlm.gathered(module):
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            module.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
    vlm.barrier()
    return target


class NonFiniteGuard:
    """Counts consecutive skipped (non-finite) updates; three in a row stop the run."""

    def __init__(self, limit=3):
        self.limit, self.in_a_row = limit, 0

    def check(self, skipped, step):
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if skipped:
            print(f"[step {step}] non-finite loss: update skipped ({self.in_a_row} in a row)", file=sys.stderr)
        if self.in_a_row >= self.limit:
            raise RuntimeError(f"{self.limit} non-finite losses in a row at step {step}: stopping. "
                               "Lower --lr, or check the rewards and the data for NaN/inf.")


# ---------------------------------------------------------------------------- pictures
def plot(run_dir, keys=None):
    """PNG curves of a run's metrics.jsonl (reward components, KL, completion length, loss)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if not rows:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no records")
    numeric = list(dict.fromkeys(k for r in rows for k, v in r.items()
                                 if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)))
    keys = keys or [k for k in numeric if k.startswith("reward") or k in ("kl", "completion_len", "loss",
                                                                          "margin", "similarity")]
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot(*zip(*points), lw=1)
        ax.set_ylabel(key, fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=100)
    plt.close(fig)
    return run_dir / "curves.png"


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "plot":
        for d in sys.argv[2:]:
            print(plot(d))
    else:
        print("usage: python run.py plot RUN_DIR [RUN_DIR ...]")
