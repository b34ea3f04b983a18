"""run.py -- what the four pipeline scripts share. Nothing here knows a paper's algorithm.

  command line   common_args(), parse_args(): presets (paper / tiny) fill what was not given, --config
  start          start(): process group, per-rank seeds, the run folder (an evaluation gets its own)
  data           records(), usable(), step_items(): what each rank trains and scores on
  models         policy(), reference_model(), save_final(): DeepSpeed engines, LoRA, ZeRO-3, lr schedules
  the loop       end_step(): log, stop on repeated NaN, checkpoint, and on SIGTERM checkpoint and exit
  checkpoints    save_checkpoint(), resume(): a checkpoint counts once every rank has written its part
  logs           log(), log_completions(), read_jsonl(), map_jsonl(): OUT/*.jsonl and a tracker
"""
import argparse
import json
import os
import random
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import vlm

LOGGED = ("metrics.jsonl", "completions.jsonl")       # appended per step: cut back to the checkpoint on --resume
ROOT = Path(__file__).resolve().parent


# ============================================================================ command line
def common_args(script, description, grpo_options=True, evaluation=True, **defaults):
    """The command line every pipeline has; grpo_options / evaluation add the GRPO and --eval flags.
    `defaults` overrides per script. Options a preset fills default to None here (parse_args)."""
    p = argparse.ArgumentParser(prog=f"{script}.py", description=description)
    a = p.add_argument
    a("--model", default=vlm.TINY_BASE, help="hub id or local dir (default: the tiny base)")
    a("--data", default=None, help="training manifest (.jsonl), or a shapes-world dataset name (default: shapes world)")
    a("--out", default=None, help=f"run folder (default runs/{script}; with --eval runs/{script}-eval)")
    a("--seed", type=int, default=0)
    a("--config", default=None, help="a run's args.json: its options are the defaults (rerun a run exactly)")
    a("--max-steps", type=int, help="optimizer updates, each of --grad-accum micro-steps (as TRL/HF count steps)")
    a("--batch-size", type=int, help="prompts per rank per micro-step")
    a("--grad-accum", type=int, default=1)
    a("--lr", type=float)
    a("--weight-decay", type=float, default=0.1)
    a("--lr-scheduler", default="constant", choices=["constant", "linear", "cosine"],
      help="transformers' schedule, restarted at every training stage")
    a("--warmup-ratio", type=float, default=0.0, help="share of a stage's updates with a linear warm-up")
    a("--beta", type=float, default=0.04, help="KL (GRPO) / DPO coefficient")
    a("--temperature", type=float, default=1.0)
    a("--max-new-tokens", type=int)
    a("--max-prompt-len", type=int, default=1024, help="a longer prompt is skipped and counted, never cut")
    a("--max-pixels", type=int, help="cap on image pixels (RISE: 401408)")
    a("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    a("--no-shared-prefix", dest="shared_prefix", action="store_false",
      help="score each completion with its own copy of the prompt (vlm.SHARED_PREFIX: the plain path)")
    a("--deepspeed", help="ZeRO config JSON (ds_zero2.json, ds_zero3.json: the project's, or a path)")
    a("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (peft; 0: every weight)")
    a("--freeze-vision", action="store_true", help="train no weight of the vision tower (its merger still trains)")
    a("--save-every", type=int, default=50, help="checkpoint every N optimizer updates (for --resume)")
    a("--resume", action="store_true", help="continue from OUT's last complete checkpoint")
    a("--skip-bad", action="store_true", help="skip (and count) bad manifest records")
    a("--report-to", default="none", choices=["none", "tensorboard", "wandb"], help="experiment tracker")
    a("--log-completions-every", type=int, default=10, help="a table of sampled completions in the tracker every N steps")
    a("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)        # set by the launcher
    if grpo_options:
        a("--num-generations", "-G", type=int, help="G: completions per prompt")
        a("--loss-norm", default="seq", choices=["seq", "token", "fixed"], help="grpo.grpo_loss's norm")
        a("--scale-rewards", default="group", choices=["group", "none"], help="divide advantages by the group std")
    if evaluation:
        a("--eval", action="store_true", help="only evaluate --model on --test (no training)")
        a("--test", default=None, help="test manifest or shapes-world dataset name for --eval")
        a("--n-test", type=int, default=None, help="evaluate on the first N test records")
    p.set_defaults(**defaults)
    return p


def parse_args(p, argv, paper, tiny):
    """Parse the command line. Every option a preset names that was not given takes the preset's value:
    `tiny` for --preset tiny, or --preset auto with a tiny model (vlm.is_tiny), else `paper`. --config
    ARGS.json makes a finished run's options the defaults. --help shows both presets' values."""
    p.add_argument("--preset", default="auto", choices=["auto", "paper", "tiny"],
                   help="defaults for unset options: tiny for a tiny model (auto), else the paper's")
    for action in p._actions:
        if action.dest in paper or action.dest in tiny:
            action.help = (action.help or "") + f" (paper: {paper.get(action.dest)}, tiny: {tiny.get(action.dest)})"
    fallback = {a.dest: a.default for a in p._actions}                 # for an option one preset leaves out
    p.set_defaults(**{key: None for key in {**paper, **tiny}})          # None = "take the preset"
    config = p.parse_known_args(argv)[0].config
    if config:
        saved = json.loads(Path(config).read_text())
        known = {a.dest for a in p._actions}
        p.set_defaults(**{k: v for k, v in saved.items() if k in known and k not in ("config", "resume", "local_rank")})
    args = p.parse_args(argv)
    chosen = tiny if args.preset == "tiny" or (args.preset == "auto" and vlm.is_tiny(args.model)) else paper
    for key in {**paper, **tiny}:
        if getattr(args, key, None) is None:
            setattr(args, key, chosen.get(key, fallback.get(key)))
    args.gradient_checkpointing = bool(args.gradient_checkpointing)
    return args


def manifest_path(name, split, seed, default_dataset, world=None):
    """--data / --test -> a manifest: a .jsonl path as given; otherwise the shapes-world dataset
    `name` (or default_dataset) of `world` (default: the cache's shapes world of `seed`)."""
    if name and Path(name).suffix == ".jsonl":
        return Path(name)
    return Path(world or shapes_world(seed)) / (name or default_dataset) / f"{split}.jsonl"


def shapes_world(seed=0, n_train=64, n_test=32):
    """The default data: a shapes world in the cache (vlm.CACHE), made once (~2 s). One process per
    machine writes it (LOCAL_RANK 0), into a folder of its own that it then renames into place, so
    ranks and nodes that share a cache never write the same files; the others wait."""
    name = f"shapes-v2-{seed}" if (n_train, n_test) == (64, 32) else f"shapes-v2-{seed}-{n_train}-{n_test}"
    root = vlm.CACHE / name
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and not root.exists():
        tmp = root.with_name(f"{name}.tmp-{os.getpid()}")
        data.make_shapes_world(tmp, n_train=n_train, n_test=n_test, seed=seed)
        try:
            tmp.rename(root)
        except OSError:                        # another machine's rank 0 was first: the same files
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    return root


# ============================================================================ start
STOP = {"armed": False, "requested": False}      # SIGTERM: checkpoint at the end of the step, then exit


def start(args, script):
    """The process group (one rank without a launcher), per-rank seeds, and the run folder, with its
    args.json. Training writes into --out (default runs/SCRIPT); an evaluation into its own folder
    (default runs/SCRIPT-eval) and refuses one that holds a training run. Returns (rank, world, out)."""
    evaluating = getattr(args, "eval", False)
    out = Path(args.out or f"runs/{script}" + ("-eval" if evaluating else ""))
    if evaluating and ((out / "metrics.jsonl").exists() or (out / "ckpt").exists()):
        raise SystemExit(f"--eval: {out} holds a training run; an evaluation never writes into one: pass --out DIR")
    rank, world = init_distributed(force=True)
    vlm.SHARED_PREFIX = args.shared_prefix
    seed = args.seed + 1000 * rank                 # ranks sample different completions
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps({k: v for k, v in vars(args).items() if not k.startswith("_")},
                                                  indent=1, default=str))
    for sig in (signal.SIGTERM, signal.SIGUSR1):   # SLURM: SIGTERM before the kill, SIGUSR1 with --signal
        signal.signal(sig, _on_stop_signal)
    barrier()
    return rank, world, out


