"""run.py -- the run directory the four pipeline scripts share.

Why a file of its own: rise_cot.py, rise_r1.py, seg_rise.py and visrl.py would otherwise each
repeat the same plumbing. Nothing here knows a paper's algorithm:

  common_args()      the command line every script has (--model --data --out --seed ...)
  parse_with_preset()   --preset paper|tiny|auto fills the options left unset (is_tiny())
  manifest_path()    --data / --test: a .jsonl path, or a shapes-world task in the cache
  init_distributed(), barrier(), exit_finished()   the process group, and a clean exit
  zero_config(), deepspeed_config(), deepspeed_engine(), reference_model()   DeepSpeed set-up
  load_policy(), lora_model(), merged(), training_models()   the run's models (--lora-rank: peft adapters)
  policy_engine(), save_phase()   a run of phases: each trains its own engine (fresh LoRA adapters)
  start(), dispatch()   distributed start, per-rank seeds, OUT/args.json; a pipeline main: train, or --eval only
  log()              one JSON line per step in OUT/metrics.jsonl (rank 0), flushed
  append_jsonl(), done_ids(), map_jsonl()   record-by-record outputs that survive kill -9 and resume
  gather_records()   per-rank records -> rank 0, so one file gets every record exactly once
  save_checkpoint(), load_checkpoint()   model, optimizer, scheduler, step, RNG, data position
  record_counts(), prepare_out()   --resume: appended files cut back to the checkpoint, no record twice
  load_progress(), save_progress()   --resume at phase granularity (OUT/progress.json)
  usable()           skip (count, list in OUT/skipped.jsonl) samples that cannot be processed
  generate_texts()   batched sampling in which a prompt over --max-prompt-len gets None texts
  save_final()       OUT/final/ (save_pretrained, loadable by --model; ZeRO-3 weights gathered)
  write_eval()       OUT/eval.json + OUT/predictions.jsonl
  NonFiniteGuard     update() skips a non-finite loss, three in a row stop the run
  train_phase()      a training phase as a separate run: fresh AdamW, epochs, guarded updates, log
  plot()             reward / KL / length curves of a run as PNG: python run.py plot RUN_DIR
  box_picture()      an image with coloured boxes and caption lines, as PNG
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import data
import grpo
import vlm


def common_args(script, description, **defaults):
    """The shared command line. `defaults` overrides per script (e.g. lr=2e-6)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=vlm.TINY_BASE, help="hub id or local dir (default: the tiny base)")
    p.add_argument("--data", default=None, help="training manifest (default: shapes world)")
    p.add_argument("--test", default=None, help="test manifest for --eval (default: shapes world)")
    p.add_argument("--out", default=f"runs/{script}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=200,
                   help="optimizer updates, each of --grad-accum micro-steps (as TRL/HF count steps)")
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
    p.add_argument("--no-shared-prefix", dest="shared_prefix", action="store_false",
                   help="score each completion with its own copy of the prompt (vlm.SHARED_PREFIX: the plain path)")
    p.add_argument("--deepspeed", default=None, help="ZeRO config JSON (default ds_zero2.json)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N optimizer updates (for --resume)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt")
    p.add_argument("--eval", action="store_true", help="evaluate --model on --test (no training)")
    p.add_argument("--n-test", type=int, default=None, help="evaluate on the first N test records")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad manifest records")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)   # set by the launcher
    p.set_defaults(**defaults)
    return p


def is_tiny(model):
    """The tiny base, or a local dir holding a model as small as it (its config says so)."""
    if model == vlm.TINY_BASE:
        return True
    config = Path(model) / "config.json"
    if not config.is_file():
        return False
    cfg = json.loads(config.read_text())
    return cfg.get("text_config", cfg).get("hidden_size", 1e9) <= 512


