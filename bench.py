"""bench.py -- time and peak memory of one GRPO step and one DPO step, ours vs TRL (SPEC 6).

  python bench.py --quick --json    # CPU, tiny model: under 3 minutes
  python bench.py                   # tiny model, bigger batch, more repetitions
  python bench.py --full-size       # GPU only: Qwen2-VL-2B architecture, random weights, bf16,
                                    # 8 prompts x G 8, 256 new tokens, ~400k-pixel images
  python bench.py --full-size --deepspeed ds_zero3.json    # the same under ZeRO-3 (one GPU)

Every trainer gets its own copy of the model loaded from one directory (identical weights), the
same prompts and images, G, max new tokens, beta, dtype, device, optimizer (AdamW, constant lr,
clip 1.0) and gradient checkpointing. What one "step" is:
  ours GRPO  one call of grpo.grpo_step: chat template + processor, one generate() for all B*G
             completions, policy and reference log-probs, rewards, loss, backward, clip, AdamW step.
  TRL GRPO   one iteration of GRPOTrainer's training loop (batch fetch, _generate_and_score_completions,
             compute_loss, backward, clip, optimizer step): from one on_step_end callback to the next.
  ours DPO   chat inputs for B pairs, one forward over chosen+rejected (2B rows), one reference forward,
             dpo.dpo_loss, update.       TRL DPO: one iteration of DPOTrainer's loop, timed the same way.
Phases: gen = model.generate; logp = the log-prob forward passes (policy and reference); update =
backward + clip + optimizer step; other = the rest (templates, image processing, rewards, bookkeeping).
samples/s: completions per second (B*G per step) for GRPO, pairs per second for DPO. Median over
--reps steps after --warmup steps.
Peak memory: what one side holds (weights, reference model, gradients, optimizer state) plus the
step's activations, i.e. the peak during a step minus the memory in use before that side loaded its
models. GPU: torch.cuda.max_memory_allocated. CPU: the process RSS (/proc/self/statm, sampled every
millisecond by a thread; tracemalloc does not see torch's allocations), with freed memory returned to
the OS (malloc_trim) before each side starts: approximate to a few MB.
"""
import argparse
import contextlib
import ctypes
import gc
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

import dpo
import grpo
import vlm

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--quick", action="store_true", help="small batch, few repetitions (CPU: < 3 min)")
p.add_argument("--full-size", action="store_true", help="Qwen2-VL-2B architecture, random weights (GPU only)")
p.add_argument("--json", action="store_true", help="end with one JSON line of the results")
p.add_argument("--model", default=None, help="model dir to use instead of a freshly built tiny model")
p.add_argument("--prompts", type=int, default=None, help="B, prompts per step (and DPO pairs per step)")
p.add_argument("--num-generations", type=int, default=None, help="G")
p.add_argument("--max-new-tokens", type=int, default=None)
p.add_argument("--vocab", type=int, default=None, help="grow the tiny model's vocabulary (e.g. 151936, "
               "Qwen's): the LM head then weighs as at full size; prompts keep using the low ids")
p.add_argument("--image-side", type=int, default=None, help="square images of this side (px)")
p.add_argument("--warmup", type=int, default=1)
p.add_argument("--reps", type=int, default=None)
p.add_argument("--beta", type=float, default=0.04, help="GRPO KL coefficient (DPO uses 0.1)")
p.add_argument("--lr", type=float, default=1e-5)
p.add_argument("--no-grad-ckpt", action="store_true", help="gradient checkpointing off for both")
p.add_argument("--deepspeed", default=None, help="ZeRO config for both trainers (e.g. ds_zero3.json)")
p.add_argument("--wall-clock", action="store_true", help="CPU: time wall clock, not this thread's CPU time")
p.add_argument("--threads", type=int, default=1, help="CPU: torch threads (default 1, see clock())")
p.add_argument("--skip-trl", action="store_true")
p.add_argument("--only", choices=["grpo", "dpo"], default=None)
PRESETS = {"quick": (2, 4, 32, 112, 3), "default": (4, 8, 64, 112, 5), "full": (8, 8, 256, 630, 3)}
PROMPT = "What colour is this image?"
CUDA = torch.cuda.is_available()
WALL_CLOCK = False