def _on_stop_signal(signum, frame):
    if not STOP["armed"]:                          # outside a training loop: stop now
        raise SystemExit(128 + signum)
    STOP["requested"] = True


def init_distributed(force=False):
    """Start torch.distributed; returns (rank, world_size).

    Under the `deepspeed` launcher (or torchrun) the environment names the rank and world size.
    With `force`, a plain `python script.py` becomes a one-rank world, so the same DeepSpeed code
    path runs everywhere. On CPU, DeepSpeed's CPU accelerator talks gloo: this is how
    `deepspeed --num_gpus 2 script.py` runs two real ranks on a laptop (and in CI)."""
    if "WORLD_SIZE" not in os.environ:
        if not force:
            return 0, 1
        import socket
        with socket.socket() as s:                 # a free port for the one-rank group
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import atexit
    import deepspeed
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if vlm.on_gpu() else "gloo")
        # tear the process group down before the interpreter does: otherwise its threads can abort the
        # exit ("terminate called without an active exception", exit code 250)
        atexit.register(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())
    if vlm.on_gpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def exit_finished():
    """Leave a script whose main() returned: all ranks done, the process group torn down, output flushed,
    then os._exit(0). It skips the interpreter's own teardown, in which gloo / DeepSpeed threads can still
    abort a finished run ("terminate called without an active exception", exit code 250)."""
    barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


