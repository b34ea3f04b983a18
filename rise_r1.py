"""rise_r1.py -- RISE stage 2, "Inspire & Strengthen" (RISE-R1): SFT on high-reward CoTs, then GRPO.

Paper: ../shared/papers/rise-annotation.txt, section "RISE-R1"; SPEC 5.2.

  1. D_high = records of cots.jsonl (from rise_cot.py) with reward >= tau   -> high_quality()
  2. SFT on D_high: image + task prompt -> "<think>c*</think><answer>a</answer>",
     loss on the target tokens only                                          -> vlm.sft_loss
  3. GRPO on the full training set, same prompt,
     reward = Sim(a_hat, a) + R_fmt                                          -> rewards.rise_r1_reward
  4. --eval: greedy decoding on the test set -> eval.json + predictions.jsonl -> evaluate()

The paper's rows (same budget each):
    SFT (plain answers)    --stages sft --sft-target plain
    Visual-RFT             --stages grpo
    RISE                   --stages sft,grpo --tau 0.5
    SFT Full + RFT         --stages sft,grpo --tau 0
    SFT High (no RL)       --stages sft
    python rise_r1.py --eval --model runs/rise_r1/final [--baseline OTHER/predictions.jsonl]
"""
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import data
import grpo
import rewards
import run
import vlm

PAPER = dict(lr=2e-6, max_steps=200, sft_steps=200, num_generations=8, batch_size=1, grad_accum=2,
             max_pixels=401408, max_new_tokens=256)
TINY = dict(lr=1e-4, max_steps=40, sft_steps=60, num_generations=6, batch_size=4, grad_accum=1,
            max_pixels=None, max_new_tokens=96)


def parse_args(argv=None):
    p = run.common_args("rise_r1", __doc__.split("\n")[0])
    p.add_argument("--cots", default="runs/rise_cot/cots.jsonl", help="cots.jsonl from rise_cot.py")
    p.add_argument("--tau", type=float, default=0.5, help="keep CoTs with reward >= tau for SFT")
    p.add_argument("--stages", default="sft,grpo", help="sft | grpo | sft,grpo")
    p.add_argument("--sft-target", default="think", choices=["think", "plain"],
                   help="think: <think>c</think><answer>a</answer> on D_high; plain: the answer alone, all data")
    p.add_argument("--sft-steps", type=int, default=None)
    p.add_argument("--sft-lr", type=float, default=None, help="default: --lr")
    p.add_argument("--shots", type=int, default=None, help="K per class (cls) or K in total (det)")
    p.add_argument("--baseline", default=None, help="predictions.jsonl of a baseline, for the win rate")
    p.add_argument("--eval-prompt", default=None, choices=["r1", "plain"],
                   help="prompt at evaluation (default: plain for --sft-target plain models, else r1)")
    p.add_argument("--preset", default="auto", choices=["auto", "paper", "tiny"])
    for key in PAPER:
        p.set_defaults(**{key: None})
    args = p.parse_args(argv)
    tiny = args.preset == "tiny" or (args.preset == "auto" and args.model == vlm.TINY_BASE)
    for key, value in (TINY if tiny else PAPER).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.stages = [s for s in args.stages.split(",") if s]
    return args


# ---------------------------------------------------------------------------- data and prompts
def manifest_path(arg, seed, split):
    """A manifest path, or a shapes-world task name (default soft_cls)."""
    if arg and arg.endswith(".jsonl"):
        return Path(arg)
    return vlm.default_shapes_world(seed) / (arg or "soft_cls") / f"{split}.jsonl"


def load(path, skip_bad):
    task = "cls" if "probs" in Path(path).open().readline() else "det"
    records, skipped = data.read_manifest(path, task, skip_bad=skip_bad)
    return records, task, skipped


def few_shot(records, task, k, seed):
    """K samples per class (classification, by argmax) or K in total (detection), seeded."""
    rng = random.Random(seed)
    if task == "det":
        return rng.sample(records, min(k, len(records)))
    by_class = {}
    for r in records:
        by_class.setdefault(r["classes"][int(np.argmax(r["probs"]))], []).append(r)
    return [r for cls in sorted(by_class) for r in rng.sample(by_class[cls], min(k, len(by_class[cls])))]


