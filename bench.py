"""bench.py -- time and peak memory of one GRPO step and one DPO step, ours vs TRL.

  python bench.py --quick --json       # CPU, tiny model: well under 3 minutes
  python bench.py --vocab 151936       # the tiny model with Qwen's vocabulary: a full-size LM head
  python bench.py --real-vocab --quick # CPU: Qwen2-VL-2B's widths and vocabulary at toy depth (2 + 2 blocks)
  python bench.py --scaling --grad-ckpt --json   # ours / TRL over image tokens x G, checkpointing on (both sides)
  python bench.py --memory             # per-GPU memory of Qwen2-VL-2B / Qwen2.5-VL-3B / 7B under ZeRO-2 / 3 (estimate)
  python bench.py --full-size          # GPU: Qwen2-VL-2B architecture, random weights, bf16, 8 prompts x G 8,
                                       # 256 new tokens, ~400k-pixel images (add --deepspeed ds_zero3.json)

Each side loads its own copy of one model directory (identical weights) and gets the same prompts, images,
G, new tokens, beta, dtype, device, AdamW (constant lr, clip 1.0) and gradient checkpointing (on unless
--no-grad-ckpt, non-reentrant). One step is,
for us, one vlm.grpo_step / one dpo_step() below; for TRL, one iteration of GRPOTrainer's / DPOTrainer's
training loop (batch fetch and collation, generation and scoring, loss, backward, clip, optimizer step),
from one on_step_end to the next. Phases: gen = model.generate; logp = the log-prob forwards, policy and
reference (TRL DPO: compute_loss); update = backward + clip + optimizer step; other = the rest.
samples/s: completions (B*G per step) for GRPO, pairs for DPO. Median over --reps steps after --warmup.
Clock: wall time on GPU; on CPU the main thread's CPU time, torch on one thread (on a shared CPU wall time
mostly measures the neighbours; --wall-clock to use it anyway).
Peak memory, GPU: max_memory_allocated during the step minus memory_allocated before the side loaded its
models (weights, reference, gradients, optimizer state, activations). CPU, where tracemalloc does not see
torch: weights + optimizer state counted from the tensors, plus the step's RSS growth (VmRSS from
/proc/self/statm sampled every ms by a thread, minus RSS at the step's start, after malloc_trim);
with --deepspeed on CPU, DeepSpeed's own optimizer state is not counted. Where the peak goes: weights (policy and
reference), optimizer state, gradients (every trainable parameter's, fp32 on CPU) and the rest: activations, logits
and temporaries (printed with the size of one [N, T, V] fp32 logits tensor for scale).
"""
import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
import transformers

import dpo
import run
import tiny
import vlm

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--quick", action="store_true", help="small batch, few repetitions")
p.add_argument("--full-size", action="store_true", help="Qwen2-VL-2B architecture, random weights (GPU only)")
p.add_argument("--json", action="store_true", help="end with one JSON line of the results")
p.add_argument("--model", help="model dir to use instead of a freshly built tiny model")
p.add_argument("--vocab", type=int, help="grow the tiny model's vocabulary to this size (prompts use low ids)")
p.add_argument("--prompts", type=int, help="B: prompts per GRPO step, pairs per DPO step")
p.add_argument("--num-generations", type=int, help="G")
p.add_argument("--max-new-tokens", type=int)
p.add_argument("--warmup", type=int, default=1)
p.add_argument("--reps", type=int)
p.add_argument("--beta", type=float, default=0.04, help="GRPO KL coefficient (DPO: 0.1)")
p.add_argument("--lr", type=float, default=1e-5)
p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True,
               help="gradient checkpointing on both sides (default on; --no-grad-ckpt: off)")
p.add_argument("--real-vocab", action="store_true",
               help="Qwen2-VL-2B's widths and 151,936-entry vocabulary at toy depth (2 text layers, 2 vision blocks), "
                    "random weights: runs on a CPU")
p.add_argument("--memory", action="store_true", help="print memory_estimate()'s table (no model is run)")
p.add_argument("--gpus", type=int, default=8, help="--memory: GPUs the ZeRO states are sharded over")
p.add_argument("--deepspeed", help="ZeRO config for both sides, e.g. ds_zero3.json")
p.add_argument("--wall-clock", action="store_true", help="CPU: time with the wall clock")
p.add_argument("--skip-trl", action="store_true")
p.add_argument("--scaling", action="store_true",
               help="ours vs TRL over image tokens x G (GRPO) and image tokens (DPO), 64 new tokens: one table")