def parse_with_preset(p, argv, paper, tiny):
    """Parse the command line; every option named in a preset that was not given takes the
    preset's value: `tiny` (dict) for --preset tiny, or --preset auto with a tiny model
    (is_tiny), else `paper`. An option only one preset names stays None under the other."""
    p.add_argument("--preset", default="auto", choices=["auto", "paper", "tiny"],
                   help="defaults for unset options: tiny for a tiny model (auto), else the paper's")
    p.set_defaults(**{key: None for key in {**paper, **tiny}})       # None = "take the preset"
    args = p.parse_args(argv)
    chosen = tiny if args.preset == "tiny" or (args.preset == "auto" and is_tiny(args.model)) else paper
    for key, value in chosen.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def manifest_path(name, split, seed, default_task, world=None):
    """--data / --test -> a manifest: a .jsonl path as given; otherwise the shapes-world task
    `name` (or default_task) of `world` (default: the cache's shapes world of `seed`)."""
    if name and Path(name).suffix == ".jsonl":
        return Path(name)
    return Path(world or default_shapes_world(seed)) / (name or default_task) / f"{split}.jsonl"


def default_shapes_world(seed=0):
    """The default data of every script: shapes world in the cache, made once (~2 s)."""
    root = vlm.CACHE / f"shapes-{seed}"
    if not (root / "vqa" / "test.jsonl").exists():
        data.make_shapes_world(root, seed=seed)
    return root


# ---------------------------------------------------------------------------- DeepSpeed
def init_distributed(force=False):
    """Start torch.distributed; returns (rank, world_size).

    Under the `deepspeed` launcher (or torchrun) the environment names the rank and world size.
    With `force`, a plain `python script.py` becomes a one-rank world, so the same DeepSpeed
    code path runs everywhere. On CPU, DeepSpeed's CPU accelerator talks gloo: this is how
    `deepspeed --num_gpus 2 script.py` runs two real ranks on a laptop (and in CI).
    """
    if "WORLD_SIZE" not in os.environ:
        if not force:
            return 0, 1
        import socket
        with socket.socket() as s:                 # a free port for the one-rank group
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    import atexit
    import deepspeed
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if vlm.on_gpu() else "gloo")
        # tear the process group down before the interpreter does: otherwise its threads can
        # abort the exit ("terminate called without an active exception", exit code 250)
        atexit.register(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())
    if vlm.on_gpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def exit_finished():
    """Leave a script whose main() returned: all ranks done, the process group torn down, stdout and
    stderr flushed, then os._exit(0). It skips the interpreter's own teardown, in which gloo /
    DeepSpeed threads can still abort a finished run ("terminate called without an active
    exception", exit code 250: about one two-rank test run in twenty here). A failing main() never
    gets here: its traceback and exit code stay Python's."""
    barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def zero_config(path, lr, weight_decay=0.1, grad_accum=1, micro_batch=1, grad_clip=1.0):
    """Read a ZeRO JSON config and fill the fields our command-line arguments own."""
    cfg = json.loads(Path(path).read_text())
    cfg.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=grad_accum,
               gradient_clipping=grad_clip)
    cfg.pop("train_batch_size", None)
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay,
                                                     "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True}}
    cfg.setdefault("bf16", {})["enabled"] = vlm.on_gpu()
    return cfg


def deepspeed_engine(model, cfg):
    """Wrap the policy in a DeepSpeed engine (optimizer included); returns the engine."""
    import deepspeed
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                      if p.requires_grad], config=cfg)
    return vlm.zero3_hooks(engine)


def reference_model(name, cfg, device=None, max_pixels=None):
    """The frozen reference policy of the KL term of the GRPO loss (grpo.grpo_loss).

    Under ZeRO-3 it is wrapped as an optimizer-less DeepSpeed engine, so it is sharded like the
    policy; otherwise each rank keeps a full frozen copy.
    """
    model, _ = vlm.load_model(name, device=device, max_pixels=max_pixels)
    model.requires_grad_(False).eval()
    if cfg.get("zero_optimization", {}).get("stage", 0) == 3:
        import deepspeed
        inference_cfg = {k: v for k, v in cfg.items() if k not in ("optimizer", "scheduler")}
        model = vlm.zero3_hooks(deepspeed.initialize(model=model, config=inference_cfg)[0])
        model.eval()
    return model


