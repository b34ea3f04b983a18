"""rise_cot.py -- RISE stage 1, "Reason" (RISE-CoT): closed-loop CoT generation trained with GRPO.

Paper: "RISE: Enhancing VLM Image Annotation with Self-Supervised Reasoning" (arXiv 2508.13229),
sections "RISE-CoT: Closed-Loop Reasoning Generation" (reward eq. 1) and "RISE-CoT Training" (eq. 7).

For every training sample (image I, annotation a):
  1. reasoning generation     the policy sees I and a and writes G chains of thought c_1..c_G
                               that justify a without stating it (no probabilities, no coordinates,
                               optionally no class names)                -> data.prompt("cot")
  2. annotation reconstruction the same policy sees only I and c_i and rebuilds a_hat_i
                                                                         -> data.prompt("rec")
  3. consistency reward        R_CoT = 1[no leak(c)] * 1[format ok(c, a_hat)] * Sim(a_hat, a)
                               (--reward sim: Sim alone, the paper's Table 5) -> rewards.rise_cot_reward
  4. GRPO on the trajectory (c_i, a_hat_i): the loss covers the CoT and reconstruction tokens
     (--train-on cot|rec|both; the authors' released code trains on the reconstruction only)
                                                                          -> grpo.grpo_update
  5. cots.jsonl: per training sample the best CoT seen, from a final harvest pass with the
     trained policy and the best seen during training (the paper's D_CoT).

    deepspeed rise_cot.py                                   # tiny base + shapes world, CPU, ~10 min
    deepspeed --num_gpus 8 rise_cot.py --model Qwen/Qwen2-VL-2B-Instruct --data emotion6/train.jsonl \\
        --deepspeed ds_zero3.json                           # the paper's setting (defaults below)
"""
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import grpo
import rewards
import run
import vlm

# Paper defaults (Qwen2-VL-2B, 8 GPUs) and the tiny-base defaults (one CPU, ~10 minutes).
PAPER = dict(lr=2e-6, max_steps=200, num_generations=8, batch_size=1, grad_accum=2, max_pixels=401408,
             max_new_tokens=256, rec_max_new_tokens=128)
# Tiny CoTs are cut at 16 tokens (~12 words): the tiny base writes its think-first answers after one
# short sentence, and after a 56-token description it cannot (answer-token loss 4.8 nats/token vs 1.0 after
# 8 words), so RISE-R1's SFT on long D_high CoTs broke the JSON answer (22-32 of 32 unparsable; README).
TINY = dict(lr=2e-4, max_steps=40, num_generations=6, batch_size=2, grad_accum=1, max_pixels=None,
            max_new_tokens=16, rec_max_new_tokens=40, save_every=10)


LOGGED = ("metrics.jsonl", "seen.jsonl")     # appended per step: cut back to the checkpoint on --resume


def parse_args(argv=None):
    p = run.common_args("rise_cot", __doc__.split("\n")[0])
    p.add_argument("--train-on", default="both", choices=["cot", "rec", "both"],
                   help="which tokens of the trajectory get the GRPO loss")
    p.add_argument("--rec-temperature", type=float, default=0.7, help="0 = greedy reconstruction")
    p.add_argument("--rec-max-new-tokens", type=int, default=None)
    p.add_argument("--no-mask-class-names", dest="mask_class_names", action="store_false",
                   help="allow class names in classification CoTs (masked by default)")
    p.add_argument("--harvest-generations", type=int, default=None, help="G of the harvest pass (default G)")
    p.add_argument("--harvest-batch-size", type=int, default=8, help="samples per rank per harvest batch")
    p.add_argument("--reward", default="sim,leak,format",
                   help="factors of R_CoT: sim (always) and the indicators leak, format (paper Table 5 drops them)")
    args = run.parse_with_preset(p, argv, PAPER, TINY)
    args.reward_terms = [t.strip() for t in args.reward.split(",") if t.strip()]
    if "sim" not in args.reward_terms or set(args.reward_terms) - {"sim", "leak", "format"}:
        p.error(f"--reward: sim plus any of leak, format (comma-separated); got {args.reward!r}")
    args.save_every = args.save_every or 50
    return args


# ---------------------------------------------------------------------------- prompts and rewards
def ground_truth(record, image, model_type, processor):
    """The annotation a in the frame the model writes: {class: prob}, or boxes in the model frame."""
    if "probs" in record:
        return dict(zip(record["classes"], record["probs"]))
    return [vlm.to_model_frame(b, model_type, image.size, processor) for b in record["boxes"]]