p.add_argument("--tokens", default="16,64,256,1024", help="--scaling: image tokens per prompt (square images)")
p.add_argument("--groups", default="4,8,16", help="--scaling: G values of the GRPO rows")
PRESETS = {"quick": (2, 4, 32, 112, 3), "default": (4, 8, 64, 112, 5), "full": (8, 8, 256, 630, 3)}  # B G T side reps
PROMPT = "What colour is this image?"
CUDA = torch.cuda.is_available()
WALL = CUDA


def sync():
    if CUDA:
        torch.cuda.synchronize()


def clock():
    return time.perf_counter() if WALL else time.thread_time()


# ---------------------------------------------------------------- timing and memory
class Phases(dict):
    """Seconds per phase; wrap() times chosen functions while it is open. With `mem` (a PeakMemory), also each
    phase's memory peak, as PeakMemory.phase_end() gives it, under "<phase>_peak"."""

    def __init__(self, mem=None):
        super().__init__()
        self.mem = mem

    @contextlib.contextmanager
    def wrap(self, targets):                       # [(object, attribute, phase)]
        saved = [(obj, name, obj.__dict__.get(name)) for obj, name, _ in targets]
        for obj, name, phase in targets:
            def timed(*a, _fn=getattr(obj, name), _phase=phase, **k):
                if self.mem:
                    self.mem.phase_begin()
                t0 = clock()
                try:
                    return _fn(*a, **k)
                finally:
                    sync()
                    self[_phase] = self.get(_phase, 0.0) + clock() - t0
                    if self.mem:
                        self[_phase + "_peak"] = max(self.get(_phase + "_peak", 0), self.mem.phase_end())
            setattr(obj, name, timed)
        try:
            yield
        finally:
            for obj, name, old in saved:           # restore, or drop the instance attribute we added
                setattr(obj, name, old) if old is not None else delattr(obj, name)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of one side's step (method: see the module docstring), and of phases within it."""
    base = peak = start = window = step_max = 0
    running = None

    def set_base(self):                            # before a side loads its models
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated()

    def step_start(self):
        if CUDA:
            self.step_max = 0
            return torch.cuda.reset_peak_memory_stats()
        self.stop()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)   # RSS growth then means new memory, not reuse
        self.peak = self.start = rss_bytes()
        self.running = threading.Event()
        threading.Thread(target=self._sample, args=(self.running,), daemon=True).start()

    def _sample(self, running):
        while not running.is_set():
            rss = rss_bytes()
            self.peak, self.window = max(self.peak, rss), max(self.window, rss)
            time.sleep(0.001)

    def phase_begin(self):
        """Open a window inside the step (GPU: the allocator's peak is kept for the step, then reset)."""
        if CUDA:
            self.step_max = max(self.step_max, torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        else:
            self.window = rss_bytes()

    def phase_end(self):
        """The window's peak, raw: GPU bytes allocated, CPU RSS growth since the step's start (step_peak_mb
        turns it into MB comparable with the step's peak)."""
        return torch.cuda.max_memory_allocated() if CUDA else max(self.window, rss_bytes()) - self.start

    def stop(self):
        if self.running:
            self.running.set()

    def step_peak_mb(self, models, optimizers, phase_peaks=None):
        """The step's peak and what of it is held between steps: {"peak_mb", "weights_mb", "optimizer_mb",
        "grads_mb" (the size of the gradients of models[0], the policy, allocated now or not)}, and
        "<phase>_peak_mb" for each raw phase_end() value in `phase_peaks` {phase: value}."""
        weights = held_mb(t for m in models if m is not None for t in m.parameters())
        state = held_mb(v for o in optimizers if o is not None for s in o.state.values() for v in s.values()
                        if torch.is_tensor(v))
        grads = sum(p.numel() * p.element_size() for p in models[0].parameters() if p.requires_grad) / 2**20
        parts = {"weights_mb": weights, "optimizer_mb": state, "grads_mb": grads}
        if CUDA:
            def mb(raw):
                return (raw - self.base) / 2**20
            peak = max(self.step_max, torch.cuda.max_memory_allocated())
        else:
            def mb(raw):
                return weights + state + raw / 2**20
            self.stop()
            self.peak = max(self.peak, rss_bytes())
            peak = self.peak - self.start
        return dict(parts, peak_mb=mb(peak), **{f"{k}_peak_mb": mb(v) for k, v in (phase_peaks or {}).items()})


def held_mb(tensors):
    """MB of the distinct storages behind `tensors` (views and shared storages counted once)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values()) / 2**20


PHASES = ("gen", "logp", "update")


def record(phases, seconds, mem, length, models, optimizers):
    gen, logp, update = (phases.get(k, 0.0) for k in PHASES)
    peaks = {k: phases.get(k + "_peak", 0) for k in PHASES}
    return {"total": seconds, "gen": gen, "logp": logp, "update": update, "other": seconds - gen - logp - update,
            "length": length, **mem.step_peak_mb(models, optimizers, peaks)}


def summary(records, samples_per_step):
    """Medians of the timings, and the memory of the step with the highest peak."""
    top = max(records, key=lambda r: r["peak_mb"])
    memory = ("peak_mb", "weights_mb", "optimizer_mb", "grads_mb", *(k + "_peak_mb" for k in PHASES))
    out = {k: statistics.median(r[k] for r in records) for k in records[0] if k not in memory}
    return dict(out, sps=samples_per_step / out["total"], **{k: top[k] for k in memory},
                rest_mb=top["peak_mb"] - top["weights_mb"] - top["optimizer_mb"] - top["grads_mb"])


# ---------------------------------------------------------------- models and data
def full_size_dir(tiny_dir, out, layers=28, depth=32):
    """Qwen2-VL-2B-Instruct's architecture (its public config values: widths, heads, the 151,936-entry
    vocabulary) with `layers` text layers and `depth` vision blocks (published: 28, 32), random weights, the tiny
    processor (prompts use its low ids); bf16 on a GPU, fp32 on a CPU."""
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    tiny = json.loads((Path(tiny_dir) / "config.json").read_text())
    text, gen = tiny["text_config"], json.loads((Path(tiny_dir) / "generation_config.json").read_text())
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=layers,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rope_theta=1e6,
                         rms_norm_eps=1e-6, tie_word_embeddings=True,
                         **{k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}),
        vision_config=dict(depth=depth, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        tie_word_embeddings=True, **{k: tiny[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                          "vision_end_token_id")})
    torch.manual_seed(0)
    with torch.device("cuda" if CUDA else "cpu"):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16 if CUDA else torch.float32)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = gen["eos_token_id"], gen["pad_token_id"]
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(tiny_dir).save_pretrained(out)
    return out


def our_trainer(setup, args, micro_batch, with_ref=True):
    """model, processor, policy (a DeepSpeed engine with --deepspeed), optimizer (None then), reference."""
    model, processor = vlm.load_model(setup["dir"], max_pixels=setup["max_pixels"])
    model.train()                                  # from_pretrained gives eval mode: no checkpointing there
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg, policy, optimizer = {}, model, torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    options = argparse.Namespace(deepspeed=args.deepspeed, grad_accum=1, lr=args.lr, weight_decay=0.0,
                                 max_pixels=setup["max_pixels"])
    if args.deepspeed:
        import deepspeed
        run.init_distributed(force=True)
        cfg = run.deepspeed_config(options, micro_batch=micro_batch)
        policy, optimizer = vlm.zero3_hooks(deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                                 config=cfg)[0]), None
    ref = run.reference_model(setup["dir"], options) if with_ref else None
    return model, processor, policy, optimizer, ref


def dpo_texts(colour, n_tokens):
    """A chosen and a rejected answer of about n_tokens tokens each."""
    wrong, reps = "blue" if colour != "blue" else "red", max(1, n_tokens // 6)
    return (f"the image is {colour}. " * reps).strip(), (f"it looks {wrong} to me. " * reps).strip()


# ---------------------------------------------------------------- ours
def dpo_step(policy, ref, optimizer, processor, convs, images, chosen, rejected, beta=0.1):
    """One DPO update on B pairs (vlm.pair_logps: chosen and rejected in one forward); returns the
    mean response length in tokens."""
    chosen, rejected = list(chosen), list(rejected)
    logps = vlm.pair_logps(policy, ref, processor, convs, images, chosen, rejected, next(ref.parameters()).device)
    loss, stats = dpo.dpo_loss(*logps, beta=beta)
    vlm.update(policy, loss, optimizer=optimizer)
    return vlm.completion_tensors(processor, chosen + rejected)[1].sum(1).float().mean().item()


def bench_ours(algo, setup, args, mem):
    mem.set_base()
    grpo_algo = algo == "grpo"
    model, processor, policy, optimizer, ref = our_trainer(setup, args, setup["B"] * (setup["G"] if grpo_algo else 1),
                                                           with_ref=not grpo_algo or args.beta != 0)
    colours = [c for _, c in setup["pairs"]]
    convs, images = [[vlm.user_turn(PROMPT)]] * len(colours), [[im] for im, _ in setup["pairs"]]
    targets = [(vlm, "sample", "gen"), (vlm, "completion_logprobs", "logp"), (vlm, "update", "update")]
    records = []
    for _ in range(args.warmup + args.reps):
        mem.step_start()
        phases, t0 = Phases(mem), clock()
        with phases.wrap(targets):
            if grpo_algo:
                length = vlm.grpo_step(policy, ref, processor, convs, images, lambda t, i: tiny.colour_reward(t, i, colours),
                                       optimizer=optimizer, group_size=setup["G"], max_new_tokens=setup["T"],
                                       beta=args.beta, norm="seq")[0]["completion_len"]
            else:
                length = dpo_step(policy, ref, optimizer, processor, convs, images, *zip(*setup["dpo"]))
        sync()
        records.append(record(phases, clock() - t0, mem, length, [model, ref], [optimizer]))
    return summary(records[args.warmup:], setup["B"] * (setup["G"] if grpo_algo else 1))


# ---------------------------------------------------------------- TRL
def bench_trl(algo, setup, args, mem):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer
    mem.set_base()
    model, processor = vlm.load_model(setup["dir"], max_pixels=setup["max_pixels"])
    common = dict(output_dir=str(setup["tmp"] / "trl"), max_steps=args.warmup + args.reps, learning_rate=args.lr,
                  optim="adamw_torch", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                  use_cpu=not CUDA, bf16=CUDA, gradient_checkpointing=args.grad_ckpt,
                  gradient_checkpointing_kwargs={"use_reentrant": False}, report_to="none", save_strategy="no",
                  logging_steps=10**6, disable_tqdm=True, seed=0, deepspeed=args.deepspeed and dict(
                      json.loads(Path(args.deepspeed).read_text()), train_micro_batch_size_per_gpu="auto",
                      gradient_accumulation_steps="auto", train_batch_size="auto"))
    records, phases = [], Phases(mem)

    class Clock(TrainerCallback):                  # one record per optimizer step: step end -> next step end
        start = opt = None

        def _open(self):
            mem.step_start()
            phases.clear()
            self.start = clock()

        def on_step_begin(self, *a, **k):
            if self.start is None:
                self._open()

        def on_pre_optimizer_step(self, *a, **k):
            sync()
            self.opt = clock()

        def on_optimizer_step(self, *a, **k):
            sync()
            phases["update"] = phases.get("update", 0.0) + clock() - self.opt

        def on_step_end(self, *a, **k):
            sync()
            lengths = trainer._metrics["train"].get("completions/mean_length")
            records.append(record(phases, clock() - self.start, mem, lengths[-1] if lengths else float("nan"),
                                  [trainer.model, trainer.ref_model], [trainer.optimizer]))
            self._open()

    if algo == "grpo":
        def reward(prompts, completions, colour, **_):    # ours, on the same decoded texts
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return tiny.colour_reward(texts, range(len(texts)), colour)
        rows = [{"prompt": [vlm.user_turn(PROMPT)], "image": im, "colour": c} for im, c in setup["pairs"]]
        cfg = GRPOConfig(**common, per_device_train_batch_size=setup["B"] * setup["G"], num_generations=setup["G"],
                         max_completion_length=setup["T"], beta=args.beta, loss_type="grpo", scale_rewards="group",
                         temperature=1.0, top_k=0, top_p=1.0)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=Dataset.from_list(rows),
                              processing_class=processor, callbacks=[Clock()])
        targets = [(model, "generate", "gen"), (trainer, "_get_per_token_logps_and_entropies", "logp")]
    else:
        rows = [{"prompt": [vlm.user_turn(PROMPT)], "chosen": [vlm.assistant_turn(w)],
                 "rejected": [vlm.assistant_turn(lose)], "image": im}
                for (im, _), (w, lose) in zip(setup["pairs"], setup["dpo"])]
        cfg = DPOConfig(**common, per_device_train_batch_size=setup["B"], beta=0.1, loss_type=["sigmoid"],
                        max_length=None, precompute_ref_log_probs=False)   # vision datasets cannot precompute
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=processor,
                             callbacks=[Clock()])
        targets = [(trainer, "compute_loss", "logp")]
    trainer.remove_callback(transformers.PrinterCallback)     # added by disable_tqdm: prints the logs
    with phases.wrap(targets + [(trainer.accelerator, "backward", "update"), (trainer, "_clip_grad_norm", "update")]):
        trainer.train()
    mem.stop()                                     # the window Clock opened after the last step
    return summary(records[args.warmup:], setup["B"] * (setup["G"] if algo == "grpo" else 1))


# ---------------------------------------------------------------- one comparison, and the scaling table
def make_setup(model_dir, tmp, B, G, T, side, max_pixels):
    """B solid-colour side x side images (prompts), G, T new tokens, and a DPO pair of ~T tokens per image."""
    pairs = [(im.resize((side, side)), c) for im, c in tiny.colour_task(random.Random(0), B)]
    vocab = transformers.AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size
    return {"dir": str(model_dir), "tmp": tmp, "B": B, "G": G, "T": T, "pairs": pairs, "side": side,
            "max_pixels": max_pixels, "dpo": [dpo_texts(c, T) for _, c in pairs], "vocab": vocab}


def compare(setup, args, mem, algos):
    """{algo: {"ours": summary(), "trl": summary()}} on one setup; a side that fails says why and is left out."""
    results = {}
    for algo in algos:
        results[algo] = {}
        for who, bench_fn in (("ours", bench_ours), ("trl", bench_trl)):
            try:
                if who == "ours" or not args.skip_trl:
                    results[algo][who] = bench_fn(algo, setup, args, mem)
            except (torch.OutOfMemoryError if who == "ours" else Exception) as e:  # say why, go on
                mem.stop()
                print(f"{who} {algo.upper()} failed: {type(e).__name__}: {e}")
    return results


def memory_breakdown(res, rows, T, vocab):
    """Where each side's peak goes, MB: weights (policy + reference), optimizer state, gradients (their size),
    the rest of the peak (activations, logits, temporaries), and each phase's peak above weights + optimizer."""
    lines = [f"where the peak goes, MB (one [{rows}, {T}, V] fp32 logits tensor: {rows * T * vocab * 4 / 2**20:.0f}; "
             "a phase's peak above weights + optimizer)",
             f"{'':6s}" + "".join(f"{h:>11s}" for h in ("weights", "optimizer", "gradients", "rest",
                                                        "gen", "logp", "update"))]
    for who, r in res.items():
        held = r["weights_mb"] + r["optimizer_mb"]
        phases = [f"{r[k + '_peak_mb'] - held:11.0f}" if r[k] > 0 else f"{'-':>11s}" for k in PHASES]
        lines.append(f"{who:6s}" + "".join(f"{r[k]:11.0f}" for k in ("weights_mb", "optimizer_mb", "grads_mb",
                                                                    "rest_mb")) + "".join(phases))
    return "\n".join(lines)