# ---------------------------------------------------------------------------- models of a run
def deepspeed_config(args, lr=None, micro_batch=1):
    """The run's DeepSpeed config: --deepspeed's JSON (default ds_zero2.json) with AdamW at `lr`
    (default --lr), --weight-decay and --grad-accum (zero_config)."""
    return zero_config(args.deepspeed or Path(__file__).with_name("ds_zero2.json"), lr=lr or args.lr,
                       weight_decay=args.weight_decay, grad_accum=args.grad_accum, micro_batch=micro_batch)


def load_policy(args, name=None):
    """(model, processor) of the policy: --model (or `name`) at --max-pixels, with gradient
    checkpointing when --gradient-checkpointing asks for it."""
    model, processor = vlm.load_model(name or args.model, max_pixels=args.max_pixels)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, processor


LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def lora_model(model, rank, seed=0):
    """A fresh LoRA adapter (rank r, alpha 2r: LLaMA-Factory's defaults, which VisRL's released configs
    use with lora_target all) on every linear layer of the language model; the rest frozen. peft is
    imported only here, so it is needed only with --lora-rank."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise SystemExit("--lora-rank needs peft: pip install peft") from e
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules=LORA_TARGETS))


def merged(model):
    """The plain HF model with the adapter folded into its weights (a DeepSpeed engine or peft model in)."""
    model = getattr(model, "module", model)
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def training_models(args):
    """(engine, processor, ref, cfg): the policy as a DeepSpeed engine (AdamW inside) and, when
    --beta > 0, its frozen reference (reference_model). The GRPO pipelines' set-up."""
    model, processor = load_policy(args)
    cfg = deepspeed_config(args)
    engine = deepspeed_engine(model, cfg)
    ref = reference_model(args.model, cfg, device=engine.device, max_pixels=args.max_pixels) if args.beta else None
    return engine, processor, ref, cfg


def policy_engine(model, cfg, lora_rank=0):
    """The DeepSpeed engine that trains `model`: all its weights, or fresh LoRA adapters of lora_rank."""
    if lora_rank and cfg.get("zero_optimization", {}).get("stage") == 3:
        raise SystemExit("--lora-rank: use ZeRO-2 (ds_zero2.json); merging adapters needs whole weights")
    return deepspeed_engine(lora_model(model, lora_rank) if lora_rank else model, cfg)


def save_phase(engine, processor, out, name, cfg, lora_rank=0):
    """Save a phase's model to OUT/<name> (save_final); returns the engine the next phase trains. With
    LoRA the adapters are folded into the weights first and the next phase trains fresh ones (a new
    engine): each phase trains on the merged model of the last (VisRL's released code does so)."""
    model = merged(engine) if lora_rank else engine
    save_final(model, processor, Path(out) / Path(name).parent, Path(name).name)
    return policy_engine(model, cfg, lora_rank) if lora_rank else engine


def start(args):
    """Distributed start (one rank without a launcher), per-rank seeds, OUT/args.json.

    Every rank gets its own seed so ranks sample different completions; model initialisation
    is not seeded here (weights come from a checkpoint and DeepSpeed broadcasts them).
    """
    rank, world = init_distributed(force=True)
    vlm.SHARED_PREFIX = getattr(args, "shared_prefix", True)
    seed = args.seed + 1000 * rank
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=1, default=str))
    barrier()
    return rank, world, out


def dispatch(args, train, evaluate):
    """A pipeline's main: start the run (start()), then train(args, rank, world, out), or with --eval
    only evaluate(args, rank, world, out). Returns what that function returns."""
    return (evaluate if args.eval else train)(args, *start(args))


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