def sync():
    if CUDA:
        torch.cuda.synchronize()


def clock():
    """GPU: wall time. CPU: CPU time of this thread (torch runs on one thread): on a shared machine
    wall time would mostly measure the neighbours (set by --wall-clock)."""
    return time.perf_counter() if CUDA or WALL_CLOCK else time.thread_time()


# ---------------------------------------------------------------- timing and memory
class Phases:
    """Adds the wall time of chosen functions to named phases; wrap() patches them in and out."""

    def __init__(self):
        self.t = {}

    def add(self, phase, seconds):
        self.t[phase] = self.t.get(phase, 0.0) + seconds

    @contextlib.contextmanager
    def wrap(self, targets):                       # targets: [(object, attribute name, phase)]
        saved = [(obj, name, obj.__dict__.get(name)) for obj, name, _ in targets]
        for obj, name, phase in targets:
            def timed(*a, _fn=getattr(obj, name), _phase=phase, **k):
                t0 = clock()
                try:
                    return _fn(*a, **k)
                finally:
                    sync()
                    self.add(_phase, clock() - t0)
            setattr(obj, name, timed)
        try:
            yield self
        finally:
            for obj, name, old in saved:           # put back the original (or drop the instance override)
                setattr(obj, name, old) if old is not None else delattr(obj, name)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def held_bytes(models, optimizers):
    """Bytes of the weights and optimizer state a side keeps between steps (each storage once)."""
    tensors = [t for m in models if m is not None for t in m.parameters()]
    tensors += [v for o in optimizers if o is not None for s in o.state.values() for v in s.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class PeakMemory:
    """GPU: max_memory_allocated during the step minus memory_allocated before the side loaded its models.
    CPU: weights + optimizer state (counted from the tensors) + the step's RSS growth (peak RSS, sampled
    every ms by a thread, minus RSS at the step's start, with freed heap handed back first)."""

    def __init__(self):
        self.base = self.peak = self.start = 0
        if not CUDA:
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while True:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def set_base(self):                            # before a side loads its models
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated()

    def step_start(self):
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)   # so RSS growth means new memory, not reuse
        self.peak = self.start = rss_bytes()

    def step_peak_mb(self, models, optimizers):
        if CUDA:
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (held_bytes(models, optimizers) + self.peak - self.start) / 2**20


def summary(records, samples_per_step):
    """Median seconds of each phase over the measured steps; max peak memory."""
    for r in records:
        r["other"] = r["total"] - r["gen"] - r["logp"] - r["update"]
    out = {k: statistics.median(r[k] for r in records) for k in ("total", "gen", "logp", "update", "other", "length")}
    out.update(sps=samples_per_step / out["total"], peak_mb=max(r["peak_mb"] for r in records))
    return out


def record(phases, total, mem, length, models, optimizers):
    return {"total": total, "peak_mb": mem.step_peak_mb(models, optimizers), "length": length,
            **{k: phases.t.get(k, 0.0) for k in ("gen", "logp", "update")}}


# ---------------------------------------------------------------- models, prompts, pairs
def full_size_dir(tiny_dir, out):
    """The Qwen2-VL-2B-Instruct architecture (values of its public config.json) with random weights,
    saved with the tiny model's processor: prompts only use its low token ids (vocab stays 151,936)."""
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    tiny = json.loads((Path(tiny_dir) / "config.json").read_text())
    text = tiny["text_config"]
    ids = {k: tiny[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rope_theta=1e6,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=text["bos_token_id"],
                         eos_token_id=text["eos_token_id"], pad_token_id=text["pad_token_id"]),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        tie_word_embeddings=True, **ids)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    gen = json.loads((Path(tiny_dir) / "generation_config.json").read_text())
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = gen["eos_token_id"], gen["pad_token_id"]
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(tiny_dir).save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def load(setup):
    model, processor = vlm.load_model(setup["dir"], max_pixels=setup["max_pixels"])
    model.train()
    return model, processor


def reference(setup):
    ref, _ = vlm.load_model(setup["dir"], max_pixels=setup["max_pixels"])
    return ref.eval().requires_grad_(False)


