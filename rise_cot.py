"""rise_cot.py -- RISE stage 1, "Reason" (RISE-CoT): closed-loop chain-of-thought generation trained with GRPO.

Paper: "RISE: Enhancing VLM Image Annotation with Self-Supervised Reasoning" (arXiv 2508.13229),
sections "RISE-CoT: Closed-Loop Reasoning Generation" (reward eq. 1) and "RISE-CoT Training" (eq. 7).

For every training sample (image I, annotation a):
  1. reasoning generation     the policy sees I and a and writes G chains of thought c_1..c_G
                               that justify a without stating it (no probabilities, no coordinates)
                                                                      -> closed_loop, data.prompt("cot")
  2. annotation reconstruction the same policy sees only I and c_i and rebuilds a_hat_i
                                                                      -> closed_loop, data.prompt("rec")
  3. consistency reward        R_CoT = 1[no leak(c)] * 1[format ok(c, a_hat)] * Sim(a_hat, a)
                               (--reward sim: Sim alone, the paper's Table 5) -> rewards.rise_cot_reward
                               The leak is numbers (probabilities, coordinates), as the paper's; class
                               names in a CoT: --class-names allow (the paper), remove (the authors' code:
                               sentences naming a class are deleted before the reconstruction and from the
                               kept CoT) or forbid (a leak: the tiny demo's setting, with the shapes prompt
                               asking for no class names)
  4. GRPO on the trajectory (c_i, a_hat_i): the loss covers the CoT and reconstruction tokens
     (--train-on cot|rec|both; the authors' released code trains on the reconstruction only). The
     reconstruction is sampled with --rec-repetition-penalty (the authors' 1.2); its log-probs here are
     the policy's own, without the penalty                      -> vlm.grpo_update
  5. cots.jsonl: per training sample the best CoT seen, from a final harvest pass with the trained
     policy and the best seen during training (the paper's D_CoT, which rise_r1.py filters at tau).

    deepspeed rise_cot.py                                   # tiny base + shapes world, CPU, ~1 min
    deepspeed --num_gpus 8 rise_cot.py --model Qwen/Qwen2-VL-2B-Instruct --data emotion6/train.jsonl \\
        --deepspeed ds_zero3.json                           # the paper's setting (PAPER below)
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

# The paper's setting (Qwen2-VL-2B, 8 GPUs; "Implementation Details"; the reconstruction's repetition penalty
# 1.2 of the authors' RISE-CoT trainers, HSH55/RISE) and the tiny base's (one CPU, ~1 min).
PAPER = dict(lr=2e-6, max_steps=200, num_generations=8, batch_size=1, grad_accum=2, max_pixels=401408,
             max_new_tokens=256, rec_max_new_tokens=128, save_every=50, rec_repetition_penalty=1.2,
             class_names="allow", deepspeed="ds_zero3.json", gradient_checkpointing=True)
# Tiny CoTs are cut at 16 tokens (~12 words): the tiny base answers after one short sentence, not after a
# long description (tiny-base/README.md). Its CoT prompt forbids the shapes' class names (colours), and the
# reward enforces it: a colour named in the CoT would be the answer itself.
TINY = dict(lr=2e-4, max_steps=40, num_generations=6, batch_size=2, grad_accum=1, max_pixels=None,
            max_new_tokens=16, rec_max_new_tokens=40, save_every=10, rec_repetition_penalty=1.0,
            class_names="forbid")
LOGGED = run.LOGGED + ("seen.jsonl",)      # appended per step: cut back to the checkpoint on --resume


def parser():
    """The script's command line (run.common_args and its own options); parse_args fills the presets."""
    p = run.common_args("rise_cot", __doc__.split("\n")[0], evaluation=False)
    p.add_argument("--train-on", default="both", choices=["cot", "rec", "both"],
                   help="which tokens of the trajectory get the GRPO loss")
    p.add_argument("--rec-temperature", type=float, default=0.7, help="0 = greedy reconstruction")
    p.add_argument("--rec-max-new-tokens", type=int)
    p.add_argument("--rec-repetition-penalty", type=float,
                   help="repetition penalty of the reconstruction sampling (1 = none); GRPO scores its tokens "
                        "with the un-penalised policy")
    p.add_argument("--class-names", choices=["allow", "remove", "forbid"],
                   help="class names in classification CoTs: allow (the paper: its leak check is numbers), "
                        "remove (the authors' code: sentences naming a class are deleted before the "
                        "reconstruction and from the kept CoT), forbid (naming a class is a leak: reward 0; "
                        "the shapes world's CoT prompt then asks for no class names)")
    p.add_argument("--harvest-generations", type=int, default=None, help="G of the harvest pass (default G)")
    p.add_argument("--harvest-batch-size", type=int, default=8, help="samples per rank per harvest batch")
    p.add_argument("--reward", default="sim,leak,format",
                   help="factors of R_CoT: sim (always) and the indicators leak, format (paper Table 5 drops them)")
    return p