# ============================================================================ data
def records(path, skip_bad=False, task=None, allowed=("cls", "det", "seg", "vqa")):
    """(records of a manifest, task, skipped count): validated by data.read_manifest, the task (cls / det /
    seg / vqa) told by the records (data.manifest_task: one of `allowed`) unless given."""
    task = task or data.manifest_task(path, allowed)
    found, skipped = data.read_manifest(path, task, skip_bad=skip_bad)
    return found, task, skipped


def shard(items, rank, world):
    """This rank's share of a list (round robin): ranks never process the same item."""
    return items[rank::world]


def gather_records(records_):
    """Every rank's list of records -> the concatenation on all ranks (one list per world)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return list(records_)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, list(records_))
    return [r for part in gathered for r in part]


def usable(records_, problem, rank, world, out=None, split="train"):
    """The records whose sample can be processed; the others are skipped, counted and reported.

    problem(record) -> None, or why the sample cannot be processed (a prompt over --max-prompt-len, an
    image that cannot be opened or that the processor refuses); an exception it raises counts as the
    reason. Every rank checks its share and all ranks get the same list, so one bad sample never aborts a
    run (nor desynchronises the ranks). Rank 0 prints each skipped id and writes {id, split, reason} to
    OUT/skipped.jsonl (that split's earlier lines replaced). Returns (usable records, skipped list);
    raises SystemExit when every training record is skipped."""
    bad = []
    for rec in shard(records_, rank, world):
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
            data.write_jsonl(path, lines)
    if rank == 0 and bad:
        for b in bad:
            print(f"warning: skipped {split} sample {b['id']!r}: {b['reason']}", file=sys.stderr)
        print(f"warning: skipped {len(bad)} of {len(records_)} {split} sample(s)"
              + (f" (listed in {Path(out) / 'skipped.jsonl'})" if out is not None else ""), file=sys.stderr)
    kept = [r for r in records_ if r["id"] not in ids]
    if records_ and not kept and split != "test":
        raise SystemExit(f"every one of the {len(records_)} {split} samples was skipped: first reason: {bad[0]['reason']}")
    return kept, bad


def partition(records_, problem):
    """(records `problem(record)` finds nothing wrong with, [(record, why) for the others])."""
    ok, bad = [], []
    for rec in records_:
        why = problem(rec)
        (bad.append((rec, why)) if why else ok.append(rec))
    return ok, bad


def data_order(n, seed):
    """A seeded permutation of range(n): the order training walks the data in."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def step_items(items, order, step, per_rank, rank, world):
    """This rank's items at micro-step `step`: `order` walked per_rank * world items a step, wrapping. It
    depends only on the step, so --resume (which restores the step) restores the data position."""
    per_step = per_rank * world
    idx = [order[(step * per_step + k) % len(order)] for k in range(per_step)]
    return [items[i] for i in shard(idx, rank, world)]


# ============================================================================ models
def deepspeed_config(args, lr=None, micro_batch=1):
    """--deepspeed's JSON (default ds_zero2.json) with the fields the command line owns: AdamW at `lr`
    (default --lr), --weight-decay, --grad-accum, clipping 1.0, bf16 on GPU."""
    path = Path(args.deepspeed or "ds_zero2.json")
    cfg = json.loads((path if path.exists() else ROOT / path).read_text())     # a bare name: the project's
    cfg.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=args.grad_accum,
               gradient_clipping=1.0)
    cfg.pop("train_batch_size", None)
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": lr or args.lr, "weight_decay": args.weight_decay,
                                                     "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True}}
    cfg.setdefault("bf16", {})["enabled"] = vlm.on_gpu()
    return cfg