def policy_and_optimizer(model, args, micro_batch):
    """(policy, optimizer): a DeepSpeed engine and None with --deepspeed, else the model and AdamW."""
    if not args.no_grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.deepspeed:
        vlm.init_distributed(force=True)
        cfg = vlm.deepspeed_config(args.deepspeed, lr=args.lr, weight_decay=0.0, micro_batch=micro_batch)
        return vlm.deepspeed_engine(model, cfg), None
    return model, torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)


def dpo_texts(colour, n_tokens):
    """A chosen and a rejected answer of about n_tokens tokens each."""
    wrong = "blue" if colour != "blue" else "red"
    reps = max(1, n_tokens // 6)
    return (f"the image is {colour}. " * reps).strip(), (f"it looks {wrong} to me. " * reps).strip()


def trl_args(config_cls, args, setup, steps, **kw):
    return config_cls(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), max_steps=steps, learning_rate=args.lr,
                      optim="adamw_torch", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                      use_cpu=not CUDA, bf16=CUDA, gradient_checkpointing=not args.no_grad_ckpt,
                      gradient_checkpointing_kwargs={"use_reentrant": False}, report_to="none", save_strategy="no",
                      logging_steps=10**6, disable_tqdm=True, seed=0, deepspeed=args.deepspeed, **kw)