def closed_loop(model, processor, records, images, gts, args, group_size):
    """Steps 1-3 for a batch: G CoTs per sample, one reconstruction per CoT, their rewards.

    Returns (cot_rollout, rec_rollout, reward dicts). Both rollouts come from one batched
    generate() call each; rollout rows are prompt-major (sample i owns rows i*G .. i*G+G-1).
    """
    frames = [vlm.box_frame(model.config.model_type, im.size, processor) for im in images]
    cot_batch = vlm.chat_inputs(processor, [[vlm.user_turn(data.prompt("cot", r, boxes=g, frame=f,
                                                                       mask_names=args.mask_class_names))]
                                            for r, g, f in zip(records, gts, frames)], [[im] for im in images],
                                max_prompt_len=args.max_prompt_len)
    with vlm.generation_mode(model):
        cots = vlm.sample(model, processor, cot_batch, group_size, args.max_new_tokens, args.temperature)
        prompt_index = [i // group_size for i in range(len(cots["texts"]))]
        # no length check here: the prompt without its CoT passed it (sample_problem) and the CoT is
        # at most max_new_tokens long, so one long CoT never aborts the run
        rec_batch = vlm.chat_inputs(processor, [[vlm.user_turn(data.prompt("rec", records[i], cot=c, frame=frames[i]))]
                                                for i, c in zip(prompt_index, cots["texts"])],
                                    [[images[i]] for i in prompt_index])
        greedy = args.rec_temperature == 0
        recs = vlm.sample(model, processor, rec_batch, 1, args.rec_max_new_tokens,
                          args.rec_temperature or 1.0, do_sample=not greedy)
    schema = lambda r: "cls" if "probs" in r else "det"  # noqa: E731
    scored = [rewards.rise_cot_reward(c, a, gts[i], schema(records[i]), forbid_class_names=args.mask_class_names,
                                      terms=args.reward_terms)
              for i, c, a in zip(prompt_index, cots["texts"], recs["texts"])]
    return cots, recs, scored


def sample_problem(record, model, processor, args):
    """Why a record's CoT or reconstruction prompt (without its CoT) cannot be processed (over
    --max-prompt-len, an image the processor refuses or that cannot be opened), or None."""
    image = data.open_image(record["image_path"])
    frame = vlm.box_frame(model.config.model_type, image.size, processor)
    gt = ground_truth(record, image, model.config.model_type, processor)
    cot = [vlm.user_turn(data.prompt("cot", record, boxes=gt, frame=frame, mask_names=args.mask_class_names))]
    rec = [vlm.user_turn(data.prompt("rec", record, cot="", frame=frame))]
    return (vlm.prompt_problem(processor, cot, [image], args.max_prompt_len)
            or vlm.prompt_problem(processor, rec, [image], args.max_prompt_len))


def best_per_sample(records, cots, recs, scored, group_size, source):
    """The highest-reward (CoT, reconstruction) of each sample's group."""
    best = []
    for i, rec in enumerate(records):
        rows = range(i * group_size, (i + 1) * group_size)
        j = max(rows, key=lambda k: scored[k]["reward"])
        best.append({"id": rec["id"], "cot": cots["texts"][j], "reconstruction": recs["texts"][j],
                     "reward": scored[j]["reward"], "leak": scored[j]["leak"], "format": scored[j]["format"],
                     "source": source})
    return best


def constant_answer_similarity(records):
    """Mean Sim of the best input-blind answer: the mean training distribution (classification) or
    the mean box (single-box detection, pixels). A policy that looks must beat it."""
    if "probs" in records[0]:
        mean = np.mean([r["probs"] for r in records], axis=0)
        return float(np.mean([rewards.cls_similarity(dict(zip(r["classes"], mean)), dict(zip(r["classes"], r["probs"])))
                              for r in records]))
    mean_box = np.mean([b for r in records for b in r["boxes"]], axis=0).tolist()
    return float(np.mean([rewards.det_similarity([mean_box], r["boxes"]) for r in records]))


def main(argv=None):
    args = parse_args(argv)
    rank, world, out = run.start(args)

    # ---- data
    manifest = run.manifest_path(args.data, "train", args.seed, "soft_cls")
    schema = data.manifest_task(manifest, allowed=("cls", "det"))
    records, skipped = data.read_manifest(manifest, schema, skip_bad=args.skip_bad)
    if rank == 0:
        print(f"[rise_cot] {len(records)} training samples from {manifest} ({skipped} skipped), "
              f"{world} rank(s), lr {args.lr}, G {args.num_generations}, {args.max_steps} steps")

    # ---- models
    engine, processor, ref, cfg = run.training_models(args)
    model = engine.module
    model_type = model.config.model_type
    # a sample whose prompt cannot be processed is skipped (OUT/skipped.jsonl), never fatal
    records, _ = run.usable(records, lambda r: sample_problem(r, model, processor, args), rank, world, out)
    # --resume: metrics.jsonl and seen.jsonl cut back to the checkpoint (run.prepare_out), cots.jsonl by id
    ckpt = run.load_checkpoint(engine, out) if args.resume else None
    run.prepare_out(out, rank, ckpt, LOGGED, fresh=("cots.jsonl",))
    state = ckpt or {"step": 0}
    best = {}
    for rec in run.read_jsonl(out / "seen.jsonl"):
        if rec["reward"] > best.get(rec["id"], {"reward": -1})["reward"]:
            best[rec["id"]] = rec

    # ---- GRPO loop
    G, guard = args.num_generations, run.NonFiniteGuard()
    order = run.data_order(len(records), args.seed)
    micro_steps = args.max_steps * args.grad_accum       # --max-steps counts optimizer updates (as TRL/HF)
    bar = tqdm(range(state["step"], micro_steps), desc="rise_cot", disable=rank != 0)
    for step in bar:                                      # step: the micro-step (data position, checkpoints)
        t0 = time.time()
        batch = run.step_items(records, order, step, args.batch_size, rank, world)
        images = [data.open_image(r["image_path"]) for r in batch]
        gts = [ground_truth(r, im, model_type, processor) for r, im in zip(batch, images)]
        cots, recs, scored = closed_loop(engine.module, processor, batch, images, gts, args, G)
        reward = torch.tensor([s["reward"] for s in scored])
        segments = []
        if args.train_on in ("cot", "both"):
            segments.append(dict(cots, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                 group_size=G))                  # G CoTs of one prompt: it runs once
        # the reconstruction prompts hold each CoT: all different, no prefix to share
        if args.train_on in ("rec", "both"):
            segments.append(dict(recs, temperature=args.rec_temperature or 1.0,
                                 max_new_tokens=args.rec_max_new_tokens))
        stats = grpo.grpo_update(engine, segments, reward, G, ref_model=ref, beta=args.beta,
                                 norm=args.loss_norm, scale_rewards=args.scale_rewards == "group",
                                 suppress=vlm.suppressed_ids(processor),
                                 window=grpo.accumulation(step, micro_steps, args.grad_accum))
        guard.check(stats["skipped"], step)
        # best (CoT, reconstruction) seen so far per sample, kept on disk for --resume
        for rec in run.gather_records(best_per_sample(batch, cots, recs, scored, G, "training")):
            if rec["reward"] > best.get(rec["id"], {"reward": -1})["reward"]:
                best[rec["id"]] = rec
                if rank == 0:
                    run.append_jsonl(out / "seen.jsonl", rec)
        stats.update(grpo.reward_stats(reward, G), step=step, updates=engine.global_steps,
                     seconds=round(time.time() - t0, 2),
                     no_leak=sum(not s["leak"] for s in scored) / len(scored),
                     format_ok=sum(s["format"] for s in scored) / len(scored),
                     similarity=sum(s["similarity"] for s in scored) / len(scored))
        run.log(out, rank, stats)
        bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.4f}")
        if rank == 0:
            tqdm.write(f"[rise_cot] step {step + 1}/{micro_steps} R_CoT {stats['reward']:.3f} (similarity "
                       f"{stats['similarity']:.3f}, no leak {stats['no_leak']:.2f}, format {stats['format_ok']:.2f}) "
                       f"{stats['seconds']:.1f}s")
        if (step + 1) % (args.save_every * args.grad_accum) == 0 or step + 1 == micro_steps:
            run.save_checkpoint(engine, out, step + 1, {}, LOGGED)

    # ---- harvest: G CoTs per training sample with the trained policy; keep the best per sample
    HG = args.harvest_generations or G

    def harvest(mine):               # this rank's share of a chunk -> the best (CoT, reconstruction) per sample
        images = [data.open_image(r["image_path"]) for r in mine]
        gts = [ground_truth(r, im, model_type, processor) for r, im in zip(mine, images)]
        cots, recs, scored = closed_loop(engine.module, processor, mine, images, gts, args, HG)
        found = best_per_sample(mine, cots, recs, scored, HG, "harvest")
        return [best[r["id"]] if r["id"] in best and best[r["id"]]["reward"] > r["reward"] else r for r in found]

    # bigger chunks than training batches (no backward); cots.jsonl is appended per chunk, --resume skips its ids
    run.map_jsonl(records, harvest, out / "cots.jsonl", rank, world, args.harvest_batch_size * world, "harvest")

    # ---- save
    run.save_final(engine, processor, out)
    if rank == 0:
        cots = run.read_jsonl(out / "cots.jsonl")
        rewards_ = [c["reward"] for c in cots]
        curve = [r["reward"] for r in run.read_jsonl(out / "metrics.jsonl")]
        if curve:
            k = min(10, len(curve))
            print(f"[rise_cot] mean R_CoT over the first {k} steps {np.mean(curve[:k]):.3f}, over the last {k} "
                  f"{np.mean(curve[-k:]):.3f}; a constant answer (the training mean) would score "
                  f"{constant_answer_similarity(records):.3f}")
        print(f"[rise_cot] cots.jsonl: {len(cots)} samples, mean reward {sum(rewards_) / max(len(rewards_), 1):.3f} "
              f"-> {out / 'cots.jsonl'}")
        print(f"[rise_cot] curves -> {run.plot(out) if curve else None}; model -> {out / 'final'}")   # no steps: none


if __name__ == "__main__":
    main()
    run.exit_finished()        # the run is complete: skip the interpreter's teardown