def policy(args, name=None, micro_batch=1, lr=None):
    """(engine, processor): the policy --model (or `name`) at --max-pixels as a DeepSpeed engine (AdamW
    inside), with gradient checkpointing, --freeze-vision and --lora-rank adapters when asked for."""
    model, processor = vlm.load_model(name or args.model, max_pixels=args.max_pixels)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.freeze_vision:
        vlm.freeze_vision(model)
    if args.lora_rank:
        model = vlm.add_lora(model, args.lora_rank, args.seed)
    import deepspeed
    cfg = deepspeed_config(args, lr, micro_batch)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=cfg)
    return vlm.zero3_hooks(engine), processor


def zero_stage(cfg_or_engine):
    cfg = getattr(cfg_or_engine, "config", cfg_or_engine)
    return cfg.get("zero_optimization", {}).get("stage", 0)


def reference_model(name, args, device=None, with_processor=False):
    """A frozen copy of model `name` (GRPO's KL reference, a DPO stage's reference, VisRL's critic). Under
    ZeRO-3 it is an optimizer-less DeepSpeed engine, sharded like the policy; otherwise each rank keeps
    a full copy. With --lora-rank the pipelines need none: the policy with its adapters off is it.
    with_processor: (model, its own processor), for a model that may tokenize differently (a critic)."""
    model, processor = vlm.load_model(name, device=device, max_pixels=args.max_pixels)
    model.requires_grad_(False).eval()
    cfg = deepspeed_config(args)
    if zero_stage(cfg) == 3:
        import deepspeed
        inference = {k: v for k, v in cfg.items() if k not in ("optimizer", "scheduler")}
        model = vlm.zero3_hooks(deepspeed.initialize(model=model, config=inference)[0])
        model.eval()
    return (model, processor) if with_processor else model


def new_stage(engine, lr, updates, args, done=0):
    """Start a training stage (RISE-R1's SFT then GRPO, VisRL's SFT, stage 1, stage 2) as a separate run
    would: AdamW moments cleared and --lr-scheduler restarted over `updates` optimizer updates (warm-up
    --warmup-ratio of them) from `lr`. done > 0 (--resume inside the stage): the optimizer state the
    checkpoint restored is kept and the schedule continues after `done` updates."""
    from transformers import get_scheduler
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)      # ZeRO wraps the torch AdamW
    if not done:
        inner.state.clear()                                               # rebuilt lazily at the next step
    for group in inner.param_groups:
        group["lr"] = group["initial_lr"] = lr
    engine.lr_scheduler = get_scheduler(args.lr_scheduler, inner, num_warmup_steps=round(args.warmup_ratio * updates),
                                        num_training_steps=max(updates, 1))  # DeepSpeed steps it at each update
    for _ in range(done):
        engine.lr_scheduler.step()


