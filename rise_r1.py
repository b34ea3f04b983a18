"""rise_r1.py -- RISE stage 2, "Inspire & Strengthen" (RISE-R1): SFT on high-reward CoTs, then GRPO.

Paper: "RISE: Enhancing VLM Image Annotation with Self-Supervised Reasoning" (arXiv 2508.13229),
section "RISE-R1: Training VLM for Enhanced CoTs" (SFT loss eq. 8, reward eq. 9, objective eq. 10).

  1. D_high = records of cots.jsonl (from rise_cot.py) with reward >= tau   -> high_quality()
  2. SFT on D_high: image + prompt -> "<think>c*</think><answer>a</answer>",
     loss on the target tokens only                                          -> vlm.sft_loss
  3. GRPO on the full training set, same prompt,
     reward = Sim(a_hat, a) + R_fmt                                          -> rewards.rise_r1_reward
  4. --eval: greedy decoding on the test set, with the prompt the model was trained with
     -> OUT/eval.json + OUT/predictions.jsonl                                -> evaluate()

The paper's rows (same budget each):
    SFT (plain answers)    --stages sft --sft-target plain
    Visual-RFT             --stages grpo
    RISE                   --stages sft,grpo --tau 0.5
    SFT Full + RFT         --stages sft,grpo --tau 0
    SFT High (no RL)       --stages sft
    python rise_r1.py --eval --model runs/rise_r1/final --out runs/rise_r1-eval [--baseline OTHER/predictions.jsonl]
"""
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import rewards
import run
import vlm

# The paper's setting ("Implementation Details": AdamW, weight decay 0.1, ZeRO-3, batch 1, accumulation 2,
# 200 steps per stage, 401,408 pixels, prompt length 1024) and the tiny base's (one CPU, a few minutes).
PAPER = dict(lr=2e-6, max_steps=200, sft_steps=200, num_generations=8, batch_size=1, grad_accum=2,
             max_pixels=401408, max_new_tokens=256, deepspeed="ds_zero3.json", gradient_checkpointing=True)
TINY = dict(lr=1e-4, max_steps=40, sft_steps=60, num_generations=6, batch_size=4, grad_accum=1,
            max_pixels=None, max_new_tokens=96)


def parser():
    """The script's command line (run.common_args and its own options); parse_args fills the presets."""
    p = run.common_args("rise_r1", __doc__.split("\n")[0])
    p.add_argument("--cots", default="runs/rise_cot/cots.jsonl", help="cots.jsonl from rise_cot.py")
    p.add_argument("--tau", type=float, default=0.5, help="keep CoTs with reward >= tau for SFT")
    p.add_argument("--stages", default="sft,grpo", help="sft | grpo | sft,grpo")
    p.add_argument("--sft-target", default="think", choices=["think", "plain"],
                   help="think: <think>c</think><answer>a</answer> on D_high; plain: the answer alone, all data")
    p.add_argument("--sft-steps", type=int, help="SFT optimizer updates (as --max-steps)")
    p.add_argument("--sft-lr", type=float, default=None, help="default: --lr")
    p.add_argument("--shots", type=int, default=None,
                   help="K per class (classification, COCO-Sub detection) or K in total (LISA detection)")
    p.add_argument("--baseline", default=None, help="--eval: predictions.jsonl of a baseline, for the win rate")
    p.add_argument("--eval-prompt", default=None, choices=["r1", "plain"],
                   help="--eval's prompt (default: the one the model was trained with, from its training_args.json)")
    return p


def parse_args(argv=None):
    p = parser()
    args = run.parse_args(p, argv, PAPER, TINY)
    args.stage_list = [s for s in args.stages.split(",") if s]
    if not args.stage_list or set(args.stage_list) - {"sft", "grpo"}:
        p.error(f"--stages: sft, grpo or sft,grpo; got {args.stages!r}")
    return args