# ---------------------------------------------------------------------------- resume
# One resume system for the four pipelines. A checkpoint (save_checkpoint; visrl: its progress.json
# after each phase) stores how many records each appended file held when it was taken
# (record_counts). A run resumed from it cuts those files back to that many records
# (prepare_out) and the steps after the checkpoint run and log again: no record is lost or
# written twice, whatever the moment of a kill -9. Files written per sample id (cots.jsonl,
# candidates.jsonl) instead keep every record and skip the ids they hold (done_ids).
def record_counts(out, logged=("metrics.jsonl",)):
    """{file name: complete records in OUT/file} of the appended files, rank 0's count on every rank."""
    counts = [{name: len(read_jsonl(Path(out) / name)) for name in logged}
              if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0 else None]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(counts, src=0)
    return counts[0]


def prepare_out(out, rank, state, logged=("metrics.jsonl",), fresh=()):
    """Make OUT match the state a run starts from before it writes anything.

    state: the checkpoint's state (holding "records" from record_counts), or None for a fresh
    start (also --resume before the first checkpoint). Each `logged` file is cut back to the
    records it held at the checkpoint (emptied without one), atomically; the `fresh` files
    (written per sample id) are deleted on a fresh start and kept on a resume."""
    if rank == 0:
        counts = (state or {}).get("records", {})
        for name in logged:
            path = Path(out) / name
            if path.exists():
                kept = read_jsonl(path)[:counts.get(name, 0)]
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
                os.replace(tmp, path)
        if state is None:
            for name in fresh:
                (Path(out) / name).unlink(missing_ok=True)
    barrier()


def done_ids(path):
    return {r["id"] for r in read_jsonl(path)}


def map_jsonl(items, fn, path, rank, world, chunk, desc=None):
    """fn(this rank's share of a chunk of `items`) -> records with an "id", for the items whose id is
    not in the JSONL `path` yet (--resume: those are done), `chunk` items at a time; rank 0 appends
    the records of all ranks as they come. Returns {id: record} of every record, on every rank."""
    done = {r["id"]: r for r in read_jsonl(path)}
    todo = [r for r in items if r["id"] not in done]
    for k in tqdm(range(0, len(todo), chunk), desc=desc, disable=rank != 0):
        mine = shard(todo[k:k + chunk], rank, world)        # every rank walks every chunk (all_gather)
        for rec in gather_records(fn(mine) if mine else []):
            done[rec["id"]] = rec
            if rank == 0:
                append_jsonl(path, rec)
    return done


def load_progress(out, rank, resume, stale=()):
    """--resume at phase granularity: OUT/progress.json's {"done": [finished phases], "step", "records"}
    (save_progress). A fresh start ({"done": []}) first deletes progress.json and the `stale` paths
    (glob patterns, files or folders). The appended files are cut back to the last save (prepare_out)."""
    path = Path(out) / "progress.json"
    progress = json.loads(path.read_text()) if resume and path.exists() else {"done": []}
    if not resume and rank == 0:
        for old in [p for pattern in ("progress.json", *stale) for p in sorted(Path(out).glob(pattern))]:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    barrier()
    prepare_out(out, rank, progress if "records" in progress else None)
    return progress


def save_progress(out, rank, progress, step):
    """Write OUT/progress.json after a phase: `progress` with the step counter and the record counts
    prepare_out cuts the appended files back to on --resume. Atomic (kill -9 safe)."""
    progress["step"], progress["records"] = step, record_counts(out)
    if rank == 0:
        (Path(out) / "progress.tmp").write_text(json.dumps(progress))
        (Path(out) / "progress.tmp").replace(Path(out) / "progress.json")
    barrier()