def save_final(engine, processor, out, name="final"):
    """save_pretrained to OUT/<name> (through a temp dir and a rename): the plain HF model, loadable by
    --model, ZeRO-3 weights gathered first, and the run's args.json as training_args.json (what an
    evaluation reads, e.g. the prompt it was trained with). With LoRA: the merged weights, and the
    adapters in OUT/<name>/adapter. Returns the folder."""
    module = getattr(engine, "module", engine)
    target = Path(out) / name
    tmp = target.with_name(target.name + ".tmp")
    with vlm.gathered(module):
        state = vlm.merged_state_dict(module)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            vlm.hf_model(module).save_pretrained(tmp, state_dict=state)
            processor.save_pretrained(tmp)
            if (Path(out) / "args.json").exists():
                shutil.copy(Path(out) / "args.json", tmp / "training_args.json")
            if hasattr(module, "peft_config"):
                module.save_pretrained(tmp / "adapter")
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
    barrier()
    return target


def grpo_options(args):
    """The GRPO loss options of the command line, as grpo_update takes them."""
    return dict(beta=args.beta, norm=args.loss_norm, scale_rewards=args.scale_rewards == "group")


# ============================================================================ the loop
def steps(engine, state, total, rank, desc):
    """The micro-steps a training loop still has to run (tqdm bar on rank 0), each with the lr its update
    uses noted for end_step's log; SIGTERM is caught while it runs (end_step checkpoints and exits)."""
    STOP["armed"] = True
    for step in tqdm(range(state["step"], total), desc=desc, disable=rank != 0):
        state["lr"] = current_lr(engine)
        yield step
    STOP["armed"] = False


def end_step(engine, out, state, step, total, stats, args, rank, logged=LOGGED, seconds=None, checkpoint_at_end=True):
    """After micro-step `step` (0-based) of `total`: the metrics line (with the lr of its update and the
    optimizer updates so far); three non-finite losses in a row stop the run (RuntimeError); a checkpoint every
    --save-every updates and at the end (unless the caller saves one there itself); on SIGTERM /
    SIGUSR1 (any rank) a checkpoint, then exit 143."""
    state["step"] = step + 1
    state["skipped_in_a_row"] = state.get("skipped_in_a_row", 0) + 1 if stats.get("skipped") else 0
    log(out, rank, dict(stats, step=step, updates=engine.global_steps, lr=state.pop("lr", current_lr(engine)),
                        **({"seconds": round(seconds, 2)} if seconds is not None else {})))
    if stats.get("skipped"):
        print(f"[step {step}] non-finite loss: update skipped ({state['skipped_in_a_row']} in a row)", file=sys.stderr)
    if state["skipped_in_a_row"] >= 3:
        raise RuntimeError(f"3 non-finite losses in a row at step {step}: stopping. Lower --lr, or check the "
                           "rewards and the data for NaN/inf.")
    stop = vlm.any_rank(STOP["requested"])
    if stop or (step + 1) % (args.save_every * args.grad_accum) == 0 or (checkpoint_at_end and step + 1 == total):
        save_checkpoint(out, state, engine, logged)
    if stop:
        if rank == 0:
            print(f"stopped by a signal after step {step + 1}: checkpoint saved in {Path(out) / 'ckpt'}; "
                  "continue with --resume", file=sys.stderr, flush=True)
        barrier()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(143)


def current_lr(engine):
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return inner.param_groups[0]["lr"] if inner is not None else None