def trl_clock(phases, mem, records, length_key=None):
    """A TrainerCallback that records one entry per optimizer step (previous step end -> this step end)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        start = opt = trainer = None

        def _open(self):
            self.start = clock()
            phases.t.clear()
            mem.step_start()

        def on_step_begin(self, *a, **k):
            if self.start is None:
                self._open()

        def on_pre_optimizer_step(self, *a, **k):
            sync()
            self.opt = clock()

        def on_optimizer_step(self, *a, **k):
            sync()
            phases.add("update", clock() - self.opt)

        def on_step_end(self, *a, **k):
            sync()
            metrics = self.trainer._metrics["train"] if length_key else {}
            length = metrics[length_key][-1] if metrics.get(length_key) else float("nan")
            t = self.trainer
            records.append(record(phases, clock() - self.start, mem, length, [t.model, t.ref_model], [t.optimizer]))
            self._open()
    return Clock()


# ---------------------------------------------------------------- the four benchmarks
def bench_grpo_ours(setup, args, mem):
    mem.set_base()
    model, processor = load(setup)
    ref = reference(setup) if args.beta else None
    policy, optimizer = policy_and_optimizer(model, args, setup["B"] * setup["G"])
    colours = [c for _, c in setup["pairs"]]
    convs, images = [[vlm.user_turn(PROMPT)]] * len(colours), [[im] for im, _ in setup["pairs"]]
    phases, records = Phases(), []
    for _ in range(args.warmup + args.reps):
        mem.step_start()
        phases.t.clear()
        t0 = clock()
        with phases.wrap([(vlm, "sample", "gen"), (vlm, "completion_logprobs", "logp"), (grpo, "apply_update", "update")]):
            stats, _, _ = grpo.grpo_step(policy, processor, convs, images, lambda t, i: grpo.colour_reward(t, i, colours),
                                         optimizer=optimizer, ref_model=ref, group_size=setup["G"],
                                         max_new_tokens=setup["T"], beta=args.beta, norm="seq")
        sync()
        records.append(record(phases, clock() - t0, mem, stats["completion_len"], [model, ref], [optimizer]))
    return summary(records[args.warmup:], setup["B"] * setup["G"])


def dpo_step(policy, ref, optimizer, processor, convs, images, chosen, rejected, beta=0.1):
    """One DPO update on B pairs: chosen and rejected of a pair share one prompt, both in one forward."""
    batch = vlm.chat_inputs(processor, convs, images)
    prompt = vlm.repeat_batch(batch, 2, processor.tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    # a completion is what the chat template adds after the prompt: text + <|im_end|> + newline
    prompts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    texts = [processor.apply_chat_template(c + [vlm.assistant_turn(t)], tokenize=False)[len(pr):]
             for c, pr, pair in zip(convs, prompts, zip(chosen, rejected)) for t in pair]
    comp = processor.tokenizer(texts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
    device = next(ref.parameters()).device
    prompt = {k: v.to(device) for k, v in prompt.items()}
    ids, mask = comp["input_ids"].to(device), comp["attention_mask"].to(device)
    logp = dpo.sequence_logp(vlm.completion_logprobs(policy, prompt, ids, mask), mask)       # [2B]: w, l, w, l ..
    with torch.no_grad():
        ref_logp = dpo.sequence_logp(vlm.completion_logprobs(ref, prompt, ids, mask), mask)
    loss, stats = dpo.dpo_loss(logp[0::2], logp[1::2], ref_logp[0::2], ref_logp[1::2], beta=beta)
    grpo.apply_update(policy, optimizer, loss)
    return stats, mask.sum(1).float().mean().item()


def bench_dpo_ours(setup, args, mem):
    mem.set_base()
    model, processor = load(setup)
    ref = reference(setup)
    policy, optimizer = policy_and_optimizer(model, args, setup["B"])
    convs, images = [[vlm.user_turn(PROMPT)]] * setup["B"], [[im] for im, _ in setup["pairs"]]
    phases, records = Phases(), []
    for _ in range(args.warmup + args.reps):
        mem.step_start()
        phases.t.clear()
        t0 = clock()
        with phases.wrap([(vlm, "completion_logprobs", "logp"), (grpo, "apply_update", "update")]):
            _, length = dpo_step(policy, ref, optimizer, processor, convs, images, *zip(*setup["dpo"]))
        sync()
        records.append(record(phases, clock() - t0, mem, length, [model, ref], [optimizer]))
    return summary(records[args.warmup:], setup["B"])


def bench_grpo_trl(setup, args, mem):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    mem.set_base()
    model, processor = load(setup)
    rows = [{"prompt": [vlm.user_turn(PROMPT)], "image": im, "colour": c} for im, c in setup["pairs"]]

    def reward(prompts, completions, colour, **_):   # the same reward as ours, on the same texts
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return grpo.colour_reward(texts, range(len(texts)), colour)
    cfg = trl_args(GRPOConfig, args, setup, args.warmup + args.reps, per_device_train_batch_size=setup["B"] * setup["G"],
                   num_generations=setup["G"], max_completion_length=setup["T"], beta=args.beta, loss_type="grpo",
                   scale_rewards="group", temperature=1.0, top_k=0, top_p=1.0)
    phases, records = Phases(), []
    timer = trl_clock(phases, mem, records, "completions/mean_length")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=Dataset.from_list(rows),
                          processing_class=processor, callbacks=[timer])
    timer.trainer = trainer
    with phases.wrap([(model, "generate", "gen"), (trainer, "_get_per_token_logps_and_entropies", "logp"),
                      (trainer.accelerator, "backward", "update"), (trainer, "_clip_grad_norm", "update")]):
        trainer.train()
    return summary(records[args.warmup:], setup["B"] * setup["G"])


def bench_dpo_trl(setup, args, mem):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    mem.set_base()
    model, processor = load(setup)
    rows = [{"prompt": [vlm.user_turn(PROMPT)], "chosen": [vlm.assistant_turn(w)], "rejected": [vlm.assistant_turn(l)],
             "image": im} for (im, _), (w, l) in zip(setup["pairs"], setup["dpo"])]
    cfg = trl_args(DPOConfig, args, setup, args.warmup + args.reps, per_device_train_batch_size=setup["B"], beta=0.1,
                   loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=False)
    phases, records = Phases(), []
    timer = trl_clock(phases, mem, records)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=processor,
                         callbacks=[timer])
    timer.trainer = trainer
    with phases.wrap([(trainer, "compute_loss", "logp"), (trainer.accelerator, "backward", "update"),
                      (trainer, "_clip_grad_norm", "update")]):
        trainer.train()
    return summary(records[args.warmup:], setup["B"])


# ---------------------------------------------------------------- main: args, model, ours, TRL, table
def main(argv=None):
    args = p.parse_args(argv)
    if args.full_size and not CUDA:
        sys.exit("bench.py --full-size needs a CUDA GPU: the Qwen2-VL-2B architecture (2.2B parameters, bf16, "
                 "8 prompts x G 8 x 256 new tokens) is far too slow and too big for a CPU. "
                 "Run `python bench.py --quick` here, or --full-size on a GPU machine.")
    B, G, T, side, reps = PRESETS["full" if args.full_size else "quick" if args.quick else "default"]
    B, G, T = args.prompts or B, args.num_generations or G, args.max_new_tokens or T
    side, args.reps = args.image_side or side, args.reps or reps
    warnings.filterwarnings("ignore")
    global WALL_CLOCK
    WALL_CLOCK = args.wall_clock
    if not CUDA:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    model_dir = args.model or vlm.build_tiny(tmp / "tiny", seed=0, pretrain=False, log=lambda *_: None)
    if args.full_size and not args.model:
        model_dir = full_size_dir(model_dir, tmp / "qwen2-vl-2b-random")
    elif args.vocab:
        model, processor = vlm.load_model(model_dir)
        model.resize_token_embeddings(args.vocab, mean_resizing=False)
        model_dir = tmp / f"tiny-vocab{args.vocab}"
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
        del model
    pairs = grpo.colour_task(random.Random(0), B)
    pairs = [(im.resize((side, side)), c) for im, c in pairs]
    setup = {"dir": str(model_dir), "B": B, "G": G, "T": T, "pairs": pairs, "max_pixels": side * side if
             args.full_size else None, "dpo": [dpo_texts(c, T) for _, c in pairs]}
    trl_ok = not args.skip_trl
    if trl_ok:
        try:
            import trl  # noqa: F401
        except ImportError:
            trl_ok = False
            print("trl is not installed: TRL columns skipped (pip install trl)")
    mem, results = PeakMemory(), {}
    for algo in ("grpo", "dpo"):
        if args.only and algo != args.only:
            continue
        ours_fn, trl_fn = (bench_grpo_ours, bench_grpo_trl) if algo == "grpo" else (bench_dpo_ours, bench_dpo_trl)
        results[algo] = {"ours": ours_fn(setup, args, mem)}
        gc.collect()
        if trl_ok:
            try:
                results[algo]["trl"] = trl_fn(setup, args, mem)
            except Exception as e:                    # say exactly why, still report ours
                print(f"TRL {algo.upper()} failed: {type(e).__name__}: {e}")
            gc.collect()
    device = torch.cuda.get_device_name() if CUDA else "cpu"
    dtype = "bfloat16" if CUDA else "float32"
    print(f"\n{device}, {dtype}, gradient checkpointing {'off' if args.no_grad_ckpt else 'on'}, "
          f"{'DeepSpeed ' + args.deepspeed if args.deepspeed else 'no DeepSpeed'}; "
          f"median of {args.reps} steps after {args.warmup} warm-up")
    for algo, res in results.items():
        unit = "completions" if algo == "grpo" else "pairs"
        what = f"B={B} prompts x G={G}, {T} new tokens, beta {args.beta}" if algo == "grpo" else f"B={B} pairs, beta 0.1"
        print(f"\n{algo.upper()} step ({what}, {side}x{side} images)")
        print(f"{'':6s}{'s/step':>8s}{'gen':>8s}{'logp':>8s}{'update':>8s}{'other':>8s}{unit + '/s':>15s}"
              f"{'peak MB':>9s}{'tokens':>8s}")
        for who, r in res.items():
            print(f"{who:6s}{r['total']:8.3f}{r['gen']:8.3f}{r['logp']:8.3f}{r['update']:8.3f}{r['other']:8.3f}"
                  f"{r['sps']:15.2f}{r['peak_mb']:9.0f}{r['length']:8.1f}")
        if "trl" in res:
            print(f"ours / TRL speed: {res['ours']['sps'] / res['trl']['sps']:.2f}x, "
                  f"peak memory: {res['ours']['peak_mb'] / max(res['trl']['peak_mb'], 1e-9):.2f}x")
    if args.json:
        out = {}
        for algo, res in results.items():
            ours, theirs = res["ours"], res.get("trl")
            out[algo] = {"ours_sps": round(ours["sps"], 4), "trl_sps": theirs and round(theirs["sps"], 4),
                         "ratio_vs_trl": theirs and round(ours["sps"] / theirs["sps"], 4),
                         "ours_peak_mb": round(ours["peak_mb"], 1), "trl_peak_mb": theirs and round(theirs["peak_mb"], 1)}
        print(json.dumps(out))
    return results


if __name__ == "__main__":
    main()