# ============================================================================ training
def train(args, rank, world, out):
    """RISE-R1: SFT on D_high, then GRPO (or the stages --stages names) -> OUT/final/."""
    # ---- data
    records, task, skipped = run.records(run.manifest_path(args.data, "train", args.seed, "soft_cls"), args.skip_bad,
                                          allowed=("cls", "det"))
    if args.shots:
        records = few_shot(records, task, args.shots, args.seed)

    # ---- models
    engine, processor = run.policy(args, lr=args.sft_lr or args.lr)
    model = engine.module
    run.open_tracker(args, out, rank)
    records, _ = run.usable(records, lambda r: sample_problem(r, model, processor, "r1", args.max_prompt_len),
                            rank, world, out)
    if rank == 0:
        print(f"[rise_r1] {len(records)} training samples ({skipped} skipped), stages {args.stage_list}")
    state = run.resume(out, args, engine)
    state.setdefault("stage", args.stage_list[0])

    # ---- stage 1: SFT on D_high (paper eq. 8)
    if state["stage"] == "sft":
        if args.sft_target == "think":
            pairs, pass_rate = high_quality(args.cots, records, args.tau)
            if rank == 0:
                print(f"[rise_r1] D_high: {len(pairs)} CoTs with reward >= {args.tau} (pass rate {pass_rate:.0%})")
            if state["step"] == 0:
                run.log(out, rank, {"step": 0, "stage": "sft", "tau": args.tau, "pass_rate": pass_rate})
        else:
            pairs = [(r, None) for r in records]
        if not pairs:
            raise SystemExit(f"no SFT data: no CoT reached tau={args.tau}")
        total = args.sft_steps * args.grad_accum
        run.new_stage(engine, args.sft_lr or args.lr, args.sft_steps, args, done=state["step"] // args.grad_accum)
        for step in run.steps(engine, state, total, rank, "sft"):
            picks = torch.randint(len(pairs), (args.batch_size,), generator=torch.Generator().manual_seed(
                args.seed * 100003 + step * world + rank)).tolist()
            convs, images = [], []
            for r, cot in (pairs[i] for i in picks):
                im = data.open_image(r["image_path"])
                convs.append(sft_conversation(r, cot, im, model, processor))
                images.append([im])
            loss = vlm.sft_loss(engine, processor, convs, images)
            skipped = vlm.update(engine, loss, vlm.accumulation(step, total, args.grad_accum))
            run.end_step(engine, out, state, step, total, {"stage": "sft", "loss": loss.item(), "skipped": skipped},
                         args, rank, checkpoint_at_end=False)
        run.save_final(engine, processor, out, name="sft")     # GRPO's reference policy
        state.update(stage="grpo", step=0)                     # a checkpoint that resumes in GRPO needs it
        run.save_checkpoint(out, state, engine)

    # ---- stage 2: GRPO with reward = Sim + R_fmt (paper eqs. 9-10)
    if "grpo" in args.stage_list:
        total = args.max_steps * args.grad_accum
        run.new_stage(engine, args.lr, args.max_steps, args, done=state["step"] // args.grad_accum)
        ref = None
        if args.beta and not args.lora_rank:
            ref = run.reference_model(str(out / "sft") if "sft" in args.stage_list else args.model, args, engine.device)
        G, order = args.num_generations, run.data_order(len(records), args.seed)
        for step in run.steps(engine, state, total, rank, "grpo"):
            t0 = time.time()
            batch = run.step_items(records, order, step, args.batch_size, rank, world)
            images = [data.open_image(r["image_path"]) for r in batch]
            answers = [annotation(r, im, model, processor)[0] for r, im in zip(batch, images)]
            convs = [[vlm.user_turn(prompt("r1", r, im, model, processor))] for r, im in zip(batch, images)]
            reward_fn = lambda texts, owner: [rewards.rise_r1_reward(t, answers[i], task)  # noqa: E731
                                              for t, i in zip(texts, owner)]
            stats, rollout, reward = vlm.grpo_step(
                engine, ref, processor, convs, [[im] for im in images], reward_fn, group_size=G,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, max_prompt_len=args.max_prompt_len,
                window=vlm.accumulation(step, total, args.grad_accum), **run.grpo_options(args))
            run.log_completions(out, rank, step, [{"id": batch[k // G]["id"], "completion": t, "reward": r}
                                                  for k, (t, r) in enumerate(zip(rollout["texts"], reward.tolist()))],
                                args.log_completions_every)
            run.end_step(engine, out, state, step, total, dict(stats, stage="grpo"), args, rank,
                         seconds=time.time() - t0)

    # ---- save
    run.save_final(engine, processor, out)
    if rank == 0:
        print(f"[rise_r1] model in {out / 'final'}")
        run.plot(out)


# ============================================================================ data and prompts
def few_shot(records, task, k, seed):
    """The few-shot rows of RISE (arXiv 2508.13229, "Results on Image Annotation Tasks", Tables 1-2), seeded:
    K samples per class for classification (class = the argmax: Emotion6, ImageNet-Sub) and for
    class-labelled detection (COCO-Sub: every record has a category_id; one record per image and
    class); K in total for detection without classes (LISA).
    The SFT stage's CoTs are those --cots holds for the chosen records: RISE-CoT's run, normally on the
    full training set. The paper does not say where its few-shot CoTs came from; the authors' code
    selects few-shot samples in its RISE-R1 scripts only (HSH55/RISE RISE-R1/grpo_emo6.py, the first
    K per class in file order where this takes a seeded random K; its RISE-CoT scripts use the whole
    set), which is what this default does. For CoTs made from the K labelled samples alone, run
    rise_cot.py on a manifest of those samples."""
    rng = random.Random(seed)
    if task == "det" and not all("category_id" in r for r in records):
        return rng.sample(records, min(k, len(records)))
    by_class = {}
    for r in records:
        cls = r["category_id"] if task == "det" else r["classes"][int(np.argmax(r["probs"]))]
        by_class.setdefault(cls, []).append(r)
    return [r for cls in sorted(by_class) for r in rng.sample(by_class[cls], min(k, len(by_class[cls])))]


def annotation(record, image, model, processor):
    """(ground truth for the reward, its text for the SFT target: data.format_answer, the format the
    record's prompt asks for), boxes in the model's frame (Qwen2.5-VL: pixels of the processor's resized
    input, so the processor is needed)."""
    if "probs" in record:
        return dict(zip(record["classes"], record["probs"])), data.format_answer(record)
    boxes = [vlm.to_model_frame(b, model.config.model_type, image.size, processor) for b in record["boxes"]]
    return boxes, data.format_answer(record, boxes)


def sft_conversation(record, cot, image, model, processor):
    """SFT example: the record's prompt -> "<think>c*</think><answer>a</answer>" (cot=None: plain answer)."""
    _, text = annotation(record, image, model, processor)
    if cot is None:
        return [vlm.user_turn(prompt("plain", record, image, model, processor)), vlm.assistant_turn(text)]
    return [vlm.user_turn(prompt("r1", record, image, model, processor)),
            vlm.assistant_turn(f"<think>{cot}</think><answer>{text}</answer>")]


def prompt(style, record, image, model, processor):
    """data.prompt with the box frame of this model and image stated (detection)."""
    return data.prompt(style, record, frame=vlm.box_frame(model.config.model_type, image.size, processor))


def sample_problem(record, model, processor, style="r1", max_prompt_len=None):
    """Why a record's prompt cannot be processed (over max_prompt_len, an image the processor
    refuses or that cannot be opened), or None: run.usable skips and counts such samples."""
    image = data.open_image(record["image_path"])
    conv = [vlm.user_turn(prompt(style, record, image, model, processor))]
    return vlm.prompt_problem(processor, conv, [image], max_prompt_len)


def high_quality(cots_path, records, tau):
    """D_high: (record, CoT) pairs whose RISE-CoT reward >= tau; also returns the pass rate.
    Raises SystemExit when cots_path is missing or holds no CoT of these records."""
    if not Path(cots_path).is_file():
        raise SystemExit(f"--cots {cots_path}: no such file (rise_cot.py writes OUT/cots.jsonl)")
    by_id = {r["id"]: r for r in records}
    cots = [c for c in run.read_jsonl(cots_path) if c["id"] in by_id]
    if not cots:
        raise SystemExit(f"{cots_path} has no CoT for any training sample: run rise_cot.py first")
    kept = [(by_id[c["id"]], c["cot"]) for c in cots if c["reward"] >= tau]
    return kept, len(kept) / len(cots)


# ============================================================================ evaluation
def trained_prompt(model_dir):
    """The prompt a model saved by this script was trained with: "plain" after --sft-target plain alone
    (the SFT baseline answers without a think), else "r1" (every other row, and any other model)."""
    saved = Path(model_dir) / "training_args.json"
    trained = json.loads(saved.read_text()) if saved.is_file() else {}
    return "plain" if trained.get("sft_target") == "plain" and trained.get("stages") == "sft" else "r1"


@torch.no_grad()
def predict(model, processor, records, task, style="r1", batch_size=16, max_new_tokens=128):
    """Greedy predictions, one dict per record; an unparsable answer is kept with parsed=False."""
    model.eval()
    preds = []
    for start in tqdm(range(0, len(records), batch_size), desc="eval"):
        chunk = records[start:start + batch_size]
        images = [data.open_image(r["image_path"]) for r in chunk]
        batch = vlm.chat_inputs(processor, [[vlm.user_turn(prompt(style, r, im, model, processor))]
                                            for r, im in zip(chunk, images)], [[im] for im in images])
        texts = vlm.sample(model, processor, batch, 1, max_new_tokens, do_sample=False)["texts"]
        for r, im, text in zip(chunk, images, texts):
            answer = (rewards.answer_text(text) if style == "r1" else text) or ""
            row = {"id": r["id"], "text": text}
            if task == "cls":
                parsed = rewards.parse_class_probs(answer)
                q = rewards.probs_vector(parsed, r["classes"]) if parsed else None
                ok = q is not None and sum(q) > 0
                row.update(parsed=ok, probs=q, jsd=rewards.jsd(r["probs"], q) if ok else math.log(2),
                           label=r["classes"][int(np.argmax(q))] if ok else None)
            else:
                boxes = rewards.parse_boxes(answer)
                row.update(parsed=boxes is not None, boxes=[
                    vlm.from_model_frame(b, model.config.model_type, im.size, processor) for b in boxes or []])
            preds.append(row)
    return preds


def metrics_of(preds, records, task, baseline=None):
    """eval.json: jsd + accuracy (+ win rate vs a baseline's predictions) or mAP@0.5, and the
    number of unparsable answers (scored as wrong: JSD ln 2, no label, no boxes).

    mAP@0.5 (rewards.map50): a record's class is its "target" text, and predictions carry no confidence
    (1.0 each, in output order). COCO-Sub: the target is the category name, so this is COCO's per-class
    AP averaged over the categories. LISA: the target is the record's own target description, so nearly
    every record is a class of its own with one GT box: with one predicted box per record, mAP@0.5 is
    the share of records whose box has IoU >= 0.5 with the target, whatever the order of the test set
    (extra boxes lower their record's AP). A single class for all of LISA would rank confidence-less
    boxes by file order and make AP depend on it; the paper does not say which convention its LISA
    mAP uses and its authors' evaluation code is not released. Records that share a description (one
    question split over several target regions) share a class."""
    m = {"n": len(preds), "unparsable": sum(not p["parsed"] for p in preds)}
    if task == "cls":
        m["jsd"] = float(np.mean([p["jsd"] for p in preds])) if preds else math.log(2)
        m["accuracy"] = rewards.accuracy([p["label"] for p in preds],
                                         [r["classes"][int(np.argmax(r["probs"]))] for r in records])
        if baseline:
            theirs = {b["id"]: b["jsd"] for b in run.read_jsonl(baseline)}
            common = [p for p in preds if p["id"] in theirs]
            m["win_rate"] = rewards.win_rate([theirs[p["id"]] for p in common], [p["jsd"] for p in common])
            m["win_rate_n"] = len(common)
    else:
        label = lambda r: r.get("target", "object")  # noqa: E731
        m["map50"] = rewards.map50([{"boxes": p["boxes"], "labels": [label(r)] * len(p["boxes"])}
                                    for p, r in zip(preds, records)],
                                   [{"boxes": r["boxes"], "labels": [label(r)] * len(r["boxes"])} for r in records])
    return m


def evaluate(args, rank, world, out):
    """`--eval`: greedy answers of --model on the test manifest -> OUT/predictions.jsonl and OUT/eval.json
    (metrics_of: JSD / accuracy / mAP@0.5 by task). Unusable samples are skipped and counted."""
    model, processor = vlm.load_model(args.model, max_pixels=args.max_pixels)
    records, task, skipped = run.records(run.manifest_path(args.test or args.data, "test", args.seed, "soft_cls"),
                                         args.skip_bad, allowed=("cls", "det"))
    records = records[:args.n_test]
    style = args.eval_prompt or trained_prompt(args.model)
    # one sample that cannot be processed is skipped and counted, never the end of the evaluation
    records, bad = run.usable(records, lambda r: sample_problem(r, model, processor, style, args.max_prompt_len),
                              rank, world, out, split="test")
    preds = run.gather_records(predict(model, processor, run.shard(records, rank, world), task, style,
                                       max_new_tokens=args.max_new_tokens))
    if rank == 0:
        order = {r["id"]: i for i, r in enumerate(records)}
        preds.sort(key=lambda p: order[p["id"]])        # ranks evaluated interleaved shards
        metrics = dict(metrics_of(preds, records, task, args.baseline), skipped_records=skipped,
                       skipped_samples=len(bad), eval_prompt=style)
        (out / "eval.json").write_text(json.dumps(dict(metrics, model=str(args.model)), indent=1))
        data.write_jsonl(out / "predictions.jsonl", preds)
        print(json.dumps(metrics))
    return metrics if rank == 0 else None


def main(argv=None):
    """RISE-R1 training (SFT on D_high, then GRPO), or with --eval only the evaluation of --model."""
    args = parse_args(argv)
    return (evaluate if args.eval else train)(args, *run.start(args, "rise_r1"))


if __name__ == "__main__":
    main()
    run.exit_finished()        # the run is complete: skip the interpreter's teardown