def gather_records(records):
    """Every rank's list of records -> the concatenation on all ranks (one list per world)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return list(records)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, list(records))
    return [r for part in gathered for r in part]


def partition(records, problem):
    """(records `problem(record)` finds nothing wrong with, [(record, why) for the others])."""
    ok, bad = [], []
    for rec in records:
        why = problem(rec)
        (bad.append((rec, why)) if why else ok.append(rec))
    return ok, bad


def usable(records, problem, rank, world, out=None, split="train"):
    """The records whose sample can be processed; the others are skipped, counted and reported.

    problem(record) -> None, or why the sample cannot be processed (e.g. vlm.prompt_problem: a
    prompt over --max-prompt-len, an image the processor refuses); an exception it raises counts
    as the reason. Every rank checks its share and all ranks get the same list, so one bad sample
    never aborts a run (nor desynchronises the ranks). Rank 0 prints each skipped id and writes
    {id, split, reason} to OUT/skipped.jsonl (replacing that split's earlier lines: a resumed run
    lists each sample once). Returns (usable records, skipped list).
    """
    bad = []
    for rec in shard(records, rank, world):
        try:
            why = problem(rec)
        except Exception as e:              # noqa: BLE001 -- any failure of one sample is its own
            why = f"{type(e).__name__}: {e}"
        if why:
            bad.append({"id": rec["id"], "split": split, "reason": str(why)[:500]})
    bad = gather_records(bad)
    ids = {b["id"] for b in bad}
    if rank == 0 and out is not None:
        path = Path(out) / "skipped.jsonl"
        lines = [r for r in read_jsonl(path) if r.get("split") != split] + bad
        if lines or path.exists():
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    if rank == 0 and bad:
        for b in bad:
            print(f"warning: skipped {split} sample {b['id']!r}: {b['reason']}", file=sys.stderr)
        print(f"warning: skipped {len(bad)} of {len(records)} {split} sample(s)"
              + (f" (listed in {Path(out) / 'skipped.jsonl'})" if out is not None else ""), file=sys.stderr)
    kept = [r for r in records if r["id"] not in ids]
    if records and not kept and split == "train":
        raise SystemExit(f"every one of the {len(records)} {split} samples was skipped: first reason: "
                         f"{bad[0]['reason']}")
    return kept, bad


def generate_texts(model, processor, convs, images, n, max_new_tokens, temperature, max_prompt_len=None,
                   batch_size=None):
    """n texts per prompt (temperature 0: greedy), batch_size prompts a call (default: all), in generation
    mode. A prompt over max_prompt_len gets n None texts instead of failing its batch: one long prompt
    (e.g. one with a big crop in it) never aborts a run; the others are sampled on their own."""
    texts, batch_size = [], batch_size or max(len(convs), 1)
    with vlm.generation_mode(model):
        for s in range(0, len(convs), batch_size):
            texts += _fitting_texts(model, processor, convs[s:s + batch_size], images[s:s + batch_size], n,
                                    max_new_tokens, temperature, max_prompt_len)
    return texts


def _fitting_texts(model, processor, convs, images, n, max_new_tokens, temperature, max_prompt_len):
    try:
        batch = vlm.chat_inputs(processor, convs, images, max_prompt_len=max_prompt_len)
    except vlm.PromptTooLong:                     # sample the prompts that fit, on their own
        fits = [k for k, (c, ims) in enumerate(zip(convs, images))
                if vlm.prompt_problem(processor, c, ims, max_prompt_len) is None]
        texts = iter(_fitting_texts(model, processor, [convs[k] for k in fits], [images[k] for k in fits], n,
                                    max_new_tokens, temperature, max_prompt_len) if fits else [])
        return [next(texts) if k in fits else None for k in range(len(convs)) for _ in range(n)]
    return vlm.sample(model, processor, batch, n, max_new_tokens, temperature or 1.0,
                      do_sample=temperature != 0)["texts"]


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
def save_checkpoint(engine, out, step, state, logged=("metrics.jsonl",)):
    """DeepSpeed checkpoint (model, optimizer, scheduler) + our state (step, data position, RNG,
    and the record count of each `logged` file, for prepare_out on --resume).

    DeepSpeed writes the tag folder first and the `latest` pointer last, so a kill during a
    save leaves `latest` on the previous complete checkpoint.
    """
    state = dict(state, step=step, rng=_rng_state(), records=record_counts(out, logged))
    engine.save_checkpoint(str(Path(out) / "ckpt"), tag=f"step{step}", client_state={"run_state": state})
    if torch.distributed.get_rank() == 0:           # keep only the newest complete checkpoint
        for old in (Path(out) / "ckpt").glob("step*"):
            if old.name != f"step{step}":
                shutil.rmtree(old, ignore_errors=True)
    barrier()


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
    barrier()
    return target


def write_eval(out, metrics, preds, **info):
    """OUT/eval.json (the metrics and `info`, e.g. model and test paths) and OUT/predictions.jsonl."""
    (Path(out) / "eval.json").write_text(json.dumps(dict(metrics, **{k: str(v) for k, v in info.items()}), indent=1))
    data.write_jsonl(Path(out) / "predictions.jsonl", preds)


class NonFiniteGuard:
    """Counts consecutive skipped (non-finite) updates; three in a row stop the run."""

    def __init__(self, limit=3):
        self.limit, self.in_a_row = limit, 0

    def update(self, engine, loss, step, window=None):
        """The guarded update: backward + optimizer step of `loss` (grpo.apply_update, DeepSpeed
        engine) unless it is NaN or infinite, which never reaches the weights. Returns skipped."""
        skipped = not math.isfinite(loss.item())
        if not skipped:
            grpo.apply_update(engine, None, loss, window=window)
        self.check(skipped, step)
        return skipped

    def check(self, skipped, step):
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if skipped:
            print(f"[step {step}] non-finite loss: update skipped ({self.in_a_row} in a row)", file=sys.stderr)
        if self.in_a_row >= self.limit:
            raise RuntimeError(f"{self.limit} non-finite losses in a row at step {step}: stopping. "
                               "Lower --lr, or check the rewards and the data for NaN/inf.")


def train_phase(engine, items, loss_fn, name, lr, epochs, per_rank, seed, args, rank, world, out, step=0):
    """One training phase, as a separate run would train it: a fresh AdamW at `lr`, `epochs` passes over
    `items` in a seeded order (per_rank items a rank a micro-step; at most --max-steps updates of
    --grad-accum micro-steps), guarded updates, its last (maybe partial) accumulation window applied
    at its end. loss_fn(batch) -> (loss, stats dict); one metrics.jsonl line a micro-step, numbered
    from `step`. Returns the number of micro-steps."""
    grpo.fresh_optimizer(engine, lr)
    steps = math.ceil(epochs * len(items) / (per_rank * world)) if items else 0
    steps = min(steps, args.max_steps * args.grad_accum) if args.max_steps else steps
    order, guard = data_order(len(items), seed), NonFiniteGuard()
    engine.train()
    bar = tqdm(range(steps), desc=name, disable=rank != 0)
    for k in bar:
        t0 = time.time()
        loss, stats = loss_fn(step_items(items, order, k, per_rank, rank, world))
        skipped = guard.update(engine, loss, step + k, window=grpo.accumulation(k, steps, args.grad_accum))
        log(out, rank, dict(stats, step=step + k, phase=name, loss=loss.item(), skipped=skipped,
                            updates=engine.global_steps, seconds=round(time.time() - t0, 2)))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return steps


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


def box_picture(path, image, boxes, lines, size=256):
    """PNG of `image`, scaled up by a whole factor to about `size` pixels, with the outlines of the
    normalised boxes [(box or None, colour)] and the caption lines [(text, colour)] under it."""
    scale = max(1, size // max(image.size))
    im = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    canvas = Image.new("RGB", (im.width, im.height + 4 + 14 * len(lines)), "white")
    canvas.paste(im, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for box, colour in boxes:
        if box:
            x1, y1, x2, y2 = box
            draw.rectangle([x1 * im.width, y1 * im.height, x2 * im.width, y2 * im.height], outline=colour, width=2)
    for k, (text, colour) in enumerate(lines):
        draw.text((2, im.height + 2 + 14 * k), text, fill=colour)
    canvas.save(path)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "plot":
        for d in sys.argv[2:]:
            print(plot(d))
    else:
        print("usage: python run.py plot RUN_DIR [RUN_DIR ...]")