def prompt(record, kind="r1"):
    multi = len(record.get("boxes", [])) > 1
    if "probs" in record:
        template = data.R1_PROMPT_CLS if kind == "r1" else data.PLAIN_PROMPT_CLS
        return template.format(class_list=data.class_list(record["classes"]))
    template = {("r1", False): data.R1_PROMPT_DET, ("r1", True): data.R1_PROMPT_MULTI_DET,
                ("plain", False): data.PLAIN_PROMPT_DET, ("plain", True): data.PLAIN_PROMPT_MULTI_DET}
    return template[kind, multi].format(target=record["target"])


def annotation(record, image, model):
    """(ground truth for the reward, its text for the SFT target), boxes in the model's frame."""
    if "probs" in record:
        return dict(zip(record["classes"], record["probs"])), data.format_probs(record["classes"], record["probs"])
    boxes = [vlm.to_model_frame(b, model.config.model_type, image.size) for b in record["boxes"]]
    return boxes, data.format_boxes(boxes) if len(boxes) > 1 else data.format_box(boxes[0])


def sft_conversation(record, cot, image, model):
    """SFT example: task prompt -> "<think>c*</think><answer>a</answer>" (cot=None: plain answer)."""
    _, text = annotation(record, image, model)
    if cot is None:
        return [vlm.user_turn(prompt(record, "plain")), vlm.assistant_turn(text)]
    return [vlm.user_turn(prompt(record, "r1")), vlm.assistant_turn(f"<think>{cot}</think><answer>{text}</answer>")]