def parse_args(argv=None):
    p = parser()
    args = run.parse_args(p, argv, PAPER, TINY)
    args.reward_terms = [t.strip() for t in args.reward.split(",") if t.strip()]
    if "sim" not in args.reward_terms or set(args.reward_terms) - {"sim", "leak", "format"}:
        p.error(f"--reward: sim plus any of leak, format (comma-separated); got {args.reward!r}")
    return args


# ============================================================================ training
def train(args, rank, world, out):
    """RISE-CoT: GRPO on (CoT, reconstruction) trajectories -> OUT/final/, then the harvest -> OUT/cots.jsonl."""
    # ---- data: a classification or detection manifest (default: the shapes world's soft_cls)
    manifest = run.manifest_path(args.data, "train", args.seed, "soft_cls")
    records, task, skipped = run.records(manifest, args.skip_bad, allowed=("cls", "det"))
    if rank == 0:
        print(f"[rise_cot] {len(records)} training samples from {manifest} ({skipped} skipped), "
              f"{world} rank(s), lr {args.lr}, G {args.num_generations}, {args.max_steps} steps")

    # ---- models: the policy (a DeepSpeed engine) and, for the KL term, its frozen reference
    engine, processor = run.policy(args)
    ref = run.reference_model(args.model, args, engine.device) if args.beta and not args.lora_rank else None
    run.open_tracker(args, out, rank)
    records, _ = run.usable(records, lambda r: sample_problem(r, engine.module, processor, args), rank, world, out)
    total = args.max_steps * args.grad_accum                     # micro-steps; --max-steps counts updates
    state = run.resume(out, args, engine, LOGGED, fresh=("cots.jsonl",))
    run.new_stage(engine, args.lr, args.max_steps, args, done=state["step"] // args.grad_accum)
    best = best_seen(run.read_jsonl(out / "seen.jsonl"))

    # ---- the GRPO loop (paper eq. 7)
    G, order = args.num_generations, run.data_order(len(records), args.seed)
    for step in run.steps(engine, state, total, rank, "rise_cot"):
        t0 = time.time()
        batch = run.step_items(records, order, step, args.batch_size, rank, world)
        images = [data.open_image(r["image_path"]) for r in batch]
        answers = [annotation(r, im, engine.module, processor) for r, im in zip(batch, images)]
        # steps 1-3: G CoTs per sample, one reconstruction per CoT, R_CoT of each
        cots, recs, scored = closed_loop(engine.module, processor, batch, images, answers, args, G)
        reward = torch.tensor([s["reward"] for s in scored])
        # step 4: GRPO on the trajectory; the G CoTs of a sample share its prompt (run once), the
        # reconstruction prompts each hold their own CoT (nothing to share)
        segments = [dict(cots, temperature=args.temperature, max_new_tokens=args.max_new_tokens, group_size=G)] \
            if args.train_on in ("cot", "both") else []
        if args.train_on in ("rec", "both"):
            segments.append(dict(recs, temperature=args.rec_temperature or 1.0, max_new_tokens=args.rec_max_new_tokens))
        stats = vlm.grpo_update(engine, ref, segments, reward, G, **run.grpo_options(args),
                                suppress=vlm.suppressed_ids(processor), window=vlm.accumulation(step, total, args.grad_accum))
        # step 5, as it goes: the best (CoT, reconstruction) seen per sample, on disk for --resume
        for found in run.gather_records(best_per_sample(batch, cots, recs, scored, G, "training")):
            if found["reward"] > best.get(found["id"], {"reward": -1})["reward"]:
                best[found["id"]] = found
                if rank == 0:
                    run.append_jsonl(out / "seen.jsonl", found)
        stats.update(grpo.reward_stats(reward, G), **factor_means(scored))
        run.log_completions(out, rank, step, [dict(id=batch[k // G]["id"], cot=c, reconstruction=a, **s) for k, (c, a, s)
                                              in enumerate(zip(cots["texts"], recs["texts"], scored))],
                            args.log_completions_every)
        if rank == 0:
            tqdm.write(f"[rise_cot] step {step + 1}/{total} R_CoT {stats['reward']:.3f} (similarity {stats['similarity']:.3f}, "
                       f"no leak {stats['no_leak']:.2f}, format {stats['format_ok']:.2f}) {time.time() - t0:.1f}s")
        run.end_step(engine, out, state, step, total, stats, args, rank, LOGGED, time.time() - t0)

    # ---- step 5: the harvest, G CoTs per training sample with the trained policy; the best per sample
    HG = args.harvest_generations or G

    def harvest(mine):
        images = [data.open_image(r["image_path"]) for r in mine]
        answers = [annotation(r, im, engine.module, processor) for r, im in zip(mine, images)]
        found = best_per_sample(mine, *closed_loop(engine.module, processor, mine, images, answers, args, HG), HG, "harvest")
        return [best[r["id"]] if r["id"] in best and best[r["id"]]["reward"] > r["reward"] else r for r in found]

    # chunks bigger than training batches (no backward); appended per chunk, --resume skips the ids it holds
    run.map_jsonl(records, harvest, out / "cots.jsonl", rank, world, args.harvest_batch_size * world, "harvest")

    # ---- save
    run.save_final(engine, processor, out)
    if rank == 0:
        report(out, records)


# ============================================================================ steps 1-3
def annotation(record, image, model, processor):
    """The annotation a in the frame the model writes: {class: prob}, or boxes in the model frame
    (Qwen2-VL 0..1000, Qwen2.5-VL pixels of the processor's resized input: vlm.to_model_frame)."""
    if "probs" in record:
        return dict(zip(record["classes"], record["probs"]))
    return [vlm.to_model_frame(b, model.config.model_type, image.size, processor) for b in record["boxes"]]


def closed_loop(model, processor, records, images, answers, args, group_size):
    """Steps 1-3 for a batch: G CoTs per sample, one reconstruction per CoT, their rewards.

    Returns (cot rollout, reconstruction rollout, reward dicts); one batched generate() call each;
    rows are prompt-major (sample i owns rows i*G .. i*G+G-1). With --class-names remove the cot
    rollout's texts are the cleaned CoTs (the sampled ones in sampled_texts, its tokens unchanged)."""
    frames = [vlm.box_frame(model.config.model_type, im.size, processor) for im in images]
    forbid = args.class_names == "forbid"       # the shapes world's CoT prompt then asks for no class names
    cot_prompts = [[vlm.user_turn(data.prompt("cot", r, boxes=a, frame=f, mask_names=forbid))]
                   for r, a, f in zip(records, answers, frames)]
    cot_batch = vlm.chat_inputs(processor, cot_prompts, [[im] for im in images], max_prompt_len=args.max_prompt_len)
    with vlm.generation_mode(model):
        cots = vlm.sample(model, processor, cot_batch, group_size, args.max_new_tokens, args.temperature)
        owner = [i // group_size for i in range(len(cots["texts"]))]
        if args.class_names == "remove":     # the CoT the reconstruction reads and cots.jsonl keeps; the
            cots = dict(cots, sampled_texts=cots["texts"], texts=[    # GRPO loss stays on the sampled tokens
                rewards.remove_class_sentences(c, records[i]["classes"]) if "probs" in records[i] else c
                for i, c in zip(owner, cots["texts"])])
        # no length check: the prompt without its CoT passed one (sample_problem) and a CoT has at most
        # max_new_tokens tokens, so one long CoT never aborts the run
        rec_prompts = [[vlm.user_turn(data.prompt("rec", records[i], cot=c, frame=frames[i]))]
                       for i, c in zip(owner, cots["texts"])]
        rec_batch = vlm.chat_inputs(processor, rec_prompts, [[images[i]] for i in owner])
        recs = vlm.sample(model, processor, rec_batch, 1, args.rec_max_new_tokens, args.rec_temperature or 1.0,
                          do_sample=args.rec_temperature != 0, repetition_penalty=args.rec_repetition_penalty)
    task = lambda r: "cls" if "probs" in r else "det"  # noqa: E731
    scored = [rewards.rise_cot_reward(c, a, answers[i], task(records[i]), forbid_class_names=forbid,
                                      terms=args.reward_terms)
              for i, c, a in zip(owner, cots["texts"], recs["texts"])]
    return cots, recs, scored


def factor_means(scored):
    """The batch's share of CoTs that do not leak, that are in format, and the mean Sim (R_CoT's factors)."""
    n = max(len(scored), 1)
    return {"no_leak": sum(not s["leak"] for s in scored) / n, "format_ok": sum(s["format"] for s in scored) / n,
            "similarity": sum(s["similarity"] for s in scored) / n}


def sample_problem(record, model, processor, args):
    """Why a record's CoT or reconstruction prompt (without its CoT) cannot be processed (over
    --max-prompt-len, an image the processor refuses or that cannot be opened), or None."""
    image = data.open_image(record["image_path"])
    frame = vlm.box_frame(model.config.model_type, image.size, processor)
    cot = [vlm.user_turn(data.prompt("cot", record, boxes=annotation(record, image, model, processor), frame=frame,
                                     mask_names=args.class_names == "forbid"))]
    rec = [vlm.user_turn(data.prompt("rec", record, cot="", frame=frame))]
    return (vlm.prompt_problem(processor, cot, [image], args.max_prompt_len)
            or vlm.prompt_problem(processor, rec, [image], args.max_prompt_len))


# ============================================================================ step 5: D_CoT
def best_per_sample(records, cots, recs, scored, group_size, source):
    """The highest-reward (CoT, reconstruction) of each sample's group, as a cots.jsonl record."""
    best = []
    for i, rec in enumerate(records):
        j = max(range(i * group_size, (i + 1) * group_size), key=lambda k: scored[k]["reward"])
        best.append({"id": rec["id"], "cot": cots["texts"][j], "reconstruction": recs["texts"][j],
                     "reward": scored[j]["reward"], "leak": scored[j]["leak"], "format": scored[j]["format"],
                     "source": source})
    return best


def best_seen(seen):
    """{id: the highest-reward record} of seen.jsonl's records (the best per sample during training)."""
    best = {}
    for found in seen:
        if found["reward"] > best.get(found["id"], {"reward": -1})["reward"]:
            best[found["id"]] = found
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


def report(out, records):
    """What a finished run prints: R_CoT over the first and last 10 steps against a constant answer's,
    and the harvest's mean reward."""
    cots = run.read_jsonl(out / "cots.jsonl")
    curve = [r["reward"] for r in run.read_jsonl(out / "metrics.jsonl")]
    if curve:
        k = min(10, len(curve))
        print(f"[rise_cot] mean R_CoT over the first {k} steps {np.mean(curve[:k]):.3f}, over the last {k} "
              f"{np.mean(curve[-k:]):.3f}; a constant answer (the training mean) would score "
              f"{constant_answer_similarity(records):.3f}")
    print(f"[rise_cot] cots.jsonl: {len(cots)} samples, mean reward "
          f"{sum(c['reward'] for c in cots) / max(len(cots), 1):.3f} -> {out / 'cots.jsonl'}")
    print(f"[rise_cot] curves -> {run.plot(out) if curve else None}; model -> {out / 'final'}")


def main(argv=None):
    """RISE-CoT training: GRPO on closed-loop (CoT, reconstruction) trajectories, then the harvest."""
    args = parse_args(argv)
    train(args, *run.start(args, "rise_cot"))


if __name__ == "__main__":
    main()
    run.exit_finished()        # the run is complete: skip the interpreter's teardown