# ============================================================================ checkpoints
# One resume system for the four pipelines. A checkpoint holds the loop's state (step, stage, ...), every
# rank's RNG, the DeepSpeed checkpoint of the engine (weights, optimizer) when there is one, and the
# record count of each appended log. A resumed run cuts those logs back to that many records and runs the
# steps after the checkpoint again: nothing is lost or written twice, whatever the moment of a kill -9.
def save_checkpoint(out, state, engine=None, logged=LOGGED):
    """Write a checkpoint of `state` (a JSON-able dict) into OUT/ckpt/<tag>/. It counts once every rank
    has written its part: then rank 0 writes OUT/ckpt/state.json naming it (atomically) and deletes the
    older ones, so a kill at any moment leaves the last complete checkpoint on disk."""
    ckpt, rank = Path(out) / "ckpt", _rank()
    state["saves"] = state.get("saves", 0) + 1
    tag = f"save{state['saves']}"
    (ckpt / tag).mkdir(parents=True, exist_ok=True)
    if engine is not None:
        engine.save_checkpoint(str(ckpt), tag=tag, save_latest=False,
                               exclude_frozen_parameters=hasattr(engine.module, "peft_config"))
    torch.save(_rng_state(), ckpt / tag / f"rng_rank{rank}.pt")
    barrier()                                          # every rank's files are complete
    if rank == 0:
        record = dict(state, tag=tag, records={name: len(read_jsonl(Path(out) / name)) for name in logged},
                      world_size=_world(), zero_stage=zero_stage(engine) if engine is not None else None)
        (ckpt / "state.tmp").write_text(json.dumps(record))
        os.replace(ckpt / "state.tmp", ckpt / "state.json")
        for old in ckpt.iterdir():
            if old.is_dir() and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    barrier()


def resume(out, args, engine=None, logged=LOGGED, fresh=()):
    """The state a run starts from, with OUT made to match it before anything is written.

    With --resume and a complete checkpoint (save_checkpoint): its state, the engine's weights and
    optimizer loaded, this rank's RNG restored, the `logged` files cut back to their records at the
    checkpoint. Otherwise a fresh start, {"step": 0}: the `logged` files emptied and the `fresh` paths
    (glob patterns: files written per sample id, stage folders; kept on --resume) deleted. Raises SystemExit when the checkpoint was saved
    by another number of ranks or another ZeRO stage (it cannot be loaded then)."""
    ckpt, rank, state = Path(out) / "ckpt", _rank(), None
    if args.resume and (ckpt / "state.json").exists():
        state = json.loads((ckpt / "state.json").read_text())
        _check_compatible(state, engine, ckpt)
        torn = sorted(p.name for p in ckpt.iterdir() if p.is_dir() and p.name != state["tag"])
        if torn and rank == 0:
            print(f"[resume] ignoring incomplete checkpoint(s) {', '.join(torn)}: resuming from {state['tag']} "
                  f"(step {state['step']})", file=sys.stderr)
        if engine is not None:
            engine.load_checkpoint(str(ckpt), tag=state["tag"], load_module_strict=not hasattr(engine.module, "peft_config"))
        _set_rng_state(torch.load(ckpt / state["tag"] / f"rng_rank{rank}.pt", weights_only=True))
    elif args.resume and rank == 0:
        print(f"[resume] no complete checkpoint in {ckpt}: starting from the beginning", file=sys.stderr)
    if rank == 0:
        counts = (state or {}).get("records", {})
        for name in logged:
            path = Path(out) / name
            if path.exists():
                data.write_jsonl(path, read_jsonl(path)[:counts.get(name, 0)])
        for old in [p for pattern in (fresh if state is None else ()) for p in sorted(Path(out).glob(pattern))]:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    barrier()
    return state or {"step": 0}


def _check_compatible(state, engine, ckpt):
    if state.get("world_size") not in (None, _world()):
        raise SystemExit(f"{ckpt} was saved by {state['world_size']} rank(s), this run has {_world()}: resume "
                         "with the same number of ranks (DeepSpeed checkpoints are sharded per rank)")
    stage = zero_stage(engine) if engine is not None else None
    if state.get("zero_stage") is not None and stage is not None and state["zero_stage"] != stage:
        raise SystemExit(f"{ckpt} was saved under ZeRO-{state['zero_stage']} and this run uses ZeRO-{stage}: resume "
                         f"with --deepspeed ds_zero{state['zero_stage']}.json (a checkpoint's shards cannot change "
                         "stage), or start a new run from its weights: --model with OUT/final")