def high_quality(cots_path, records, tau):
    """D_high: (record, CoT) pairs whose RISE-CoT reward >= tau; also returns the pass rate."""
    by_id = {r["id"]: r for r in records}
    cots = [c for c in run.read_jsonl(cots_path) if c["id"] in by_id]
    if not cots:
        raise SystemExit(f"{cots_path} has no CoT for any training sample: run rise_cot.py first")
    kept = [(by_id[c["id"]], c["cot"]) for c in cots if c["reward"] >= tau]
    return kept, len(kept) / len(cots)


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model, processor, records, task, kind="r1", batch_size=16, max_new_tokens=128):
    """Greedy predictions, one dict per record; an unparsable answer is kept with parsed=False."""
    model.eval()
    preds = []
    for start in tqdm(range(0, len(records), batch_size), desc="eval"):
        chunk = records[start:start + batch_size]
        images = [Image.open(r["image_path"]).convert("RGB") for r in chunk]
        batch = vlm.chat_inputs(processor, [[vlm.user_turn(prompt(r, kind))] for r in chunk], [[im] for im in images])
        texts = vlm.sample(model, processor, batch, 1, max_new_tokens, do_sample=False)["texts"]
        for r, im, text in zip(chunk, images, texts):
            answer = (rewards.answer_text(text) if kind == "r1" else text) or ""
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
    number of unparsable answers (scored as wrong: JSD ln 2, no label, no boxes)."""
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


# ---------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    rank, world, out = run.start(args)
    model, processor = vlm.load_model(args.model, max_pixels=args.max_pixels)

    if args.eval:                                               # ---- evaluation only
        records, task, skipped = load(manifest_path(args.test or args.data, args.seed, "test"), args.skip_bad)
        records = records[:args.n_test]
        preds = run.gather_records(predict(model, processor, run.shard(records, rank, world), task,
                                           args.eval_prompt or "r1", max_new_tokens=args.max_new_tokens))
        if rank == 0:
            order = {r["id"]: i for i, r in enumerate(records)}
            preds.sort(key=lambda p: order[p["id"]])        # ranks evaluated interleaved shards
            metrics = dict(metrics_of(preds, records, task, args.baseline), skipped_records=skipped)
            (out / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
            (out / "eval.json").write_text(json.dumps(metrics, indent=1))
            print(json.dumps(metrics))
        return

    # ---- data
    records, task, skipped = load(manifest_path(args.data, args.seed, "train"), args.skip_bad)
    if args.shots:
        records = few_shot(records, task, args.shots, args.seed)
    if rank == 0:
        print(f"[rise_r1] {len(records)} training samples ({skipped} skipped), stages {args.stages}")

    # ---- models
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = vlm.deepspeed_config(args.deepspeed or Path(__file__).with_name("ds_zero2.json"),
                               lr=args.sft_lr or args.lr, weight_decay=args.weight_decay, grad_accum=args.grad_accum)
    engine = vlm.deepspeed_engine(model, cfg)
    state = (run.load_checkpoint(engine, out) if args.resume else None) or {"stage": args.stages[0], "step": 0}
    run.prepare_out(out, rank, args.resume, state["step"], ("metrics.jsonl",), stage=state["stage"])
    guard = run.NonFiniteGuard()

    # ---- stage 1: SFT
    if "sft" in args.stages and state["stage"] == "sft":
        if args.sft_target == "think":
            pairs, pass_rate = high_quality(args.cots, records, args.tau)
            if rank == 0:
                print(f"[rise_r1] D_high: {len(pairs)} CoTs with reward >= {args.tau} (pass rate {pass_rate:.0%})")
            run.log(out, rank, {"step": 0, "stage": "sft", "tau": args.tau, "pass_rate": pass_rate})
        else:
            pairs = [(r, None) for r in records]
        if not pairs:
            raise SystemExit(f"no SFT data: no CoT reached tau={args.tau}")
        for step in tqdm(range(state["step"], args.sft_steps), desc="sft", disable=rank != 0):
            picks = torch.randint(len(pairs), (args.batch_size,), generator=torch.Generator().manual_seed(
                args.seed * 100003 + step * world + rank)).tolist()
            convs, images = [], []
            for r, cot in (pairs[i] for i in picks):
                im = Image.open(r["image_path"]).convert("RGB")
                convs.append(sft_conversation(r, cot, im, model))
                images.append([im])
            loss = vlm.sft_loss(engine, processor, convs, images)
            skipped_update = not math.isfinite(loss.item())
            if not skipped_update:
                grpo.apply_update(engine, None, loss)
            guard.check(skipped_update, step)
            run.log(out, rank, {"step": step, "stage": "sft", "loss": loss.item()})
            if (step + 1) % args.save_every == 0:
                run.save_checkpoint(engine, out, step + 1, {"stage": "sft"})
        state = {"stage": "grpo", "step": 0}
        run.save_checkpoint(engine, out, 0, state)
        run.save_final(engine, processor, out, name="sft")     # GRPO's reference policy

    # ---- stage 2: GRPO with reward = Sim + R_fmt
    if "grpo" in args.stages:
        for group in engine.optimizer.param_groups:            # SFT may have used another lr
            group["lr"] = args.lr
        ref_name = str(out / "sft") if "sft" in args.stages else args.model
        ref = vlm.reference_model(ref_name, cfg, device=engine.device, max_pixels=args.max_pixels) \
            if args.beta else None
        G = args.num_generations
        order = run.data_order(len(records), args.seed)
        for step in tqdm(range(state["step"], args.max_steps), desc="grpo", disable=rank != 0):
            t0 = time.time()
            batch = run.step_items(records, order, step, args.batch_size, rank, world)
            images = [Image.open(r["image_path"]).convert("RGB") for r in batch]
            gts = [annotation(r, im, model)[0] for r, im in zip(batch, images)]
            reward_fn = lambda texts, owner: [rewards.rise_r1_reward(t, gts[i], task)  # noqa: E731
                                              for t, i in zip(texts, owner)]
            stats, _, _ = grpo.grpo_step(engine, processor, [[vlm.user_turn(prompt(r))] for r in batch],
                                         [[im] for im in images], reward_fn, ref_model=ref, group_size=G,
                                         max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                         max_prompt_len=args.max_prompt_len, beta=args.beta, norm=args.loss_norm,
                                         scale_rewards=args.scale_rewards == "group")
            guard.check(stats["skipped"], step)
            run.log(out, rank, dict(stats, step=step, stage="grpo", seconds=round(time.time() - t0, 2)))
            if (step + 1) % args.save_every == 0:
                run.save_checkpoint(engine, out, step + 1, {"stage": "grpo"})

    # ---- save
    run.save_final(engine, processor, out)
    if rank == 0:
        print(f"[rise_r1] model in {out / 'final'}")
        run.plot(out)


if __name__ == "__main__":
    main()