def ratios(res):
    """ours / TRL samples per second and peak memory of one comparison (None without TRL)."""
    both = "trl" in res and "ours" in res
    return {"ours_sps": round(res["ours"]["sps"], 4) if "ours" in res else None,
            "trl_sps": round(res["trl"]["sps"], 4) if "trl" in res else None,
            "ratio_vs_trl": round(res["ours"]["sps"] / res["trl"]["sps"], 3) if both else None,
            "peak_ratio_vs_trl": round(res["ours"]["peak_mb"] / res["trl"]["peak_mb"], 3) if both else None,
            "ours_phases": {k: round(res["ours"][k], 3) for k in ("gen", "logp", "update")} if "ours" in res else None,
            "trl_phases": {k: round(res["trl"][k], 3) for k in ("gen", "logp", "update")} if "trl" in res else None}


def scaling(args, model_dir, tmp, mem):
    """--scaling: ours vs TRL, same process and weights, over image tokens per prompt (square images of
    28 sqrt(n) pixels: the tiny processor merges 28x28 pixels into one token) x G for GRPO, and over image
    tokens for DPO; --prompts prompts (default 2), 64 new tokens; gradient checkpointing as --grad-ckpt says
    (on unless --no-grad-ckpt, both sides). Prints the table, and with --json one line
    {"grpo": {"<tokens>x<G>": {...}}, "dpo": {"<tokens>": {...}}}, each row with its grad_ckpt and peak MBs."""
    B, T = args.prompts or 2, args.max_new_tokens or 64
    table, processor = {"grpo": {}, "dpo": {}}, transformers.AutoProcessor.from_pretrained(model_dir)
    print(f"gradient checkpointing {'on' if args.grad_ckpt else 'off'} (both sides), {B} prompts, {T} new tokens")
    print(f"{'algo':6s}{'tokens':>8s}{'G':>4s}{'ours s/step':>13s}{'(gen/logp/update)':>22s}{'TRL s/step':>12s}"
          f"{'(gen/logp/update)':>22s}{'speed':>8s}{'peak':>7s}")
    for n in [int(v) for v in args.tokens.split(",")]:
        side = round(28 * n ** 0.5)
        processor.image_processor.max_pixels = processor.image_processor.size["longest_edge"] = side * side
        image = tiny.colour_task(random.Random(0), 1)[0][0].resize((side, side))
        probe = vlm.chat_inputs(processor, [[vlm.user_turn(PROMPT)]], [[image]])
        tokens = int((probe["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
        rows = [("grpo", G) for G in [int(v) for v in args.groups.split(",")]] + [("dpo", 1)]
        for algo, G in rows:
            res = compare(make_setup(model_dir, tmp, B, G, T, side, side * side), args, mem, (algo,))[algo]
            key = f"{n}x{G}" if algo == "grpo" else str(n)
            table[algo][key] = r = dict(ratios(res), image_tokens=tokens, image_side=side, grad_ckpt=args.grad_ckpt,
                                        **{f"{who}_peak_mb": round(res[who]["peak_mb"], 1) for who in res})
            cells = []
            for who in ("ours", "trl"):
                ph = r[f"{who}_phases"]
                cells.append(f"{res[who]['total']:13.3f}{'/'.join(f'{ph[k]:.2f}' for k in ('gen', 'logp', 'update')):>22s}"
                             if ph else f"{'-':>13s}{'':>22s}")
            speed = f"{r['ratio_vs_trl']:.2f}x" if r["ratio_vs_trl"] else "-"
            peak = f"{r['peak_ratio_vs_trl']:.2f}x" if r["peak_ratio_vs_trl"] else "-"
            print(f"{algo:6s}{n:8d}{G if algo == 'grpo' else '':>4}" + "".join(cells) + f"{speed:>8s}{peak:>7s}",
                  flush=True)
    if args.json:
        print(json.dumps(table))
    return table


# ---------------------------------------------------------------- per-GPU memory of the real models (an estimate)
GiB = 2 ** 30
# Published configs (parameters counted on them): text layers, hidden width, MLP width, K (= V) width per token,
# vocabulary; 32 vision blocks of width 1280. vision_block_bytes: the bytes one bf16 vision block saves for backward
# per patch (counted with torch.autograd.graph.saved_tensors_hooks, sdpa): Qwen2-VL's LayerNorm + QuickGELU block,
# Qwen2.5-VL's RMSNorm + SwiGLU one (the same tower in 3B and 7B).
MODELS = {
    "Qwen2-VL-2B": dict(params_billion=2.209, layers=28, hidden=1536, intermediate=8960, kv=256, vocab=151936,
                        vision_blocks=32, vision_width=1280, vision_block_bytes=58952),
    "Qwen2.5-VL-3B": dict(params_billion=3.755, layers=36, hidden=2048, intermediate=11008, kv=256, vocab=151936,
                          vision_blocks=32, vision_width=1280, vision_block_bytes=65832),
    "Qwen2.5-VL-7B": dict(params_billion=8.292, layers=28, hidden=3584, intermediate=18944, kv=512, vocab=152064,
                          vision_blocks=32, vision_width=1280, vision_block_bytes=65832),
}
# The paper preset per GPU (rise_r1 / rise_cot PAPER): 1 prompt x G 8, a 401,408-pixel image (2048 patches of
# 14 x 14, 512 tokens after the 2 x 2 merge) in a ~620-token prompt, 256 new tokens.
PAPER_STEP = dict(prompts=1, group_size=8, prompt_tokens=620, image_patches=2048, new_tokens=256)


def memory_estimate(params_billion, zero_stage, n_gpus, arch="Qwen2-VL-2B", prompts=1, group_size=8,
                    prompt_tokens=620, image_patches=2048, new_tokens=256, grad_ckpt=True, shared_prefix=True,
                    reference=True, logit_rows=None):
    """Per-GPU memory (GiB) of one GRPO micro-step under bf16 mixed precision and AdamW with DeepSpeed ZeRO.

    Model states (ZeRO, Rajbhandari et al. 2020, arXiv 1910.02054, section 3.1: 2 + 2 + 12 bytes per
    parameter): bf16 weights 2 B/param, bf16 gradients 2, optimizer 12 (fp32 master weights, first and second
    moment). ZeRO-2 shards gradients and optimizer state over the n_gpus, ZeRO-3 the weights too; the
    frozen bf16 reference (GRPO's KL, DPO) is sharded only under ZeRO-3. DeepSpeed's communication buckets and
    ZeRO-3's gathered layers come on top.

    Activations of the policy forward (`arch`: a MODELS name or a dict like its entries), in bytes saved for
    backward per token per text layer: 20 h + 6 kv + 8 I (h hidden, kv K width, I MLP width: eight h-wide and
    four I-wide bf16 tensors, three K/V-wide ones, and the fp32 copies the two RMSNorms keep; matches the saved-tensor
    count of a bf16 Qwen2 decoder layer to 0.1 %), and vision_block_bytes per patch per vision block. With
    grad_ckpt each layer keeps only its bf16 input (2 h, vision 2 x width) and one layer's activations live again
    while it is recomputed. shared_prefix: the prompt (image patches, prompt tokens) runs once for its
    group_size completions; else every row runs prompt + completion. Logits: `logit_rows` rows x new_tokens x vocab
    at 12 bytes (fp32 logits, their gradient and one temporary); None: ours (vlm.completion_logprobs: as many
    rows as fit in 256 MB of fp32 logits, at least one); a plain [N, T, V] computation has all N rows at once.

    params_billion: parameters (billions); the activation sizes come from `arch`. Returns
    {"params", "reference", "grads", "optimizer", "activations", "total"} in GiB. Raises ValueError for a
    zero_stage other than 2 or 3."""
    if zero_stage not in (2, 3):
        raise ValueError(f"zero_stage must be 2 or 3, got {zero_stage}")
    a = MODELS[arch] if isinstance(arch, str) else arch
    n, rows = params_billion * 1e9, prompts * group_size
    weights_shards = n_gpus if zero_stage == 3 else 1
    if shared_prefix:
        tokens, patches = prompts * prompt_tokens + rows * new_tokens, prompts * image_patches
    else:
        tokens, patches = rows * (prompt_tokens + new_tokens), rows * image_patches
    text_layer = 20 * a["hidden"] + 6 * a["kv"] + 8 * a["intermediate"]
    vision_block = a["vision_block_bytes"]
    if grad_ckpt:
        text = tokens * (a["layers"] * 2 * a["hidden"] + text_layer)
        vision = patches * (a["vision_blocks"] * 2 * a["vision_width"] + vision_block)
    else:
        text, vision = tokens * a["layers"] * text_layer, patches * a["vision_blocks"] * vision_block
    row_bytes = new_tokens * a["vocab"] * 4
    if logit_rows is None:
        logit_rows = rows if rows * row_bytes <= 2 ** 28 else max(1, 2 ** 28 // row_bytes)
    logits = min(logit_rows, rows) * row_bytes * 3
    out = {"params": 2 * n / weights_shards, "reference": 2 * n / weights_shards if reference else 0.0,
           "grads": 2 * n / n_gpus, "optimizer": 12 * n / n_gpus, "activations": text + vision + logits}
    out = {k: v / GiB for k, v in out.items()}
    return dict(out, total=sum(out.values()))


def memory_table(n_gpus=8, step=PAPER_STEP):
    """`bench.py --memory`: memory_estimate() of each MODELS entry under ZeRO-2 and ZeRO-3 on `n_gpus` GPUs, at
    the paper preset's step, gradient checkpointing on: ours (shared prefix, logits a row at a time) and the
    activations of the plain path (every row in full, all logits at once). Prints the table; returns its rows."""
    print(f"per-GPU memory, GiB (estimate: bench.memory_estimate): bf16 + AdamW, {n_gpus} GPUs, gradient "
          f"checkpointing on; a step of {step['prompts']} prompt x G {step['group_size']}, "
          f"{step['image_patches']}-patch image in a {step['prompt_tokens']}-token prompt, "
          f"{step['new_tokens']} new tokens")
    head = ("params", "ref.", "grads", "optim.", "activ.", "total", "plain act.")
    print(f"{'model':16s}{'ZeRO':>5s}" + "".join(f"{h:>11s}" for h in head))
    rows = []
    for name, a in MODELS.items():
        for stage in (2, 3):
            ours = memory_estimate(a["params_billion"], stage, n_gpus, arch=name, **step)
            plain = memory_estimate(a["params_billion"], stage, n_gpus, arch=name, shared_prefix=False,
                                    logit_rows=step["prompts"] * step["group_size"], **step)
            rows.append(dict(ours, model=name, zero_stage=stage, plain_activations=plain["activations"]))
            print(f"{name:16s}{stage:5d}" + "".join(f"{ours[k]:11.2f}" for k in (
                "params", "reference", "grads", "optimizer", "activations", "total")) + f"{plain['activations']:11.2f}")
    return rows


# ---------------------------------------------------------------- main: args, model, ours, TRL, table
def main(argv=None):
    global WALL
    args = p.parse_args(argv)
    if args.memory:
        return memory_table(args.gpus)
    if args.full_size and not CUDA:
        sys.exit("bench.py --full-size needs a CUDA GPU: the Qwen2-VL-2B architecture (2.2B parameters, bf16, "
                 "8 prompts x G 8 x 256 new tokens) is far too big and slow for a CPU. Here, run "
                 "`python bench.py --quick` (or --vocab 151936 for a full-size LM head on the tiny model).")
    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    WALL = CUDA or args.wall_clock
    if not CUDA:
        torch.set_num_threads(1)
    B, G, T, side, reps = PRESETS["full" if args.full_size else "quick" if args.quick else "default"]
    B, G, T, args.reps = args.prompts or B, args.num_generations or G, args.max_new_tokens or T, args.reps or reps
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp = Path(tmp)
        model_dir = args.model or tiny.build_tiny(tmp / "tiny", plan=(), pixels=None, log=lambda *_: None)
        if args.full_size and not args.model:
            model_dir = full_size_dir(model_dir, tmp / "qwen2-vl-2b-random")
        elif args.real_vocab and not args.model:
            model_dir = full_size_dir(model_dir, tmp / "qwen2-vl-2b-widths", layers=2, depth=2)
        elif args.vocab:                           # new rows for ids no prompt uses: a full-size LM head
            model, processor = vlm.load_model(model_dir)
            model.resize_token_embeddings(args.vocab, mean_resizing=False)
            model_dir = tmp / "tiny-vocab"
            model.save_pretrained(model_dir), processor.save_pretrained(model_dir)
        if not args.skip_trl and importlib.util.find_spec("trl") is None:
            print("trl is not installed (pip install trl): TRL skipped")
            args.skip_trl = True
        mem = PeakMemory()
        if args.scaling:
            return scaling(args, model_dir, tmp, mem)
        setup = make_setup(model_dir, tmp, B, G, T, side, 401408 if args.full_size else None)
        results = compare(setup, args, mem, ("grpo", "dpo"))
    print(f"\n{torch.cuda.get_device_name() if CUDA else 'cpu'}, {'bfloat16' if CUDA else 'float32'}, gradient "
          f"checkpointing {'on' if args.grad_ckpt else 'off'}, {args.deepspeed or 'no DeepSpeed'}, "
          f"{'wall' if WALL else 'CPU'} time; median of {args.reps} steps after {args.warmup} warm-up"
          + ("; Qwen2-VL-2B widths and vocabulary, 2 text layers, 2 vision blocks" if args.real_vocab else ""))
    for algo, res in results.items():
        what = f"{B} prompts x G {G}, {T} new tokens, beta {args.beta}" if algo == "grpo" else f"{B} pairs, beta 0.1"
        print(f"\n{algo.upper()} step ({what}, {side}x{side} images)\n      " + "".join(
            f"{h:>10s}" for h in ("s/step", "gen", "logp", "update", "other", "samples/s", "peak MB", "tokens")))
        for who, r in res.items():
            length = "-" if r["length"] != r["length"] else f"{r['length']:.1f}"     # nan: TRL DPO has none
            print(f"{who:6s}" + "".join(f"{r[k]:10.3f}" for k in ("total", "gen", "logp", "update", "other"))
                  + f"{r['sps']:10.2f}{r['peak_mb']:10.0f}{length:>10s}")
        if len(res) == 2:
            print(f"ours vs TRL: {res['ours']['sps'] / res['trl']['sps']:.2f}x the speed, "
                  f"{res['ours']['peak_mb'] / res['trl']['peak_mb']:.2f}x the peak memory")
        print(memory_breakdown(res, B * G if algo == "grpo" else 2 * B, T, setup["vocab"]))
    if args.json:
        def val(res, who, key, digits):
            return round(res[who][key], digits) if who in res else None
        print(json.dumps({algo: {
            "ours_sps": val(res, "ours", "sps", 4), "trl_sps": val(res, "trl", "sps", 4),
            "ratio_vs_trl": round(res["ours"]["sps"] / res["trl"]["sps"], 4) if len(res) == 2 else None,
            "ours_peak_mb": val(res, "ours", "peak_mb", 1), "trl_peak_mb": val(res, "trl", "peak_mb", 1)}
            for algo, res in results.items()}))
    return results


if __name__ == "__main__":
    main()