def _rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _rng_state():
    """This rank's random states as tensors, lists and numbers: loadable with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s):
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ============================================================================ logs
TRACKER = {}                                       # rank 0's open tracker: {"tensorboard": writer} / {"wandb": run}


def open_tracker(args, out, rank):
    """--report-to tensorboard (torch's SummaryWriter, OUT/tensorboard/) or wandb (imported only then);
    rank 0 only. The scalars are metrics.jsonl's, logged by log()."""
    TRACKER.clear()
    if rank != 0 or args.report_to == "none":
        return
    if args.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        TRACKER["tensorboard"] = SummaryWriter(str(Path(out) / "tensorboard"))
    else:
        try:
            import wandb
        except ImportError as e:
            raise SystemExit("--report-to wandb needs wandb: pip install wandb") from e
        TRACKER["wandb"] = wandb.init(project=os.environ.get("WANDB_PROJECT", "rise-from-scratch"),
                                      name=Path(out).name, dir=str(out), config=vars(args))


def log(out, rank, record):
    """One step's metrics: a line of OUT/metrics.jsonl (rank 0, flushed at once) and the tracker's scalars."""
    if rank != 0:
        return
    append_jsonl(Path(out) / "metrics.jsonl", record)
    scalars = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
    if "tensorboard" in TRACKER:
        for key, value in scalars.items():
            TRACKER["tensorboard"].add_scalar(key, value, record.get("step", 0))
        TRACKER["tensorboard"].flush()
    if "wandb" in TRACKER:
        TRACKER["wandb"].log(scalars, step=record.get("step", 0))


def log_completions(out, rank, step, rows, every=10):
    """Sampled completions of micro-step `step` with their rewards (rows: dicts, from every rank): one
    line each in OUT/completions.jsonl (rank 0), and every `every` steps a table in the tracker (TRL's
    log_completions)."""
    rows = gather_records(rows)
    if rank != 0:
        return
    for row in rows:
        append_jsonl(Path(out) / "completions.jsonl", dict(step=step, **row))
    if rows and every and step % every == 0:
        keys = list(rows[0])
        if "tensorboard" in TRACKER:
            table = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n" + "".join(
                "| " + " | ".join(str(r.get(k, "")).replace("|", "/").replace("\n", " ") for k in keys) + " |\n"
                for r in rows)
            TRACKER["tensorboard"].add_text("completions", table, step)
        if "wandb" in TRACKER:
            import wandb
            TRACKER["wandb"].log({"completions": wandb.Table(columns=keys, data=[[r.get(k) for k in keys]
                                                                                 for r in rows])}, step=step)


def append_jsonl(path, record):
    """Append one record and flush it to disk: a kill -9 loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path):
    """All complete records of a JSONL file ([] if it does not exist); a torn last line (a kill during
    its write) is left out. Read-only: resume() and map_jsonl() rewrite what they append to."""
    path = Path(path)
    if not path.exists():
        return []
    records_ = []
    for raw in path.read_bytes().splitlines():
        try:
            records_.append(json.loads(raw))
        except json.JSONDecodeError:
            break
    return records_


def map_jsonl(items, fn, path, rank, world, chunk, desc=None):
    """fn(this rank's share of a chunk of `items`) -> records with an "id", for the items whose id is
    not in the JSONL `path` yet (--resume: those are done), `chunk` items at a time; rank 0 appends the
    records of all ranks as they come (a torn last line cut first). Returns {id: record}, on every rank."""
    done = {r["id"]: r for r in read_jsonl(path)}
    if rank == 0 and Path(path).exists():
        data.write_jsonl(path, list(done.values()))
    todo = [r for r in items if r["id"] not in done]
    for k in tqdm(range(0, len(todo), chunk), desc=desc, disable=rank != 0):
        mine = shard(todo[k:k + chunk], rank, world)        # every rank walks every chunk (all_gather)
        for rec in gather_records(fn(mine) if mine else []):
            done[rec["id"]] = rec
            if rank == 0:
                append_jsonl(path, rec)
    return done


def plot(run_dir, keys=None):
    """PNG curves of a run's metrics.jsonl (reward components, KL, completion length, loss, lr):
    python run.py plot RUN_DIR."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    numeric = list(dict.fromkeys(k for r in rows for k, v in r.items()
                                 if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)))
    keys = [k for k in keys or numeric if k in numeric and (keys or k.startswith("reward") or k in (
        "kl", "completion_len", "loss", "margin", "similarity", "lr"))]
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        ax.plot(*zip(*[(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]), lw=1)
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
