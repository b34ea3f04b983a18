"""visrl.py -- VisRL: intention-driven visual perception trained with iterative step-level DPO.

Paper: "VisRL: Intention-Driven Visual Perception via Reinforced Reasoning" (arXiv 2503.07523):
section 3.1 (data generation, eq. 4), 3.2 (step-level DPO, eqs. 5-7), 4.4, appendix C (critics).

The model answers in two steps (a "visual chain of thought"): from image + question a focus box
"[x1,y1,x2,y2]" (normalised 0..1), then, shown the image, the question and the box's crop, the answer.
Real data get the paper's CoT sentence after the question, VisCoT's 3-decimal boxes and, for the answer,
a new user turn with the same text and the crop (the authors' released code); the critic gets their judge
prompts word for word. Shapes-world data keep the tiny base's own prompts (a two-turn chat, 2 decimals).
  0. SFT warm-up; the pre-SFT model, frozen, is the critic (no external judge)      sft_stage()
  1. per question K attempts of two sampled boxes, b2 moved off b1 (eq. 3), each box cropped,
     answered and critic-scored: the crop (s_b), the answer (s_r)           generate_candidates()
  2. filter (eq. 4): per question a chosen and a rejected candidate, or none    select_pair()
  3. stage 1: DPO on the box step (eqs. 5-6)                               dpo_stage(stage=1)
  4. stage 2: 0.5 DPO(box) + 0.5 DPO(answer) given the WINNING box (eqs. 7-10) dpo_stage(stage=2)
  5. --iters N: 1-4 again with the improved model; then answer and box accuracy    evaluate()

    deepspeed visrl.py                                           # tiny base + shapes world, CPU, ~10 min
    deepspeed visrl.py --eval --model runs/visrl/final           # runs/visrl-eval/eval.json
    deepspeed --num_gpus 8 visrl.py --model Qwen/Qwen2-VL-7B-Instruct --data viscot_rl.jsonl \\
        --sft-data viscot_sft.jsonl --deepspeed ds_zero3.json    # the paper's setting (PAPER below)

--attempts is K; --lr / --beta are the DPO stages' (--sft-lr the warm-up's); --max-steps caps each stage's
updates (default: epochs); a DPO stage's reference is the model it starts from; --resume restarts after the
newest finished stage. Outputs: OUT/{sft,final}/, OUT/iter{k}/{candidates,pairs}.jsonl, stats.json, stage1/,
stage2/, examples/; OUT/metrics.jsonl, stages.jsonl (test scores after every stage), eval.json, predictions.jsonl.
"""
import json
import math
import random
import re
import sys
import time

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import data
import dpo
import rewards
import run
import vlm

# The paper prints no training hyper-parameters: PAPER takes them from the authors' released code
# (github.com/zhangquanchen/VisRL): LoRA rank 8 on every linear layer of Qwen2-VL-7B-Instruct at these
# rates (--lora-rank 0 trains all weights: it wants lower ones), cosine schedule, 10 % warm-up, no weight
# decay, LLaMA-Factory's image cap of 768 x 768 pixels (752 tokens; two images per answer prompt),
# cutoff 2048. K = 3 attempts x 2 boxes, temperature 2, thresholds 0.8 / 0.2, beta 0.1: paper + code.
PAPER = dict(lr=5e-6, sft_lr=1e-4, sft_epochs=3.0, dpo_epochs=5.0, batch_size=3, grad_accum=8,
             sft_batch_size=2, attempts=3, temperature=2.0, answer_temperature=2.0, iters=1,
             sft_fraction=1.0, gen_batch_size=8, stage_eval_n=0, max_new_tokens=64, answer_max_new_tokens=128,
             max_pixels=768 * 768, max_prompt_len=2048, lora_rank=8, lr_scheduler="cosine", warmup_ratio=0.1,
             weight_decay=0.0, gradient_checkpointing=True, deepspeed="ds_zero3.json")
TINY = dict(lr=2e-5, sft_lr=1e-4, sft_epochs=1.0, dpo_epochs=2.0, batch_size=8, grad_accum=1,
            sft_batch_size=8, attempts=3, temperature=1.0, answer_temperature=1.0, iters=2,
            sft_fraction=0.25, gen_batch_size=16, stage_eval_n=512, max_new_tokens=32, answer_max_new_tokens=8,
            max_pixels=None, max_prompt_len=1024, lora_rank=0, lr_scheduler="constant", warmup_ratio=0.0,
            weight_decay=0.1)
LOGGED = run.LOGGED
STAGES = ("sft", "stage1", "stage2")


def parser():
    """The script's command line (run.common_args and its own options); parse_args fills the presets."""
    p = run.common_args("visrl", __doc__.split("\n")[0], grpo_options=False, beta=0.1)
    p.add_argument("--attempts", "-K", type=int, help="K: attempts per question, two sampled boxes each")
    p.add_argument("--sft-data", help="boxed VQA manifest for the SFT warm-up (default: held out of --data)")
    p.add_argument("--sft-fraction", type=float, help="share of --data's boxed records held out for SFT")
    p.add_argument("--sft-lr", type=float)
    p.add_argument("--sft-epochs", type=float)
    p.add_argument("--sft-batch-size", type=int)
    p.add_argument("--dpo-epochs", type=float, help="epochs over the pairs, per stage")
    p.add_argument("--iters", type=int, help="rounds of generation + stage 1 + stage 2")
    p.add_argument("--stages", default="sft,stage1,stage2", help="which of them to run (e.g. sft,stage2)")
    p.add_argument("--answer-temperature", type=float, help="sampling temperature of answers")
    p.add_argument("--answer-max-new-tokens", type=int, help="answer length limit (--max-new-tokens: the box's)")
    p.add_argument("--gen-batch-size", type=int, help="questions per generate call per rank")
    p.add_argument("--win-threshold", type=float, default=0.8, help="tau_w for s_b and s_r")
    p.add_argument("--lose-threshold", type=float, default=0.2, help="tau_l for s_b and s_r")
    p.add_argument("--iou-thresh", type=float, default=0.05, help="diversity controller: IoU(b1, b2) limit")
    p.add_argument("--diversity", default="area", choices=["area", "sides"],
                   help="diversity controller's size bound on the replacement box: its area within --size-tol of "
                        "b1's (area: the paper, eq. 3) or its width and height each (sides: the released code)")
    p.add_argument("--size-tol", type=float, default=0.3,
                   help="diversity controller: relative tolerance of the size bound (--diversity)")
    p.add_argument("--quality-iou", type=float, default=0.5, help="data quality: IoU with the GT box of a 'P' box")
    p.add_argument("--nll-weight", type=float, default=0.0, help="+ this x chosen NLL to the DPO loss (RPO; 0: paper)")
    p.add_argument("--pairs", help="train iteration 1 on this pairs.jsonl instead of generating it")
    p.add_argument("--critic", help="default: --model (the paper); 'oracle': GT box + exact match (diagnostic)")
    p.add_argument("--stage-eval-n", type=int, help="test records scored after every stage (0: none)")
    p.add_argument("--n-examples", type=int, default=8, help="example PNGs per iteration")
    return p


def parse_args(argv=None):
    p = parser()
    args = run.parse_args(p, argv, PAPER, TINY)
    args.stage_list = [s.strip() for s in args.stages.split(",") if s.strip()]
    if set(args.stage_list) - set(STAGES):
        p.error(f"--stages: unknown {sorted(set(args.stage_list) - set(STAGES))}")
    if not args.win_threshold > args.lose_threshold:
        p.error("--win-threshold must be above --lose-threshold (eq. 4's win and lose sets are disjoint)")
    return args


# ============================================================================ training
def train(args, rank, world, out):
    """SFT warm-up, then per iteration generate -> stage 1 -> stage 2 -> OUT/final/, then the test scores."""
    # ---- data
    sft_records, questions, test_path, skipped = load_records(args)
    test = run.records(test_path, args.skip_bad, task="vqa")[0] if test_path else []
    if rank == 0:
        print(f"[visrl] {len(sft_records)} SFT records, {len(questions)} RL questions ({skipped} skipped), {len(test)} "
              f"test records, {world} rank(s), K {args.attempts}, iters {args.iters}, stages {args.stage_list}")
        if not test:
            print("[visrl] warning: no --test manifest: the run ends without an evaluation", file=sys.stderr)

    # ---- resume: finished stages are skipped, the newest saved model is the policy, logs are cut back
    state = run.resume(out, args, None, LOGGED, fresh=("stages.jsonl", "eval.json", "predictions.jsonl", "iter*",
                                                     "sft", "final"))
    state.setdefault("done", [])
    latest = next((out / p for p in reversed(state["done"]) if not p.endswith("generate")), args.model)

    # ---- models: the policy (a DeepSpeed engine) and the critic = the pre-SFT model, frozen
    engine, processor = run.policy(args, latest, micro_batch=args.batch_size)
    critic = "oracle" if args.critic == "oracle" else run.reference_model(args.critic or args.model, args,
                                                                          engine.device, with_processor=True)
    run.open_tracker(args, out, rank)
    # a sample whose prompt cannot be processed is skipped (OUT/skipped.jsonl), never fatal
    problem = lambda r: sample_problem(r, processor, args.max_prompt_len)  # noqa: E731
    sft_records, _ = run.usable(sft_records, problem, rank, world, out, split="sft")
    questions, _ = run.usable(questions, problem, rank, world, out)
    scores = run.read_jsonl(out / "stages.jsonl") if state["done"] else []

    def score(name):
        """Test scores of the current policy -> OUT/stages.jsonl (the SFT / +stage 1 / +stage 2 table)."""
        if args.stage_eval_n and test:
            metrics, _ = evaluate(engine.module, processor, test[:args.stage_eval_n], args, rank, world, critic)
            scores.append(dict(metrics, stage=name))
            if rank == 0:
                print(f"[visrl] {name}: answer accuracy {metrics['answer_accuracy']:.3f}, "
                      f"box accuracy {metrics['box_accuracy']}")
                data.write_jsonl(out / "stages.jsonl", scores)
                run.log(out, rank, dict(metrics, step=state["step"], stage=f"eval/{name}"))

    if "base" not in state["done"]:
        score("base")
        state["done"].append("base")
        run.save_checkpoint(out, state, None, LOGGED)

    # ---- the stages, one flat loop: SFT warm-up, then per iteration generate -> stage 1 -> stage 2
    pairs = None
    for stage in stage_plan(args):
        if stage in state["done"]:
            continue
        iteration, _, kind = stage.rpartition("/")       # "iter1/stage2" -> ("iter1", "stage2"); "sft" -> ("", "sft")
        if kind == "sft":                                # 0. SFT warm-up
            if not sft_records:
                raise SystemExit("[visrl] the SFT warm-up needs boxed records (--sft-data, or boxes in --data)")
            sft_stage(engine, processor, sft_records, args, rank, world, out, state)
        elif kind == "generate":                         # 1.-2. data generation + filter
            pairs = generation_round(engine, critic, processor, questions, args, rank, world, out, state, iteration)
        else:                                            # 3.-4. stage 1 (box DPO) / stage 2 (step DPO)
            pairs = run.read_jsonl(out / iteration / "pairs.jsonl") if pairs is None else pairs   # --resume
            if pairs:                                    # reference: the model the stage starts from
                ref = None if args.lora_rank else run.reference_model(latest, args, engine.device)
                dpo_stage(engine, ref, processor, pairs, int(kind[-1]), args, rank, world, out, state, stage)
                del ref
        if kind != "generate":                           # save the stage's model, score it
            engine, latest = next_policy(engine, processor, out, stage, args), out / stage
            score(stage)
        state["done"].append(stage)
        run.save_checkpoint(out, state, None, LOGGED)

    # ---- save + evaluate
    final = run.save_final(engine, processor, out)
    if test:
        metrics, preds = evaluate(engine.module, processor, test[:args.n_test], args, rank, world, critic)
        if rank == 0:
            (out / "eval.json").write_text(json.dumps(dict(metrics, model=str(final), test=str(test_path)), indent=1))
            data.write_jsonl(out / "predictions.jsonl", preds)
            print(f"[visrl] final: {json.dumps(metrics)}")
    if rank == 0:
        try:
            run.plot(out, keys=["loss", "reward_accuracy", "margin"])
        except Exception as e:          # a picture must never fail a finished run
            print(f"[visrl] no plot: {e}")
        print(f"[visrl] model in {final}")


def load_records(args):
    """(SFT records, RL questions, test manifest or None, skipped count); default: shapes-world VQA. With
    --sft-data every --data record is an RL question (the paper: 30k boxed VisCoT samples for SFT, 180k
    plain QA pairs for RL); else a --sft-fraction of --data's boxed records is held out for SFT (the
    other records' boxes then only grade the pairs, never train)."""
    world = None if args.data else run.shapes_world(args.seed, n_train=512, n_test=512)   # more than the default
    train_path = run.manifest_path(args.data, "train", args.seed, "vqa", world=world)
    test_path = run.manifest_path(args.test, "test", args.seed, "vqa", world=world) if args.test or not args.data \
        else None
    records, _, skipped = run.records(train_path, args.skip_bad, task="vqa")
    if args.sft_data:
        sft, _, _ = run.records(args.sft_data, args.skip_bad, task="vqa")
        return [r for r in sft if r.get("box") is not None], records, test_path, skipped
    boxed = [i for i, r in enumerate(records) if r.get("box") is not None]
    random.Random(args.seed).shuffle(boxed)
    take = set(boxed[:round(args.sft_fraction * len(boxed))])
    questions = [r for i, r in enumerate(records) if i not in take] if args.sft_fraction < 1 else records
    return [records[i] for i in sorted(take)], questions, test_path, skipped


def stage_plan(args):
    """The stages in order: "sft", then per iteration "iter{k}/generate", "iter{k}/stage1", "iter{k}/stage2"
    (--stages picks the trained ones). Every stage but generate saves a model."""
    plan = ["sft"] if "sft" in args.stage_list else []
    for it in range(1, args.iters + 1):
        plan += [f"iter{it}/generate"] + [f"iter{it}/{s}" for s in ("stage1", "stage2") if s in args.stage_list]
    return plan


def next_policy(engine, processor, out, stage, args):
    """Save the stage's model to OUT/<stage> and return the engine the next stage trains. With LoRA the
    adapters are folded into the weights and the next stage trains fresh ones on the merged model (the
    authors' released code does so): a new engine, loaded from the saved folder."""
    run.save_final(engine, processor, out, stage)
    if not args.lora_rank:
        return engine
    engine.destroy()
    return run.policy(args, out / stage, micro_batch=args.batch_size)[0]


# ============================================================================ boxes and the chat
def norm_box(box, width, height):
    """Pixel box -> normalised [x1,y1,x2,y2] in 0..1 (clipped)."""
    return [min(max(v / s, 0.0), 1.0) for v, s in zip(box, (width, height, width, height))]


def pixel_box(box, width, height):
    """Normalised box -> pixels of a width x height image."""
    return [box[0] * width, box[1] * height, box[2] * width, box[3] * height]


def canonical_box(text_or_box, shapes=False):
    """(text, box) of the first box of a model output (or of 4 numbers), clipped to 0..1: the text as it
    is written into the chat and the DPO targets, the box as it is cropped and scored.
    Real data: the box as the model wrote it, never rounded (a 3-decimal VisCoT box of a small text
    line must not lose its IoU), the text VisCoT's and VisRL's '[0.123, 0.456, 0.789, 0.901]'.
    Shapes world (shapes=True): both rounded to 2 decimals, '[0.12,0.46,0.79,0.90]', the tiny base's format.
    (None, None) if unparsable, inverted or empty (after rounding: "[0.3,0.3,0.301,0.5]" in the shapes world)."""
    box = (rewards.parse_boxes(text_or_box) or [None])[0] if isinstance(text_or_box, str) \
        else rewards.valid_box(text_or_box)
    if box is not None:
        box = [min(max(v, 0.0), 1.0) for v in box]
        box = [round(v, 2) for v in box] if shapes else box
    if box is None or box[2] <= box[0] or box[3] <= box[1]:
        return None, None
    return (data.format_norm_box(box, 1, 1) if shapes else data.format_viscot_box(box)), box


def crop(image, box):
    """Crop of a normalised box (rounded outwards to whole pixels), or None if it has no pixel. A thin
    strip the processor could not take (aspect ratio over 200) is padded with white (data.fit_image)."""
    c = rewards.crop_box(image, pixel_box(box, *image.size))
    return data.fit_image(c) if c is not None else None


# Real data: the layout of the released code's messages as LLaMA-Factory renders them for Qwen2-VL:
# "<image>\n{question} Please first ... better." (step 1) and the same + "\n<image>" (step 2), each <image>
# one picture (data_gen/generate.py, preprocess/sft_format_round2.py).
def box_turn(question, shapes=False):
    """Step 1's prompt: the image, then the question with the CoT instruction (data.VISRL_QUESTION; shapes
    world: data.VISRL_BOX_PROMPT)."""
    if shapes:
        return [vlm.user_turn(data.VISRL_BOX_PROMPT.format(question=question))]
    return [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "\n" + data.VISRL_QUESTION.format(question=question)}]}]


def answer_turns(question, box_text, shapes=False):
    """Step 2's prompt; images, in placeholder order: [full image, crop of the box].
    Real data (the paper: "the cropped region ..., together with the original image and the question, is
    fed into the multimodal model"; the released code): ONE new user turn, step 1's text between the image
    and the crop; the box is not in it (box_text unused). Shapes world: step 1, the box as the assistant's
    reply, then the crop and data.VISRL_ANSWER_PROMPT (the tiny base's two-turn chat)."""
    if shapes:
        return box_turn(question, True) + [vlm.assistant_turn(box_text),
                                           vlm.user_turn(data.VISRL_ANSWER_PROMPT.format(question=question))]
    text = "\n" + data.VISRL_QUESTION.format(question=question) + "\n"
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}, {"type": "image"}]}]


def sft_examples(record, image):
    """[(conversation, images)] of the SFT warm-up with the GT box, the loss on every assistant reply.
    Real data: two single-turn examples, as the released code's SFT data (sft_format_round1/round2):
    step 1 -> the box (VisCoT's 3 decimals), step 2 (image, question, crop of the box) -> the answer.
    Shapes world: the two-turn chat (box, then crop and answer) the tiny base knows."""
    shapes = data.is_shapes([record])
    box_text, box = canonical_box(norm_box(record["box"], *image.size), shapes)
    answer = [vlm.assistant_turn(record["answer"])]
    if shapes:
        return [(answer_turns(record["question"], box_text, True) + answer, [image, crop(image, box)])]
    return [(box_turn(record["question"]) + [vlm.assistant_turn(box_text)], [image]),
            (answer_turns(record["question"], box_text) + answer, [image, crop(image, box)])]


# ============================================================================ generation + critic
# Counted in OUT/iter{k}/stats.json: why a sampled box gives no candidate (generate_candidates; a
# critic_unparsable candidate had a judgement parse_score could not read: the released filter drops those),
# and the conditions a question's candidates must meet to give a pair, in order (select_pair).
DROPPED = ("unparsable", "no_crop", "no_diverse_box", "too_long", "critic_unparsable")
FILTERS = ["questions", "with_candidates", "win_set", "lose_set", "chosen_holds_both_max", "rejected_holds_both_min"]


def diversify_box(b1, b2, rng, iou_thresh=0.05, size_tol=0.3, mode="area", max_tries=100, widen=0.1,
                  widen_every=20):
    """VisRL's diversity controller (paper eq. 3) on normalised boxes: b2 if IoU(b1, b2) <= iou_thresh,
    else a random box inside [0,1]^2 that does not overlap b1 (touching edges is allowed), of b1's size
    within a tolerance tol:
      mode "area" (the paper: "an area differing by no more than delta compared to b1"): its area drawn
      uniformly in [(1 - tol), (1 + tol)] x b1's (and at most what fits the image), its aspect ratio
      b1's (the paper leaves the shape open);
      mode "sides" (the released code, generate_random_bounding_box): its width and height drawn
      independently, each within +-tol of b1's (and at most 1).
    tol starts at size_tol and widens by `widen` after every `widen_every` failed tries (the released
    code's schedule); the position is uniform over where the box fits. After `max_tries`: None (the
    caller drops it). rng: a random.Random, at most 4 of its uniform() draws a try."""
    if mode not in ("area", "sides"):
        raise ValueError(f"diversity mode {mode!r}: 'area' or 'sides'")
    if rewards.box_iou(b1, b2) <= iou_thresh:
        return list(b2)
    w1, h1 = b1[2] - b1[0], b1[3] - b1[1]
    for t in range(max_tries):
        tol = size_tol + widen * (t // widen_every)
        if mode == "area":            # scale both sides by s, s^2 (the area ratio) uniform in its range
            lo, hi = max(1 - tol, 0.0), min(1 + tol, 1 / w1 ** 2, 1 / h1 ** 2)
            if lo >= hi:
                continue
            s = math.sqrt(rng.uniform(lo, hi))
            w, h = min(w1 * s, 1.0), min(h1 * s, 1.0)
        else:
            w_lo, w_hi = max(w1 * (1 - tol), 0.0), min(w1 * (1 + tol), 1.0)
            h_lo, h_hi = max(h1 * (1 - tol), 0.0), min(h1 * (1 + tol), 1.0)
            if w_lo >= w_hi or h_lo >= h_hi:      # even the smallest allowed box is wider than the image
                continue
            w, h = rng.uniform(w_lo, w_hi), rng.uniform(h_lo, h_hi)
        if w <= 0 or h <= 0:
            continue
        x1, y1 = rng.uniform(0.0, 1.0 - w), rng.uniform(0.0, 1.0 - h)
        box = [x1, y1, min(x1 + w, 1.0), min(y1 + h, 1.0)]
        if box[2] <= b1[0] or box[0] >= b1[2] or box[3] <= b1[1] or box[1] >= b1[3]:
            return box
    return None


def sample_problem(rec, processor, max_prompt_len=None):
    """Why a question's first prompt cannot be processed (too long, a bad image), or None: it is skipped."""
    try:
        image = data.open_image(rec["image_path"])
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return vlm.prompt_problem(processor, box_turn(rec["question"], data.is_shapes([rec])), [image], max_prompt_len)


def critic_conversations(items):
    """The critic's two prompts per item {question, reference, answer, shapes?}, each one user turn, the
    picture first: s_b's (does the crop hold what the reference answer needs? it sees the crop alone) and
    s_r's (how close is the answer to the reference? it sees the full image) -> (box convs, answer convs).
    Real data: the released judge prompts word for word (data.VISRL_JUDGE_BOX_PROMPT, _ANSWER_PROMPT);
    shapes world: data.CRITIC_BOX_PROMPT, CRITIC_ANSWER_PROMPT (the tiny base's)."""
    box, ans = [], []
    for it in items:
        shapes = it.get("shapes", False)
        box.append([vlm.user_turn((data.CRITIC_BOX_PROMPT if shapes else data.VISRL_JUDGE_BOX_PROMPT).format(
            question=it["question"], answer=it["reference"]))])
        ans.append([vlm.user_turn((data.CRITIC_ANSWER_PROMPT if shapes else data.VISRL_JUDGE_ANSWER_PROMPT).format(
            question=it["question"], reference=it["reference"], answer=it["answer"]))])
    return box, ans


# A judgement is '{"score": 0.8}' (about 8 tokens; 16 with a ```json fence): 64 new tokens leave room for a
# short preamble, and a judge that would need more is not answering in the asked format. The released
# judge ran greedy with its server's default of 1024 new tokens.
CRITIC_MAX_NEW_TOKENS = 64


def critic_scores(critic, items, batch_size=32, max_new_tokens=CRITIC_MAX_NEW_TOKENS):
    """Critic scores (greedy, sec. 3.1, app. C) of items {question, reference, answer, image, crop,
    shapes?} (critic_conversations): s_b from the crop alone, s_r from the full image, each read by
    rewards.parse_score: a float in [0, 1], or None when unreadable (the caller drops the candidate)
    -> (s_b, s_r, raw texts). critic: (model, processor): the critic's prompts are tokenized by its
    own processor."""
    model, processor = critic
    model = getattr(model, "module", model)             # a DeepSpeed inference engine under ZeRO-3
    box_convs, answer_convs = critic_conversations(items)
    raw_b = generate_texts(model, processor, box_convs, [[it["crop"]] for it in items], 1, max_new_tokens, 0,
                           batch_size=batch_size)
    raw_r = generate_texts(model, processor, answer_convs, [[it["image"]] for it in items], 1, max_new_tokens, 0,
                           batch_size=batch_size)
    return [rewards.parse_score(t) for t in raw_b], [rewards.parse_score(t) for t in raw_r], list(zip(raw_b, raw_r))


def oracle_scores(items, records, boxes):
    """--critic oracle (NOT VisRL: a diagnostic): s_b = 1 if the box holds half of the GT box (0 without
    one), s_r = 1 if the answer matches the reference after normalisation. How good could the pairs be?"""
    s_b = [float(r.get("box") is not None and rewards.covers(b, norm_box(r["box"], *it["image"].size)))
           for it, r, b in zip(items, records, boxes)]
    s_r = [float(rewards.normalise_answer(it["answer"]) == rewards.normalise_answer(it["reference"])) for it in items]
    return s_b, s_r


def generate_candidates(policy, critic, processor, records, args, rng):
    """Steps 1-2 (sec. 3.1) for one rank's questions: per batch ONE generate call samples K x (b1, b2)
    each, b2 is diversified, every box cropped and answered (one more call), each answer critic-scored.
    -> per question {id, question, answer, image, size, gt_box?, candidates: [{box, attempt, which,
    diversified, answer, s_b, s_r}], dropped: {DROPPED name: count}, shapes}. Shapes-world records
    (data.is_shapes) get the shapes world's prompts and 2-decimal boxes, the others the papers'."""
    K, B, out = args.attempts, args.gen_batch_size, []
    mode = getattr(args, "diversity", "area")
    for s in range(0, len(records), B):
        chunk = records[s:s + B]
        images = [data.open_image(r["image_path"]) for r in chunk]
        shapes = [data.is_shapes([r]) for r in chunk]
        texts = generate_texts(policy, processor, [box_turn(r["question"], sh) for r, sh in zip(chunk, shapes)],
                                   [[im] for im in images], 2 * K, args.max_new_tokens, args.temperature,
                                   args.max_prompt_len)
        results, cands = [], []                    # cands: (question index, candidate, its crop)
        for i, (rec, im) in enumerate(zip(chunk, images)):
            res = {"id": rec["id"], "question": rec["question"], "answer": rec["answer"], "image": rec["image_path"],
                   "size": list(im.size), "candidates": [], "dropped": dict.fromkeys(DROPPED, 0), "shapes": shapes[i]}
            if rec.get("box") is not None:
                res["gt_box"] = [round(v, 4) for v in norm_box(rec["box"], *im.size)]
            results.append(res)
            for k in range(K):
                j = 2 * (i * K + k)                # texts: 2K per question, b1 and b2 of each attempt
                b1, b2 = canonical_box(texts[j], shapes[i])[1], canonical_box(texts[j + 1], shapes[i])[1]
                res["dropped"]["unparsable"] += (b1 is None) + (b2 is None)
                diversified = False
                if b1 is not None and b2 is not None:
                    new = diversify_box(b1, b2, rng, args.iou_thresh, args.size_tol, mode)
                    res["dropped"]["no_diverse_box"] += new is None
                    diversified = new is not None and new != b2
                    b2 = canonical_box(new, shapes[i])[1] if new is not None else None
                for which, b in (("b1", b1), ("b2", b2)):
                    c = crop(im, b) if b is not None else None
                    res["dropped"]["no_crop"] += b is not None and c is None
                    if c is not None:
                        cands.append((i, {"box": b, "attempt": k, "which": which,
                                          "diversified": diversified and which == "b2"}, c))
        out += results
        if not cands:
            continue
        answers = generate_texts(                    # step 2: answer every (box, crop), sampled
            policy, processor, [answer_turns(chunk[i]["question"], canonical_box(c["box"], shapes[i])[0], shapes[i])
                                for i, c, _ in cands],
            [[images[i], cr] for i, _, cr in cands], 1, args.answer_max_new_tokens, args.answer_temperature,
            args.max_prompt_len, 2 * B)
        for (i, _, _), a in zip(cands, answers):   # None: the answer prompt is over --max-prompt-len
            results[i]["dropped"]["too_long"] += a is None
        kept = [(i, c, cr, a.strip()) for (i, c, cr), a in zip(cands, answers) if a is not None]
        items = [{"question": chunk[i]["question"], "reference": chunk[i]["answer"], "answer": a,
                  "image": images[i], "crop": cr, "shapes": shapes[i]} for i, _, cr, a in kept]
        s_b, s_r = oracle_scores(items, [chunk[i] for i, *_ in kept], [c["box"] for _, c, *_ in kept]) \
            if critic == "oracle" else critic_scores(critic, items)[:2]
        for (i, c, _, a), sb, sr in zip(kept, s_b, s_r):
            if sb is None or sr is None:           # an unreadable judgement: dropped, never a 0 (the lose set)
                results[i]["dropped"]["critic_unparsable"] += 1
                continue
            results[i]["candidates"].append(dict(c, answer=a, s_b=sb, s_r=sr))
    return out


# ============================================================================ filter + selection
def select_pair(candidates, win=0.8, lose=0.2):
    """VisRL eq. 4 and the text after it (sec. 3.1) for one question: W = {c : s_b >= win and s_r >= win},
    L = {c : s_b <= lose and s_r <= lose}; kept iff both are non-empty, W holds a candidate with the
    maximum of BOTH scores within W (chosen) and L one with the minimum of both within L (rejected;
    ties: the first). -> (chosen index, rejected index, the first FILTERS condition failed or "ok")."""
    if not win > lose:
        raise ValueError(f"the win threshold ({win}) must be above the lose threshold ({lose})")
    if not candidates:
        return None, None, "with_candidates"
    W = [i for i, c in enumerate(candidates) if c["s_b"] >= win and c["s_r"] >= win]
    if not W:
        return None, None, "win_set"
    L = [i for i, c in enumerate(candidates) if c["s_b"] <= lose and c["s_r"] <= lose]
    if not L:
        return None, None, "lose_set"
    best_b, best_r = max(candidates[i]["s_b"] for i in W), max(candidates[i]["s_r"] for i in W)
    chosen = [i for i in W if candidates[i]["s_b"] == best_b and candidates[i]["s_r"] == best_r]
    if not chosen:
        return None, None, "chosen_holds_both_max"
    low_b, low_r = min(candidates[i]["s_b"] for i in L), min(candidates[i]["s_r"] for i in L)
    rejected = [i for i in L if candidates[i]["s_b"] == low_b and candidates[i]["s_r"] == low_r]
    if not rejected:
        return None, None, "rejected_holds_both_min"
    return chosen[0], rejected[0], "ok"


def quality(pair, iou=0.5):
    """The paper's data-quality class of a pair (Tab. 6) from its boxes' IoU with the GT box:
    "WP-LN" = chosen box positive (IoU >= iou), rejected negative, etc. None without a GT box."""
    if pair.get("gt_box") is None:
        return None
    w = "WP" if rewards.box_iou(pair["chosen"]["box"], pair["gt_box"]) >= iou else "WN"
    l = "LP" if rewards.box_iou(pair["rejected"]["box"], pair["gt_box"]) >= iou else "LN"  # noqa: E741
    return f"{w}-{l}"


def make_pairs(questions, win=0.8, lose=0.2, quality_iou=0.5):
    """Candidates of every question -> (pairs, survivors after each condition of select_pair, in
    FILTERS order, data-quality fractions)."""
    failed, pairs = dict.fromkeys(FILTERS, 0), []
    for q in questions:
        ci, ri, reason = select_pair(q["candidates"], win, lose)
        if reason != "ok":
            failed[reason] += 1
            continue
        pair = {k: q[k] for k in ("id", "question", "answer", "image", "size", "shapes") if k in q}
        pair.update(chosen=q["candidates"][ci], rejected=q["candidates"][ri], gt_box=q.get("gt_box"))
        pair["quality"] = quality(pair, quality_iou)
        pairs.append(pair)
    survivors = {name: len(questions) - sum(failed[f] for f in FILTERS[:k + 1]) for k, name in enumerate(FILTERS)}
    graded = [p for p in pairs if p["quality"]]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    fractions = {k: mean([p["quality"] == k for p in graded]) for k in ("WP-LP", "WP-LN", "WN-LP", "WN-LN")}
    fractions.update(graded=len(graded),        # and how close to the GT box the two sides are on average
                     chosen_gt_iou=mean([rewards.box_iou(p["chosen"]["box"], p["gt_box"]) for p in graded]),
                     rejected_gt_iou=mean([rewards.box_iou(p["rejected"]["box"], p["gt_box"]) for p in graded]))
    return pairs, survivors, fractions


def generation_round(engine, critic, processor, questions, args, rank, world, out, state, it_name):
    """Steps 1-2 of iteration `it_name` ("iter1") -> OUT/iter{k}/: candidates.jsonl (resumable), pairs.jsonl,
    stats.json, examples/; --pairs replaces iteration 1's. Returns all the pairs, on every rank."""
    folder, t0 = out / it_name, time.time()
    folder.mkdir(parents=True, exist_ok=True)
    if it_name == "iter1" and args.pairs:
        pairs = run.read_jsonl(args.pairs)
        stats = {"survivors": {"given": len(pairs)}, "quality": {}}
    else:
        rng = random.Random(args.seed + 1000 * rank + int(it_name[4:]))
        generate = lambda mine: generate_candidates(engine.module, critic, processor, mine, args, rng)  # noqa: E731
        done = run.map_jsonl(questions, generate, folder / "candidates.jsonl", rank, world,
                             args.gen_batch_size * world, f"{it_name} generate")
        generated = [done[q["id"]] for q in questions if q["id"] in done]
        pairs, survivors, fractions = make_pairs(generated, args.win_threshold, args.lose_threshold, args.quality_iou)
        cands = [(c, q) for q in generated for c in q["candidates"]]
        mean = lambda xs: sum(xs) / max(len(cands), 1)  # noqa: E731
        stats = {"survivors": survivors, "quality": fractions, "candidates": len(cands),
                 "dropped": {k: sum(q["dropped"][k] for q in generated) for k in DROPPED},
                 "diversified": sum(c["diversified"] for c, _ in cands),
                 "mean_s_b": mean(c["s_b"] for c, _ in cands), "mean_s_r": mean(c["s_r"] for c, _ in cands),
                 # how often the critic's s_r agrees with a plain normalised match (a check on the critic)
                 "critic_sr_agreement": mean((c["s_r"] >= 0.5) == (rewards.normalise_answer(c["answer"]) ==
                                                                   rewards.normalise_answer(q["answer"]))
                                             for c, q in cands),
                 "seconds": round(time.time() - t0, 1)}
        if rank == 0:
            save_examples(pairs, folder / "examples", args.n_examples)
        # the sampled candidates with their critic scores: OUT/completions.jsonl and a table in the tracker
        rows = [{"id": q["id"], "box": c["box"], "answer": c["answer"], "s_b": c["s_b"], "s_r": c["s_r"]}
                for c, q in cands] if rank == 0 else []
        run.log_completions(out, rank, state["step"], rows, 1 if args.log_completions_every else 0)
    if rank == 0:
        data.write_jsonl(folder / "pairs.jsonl", pairs)          # written even when no pair survived
        (folder / "stats.json").write_text(json.dumps(stats, indent=1))
        run.log(out, rank, {"step": state["step"], "stage": f"{it_name}/generate", "pairs": len(pairs),
                            **{f"survive_{k}": v for k, v in stats["survivors"].items()},
                            **{f"quality_{k}": v for k, v in stats["quality"].items()},
                            **{k: stats[k] for k in ("candidates", "mean_s_b", "mean_s_r", "critic_sr_agreement")
                               if k in stats}})
        print(f"[visrl] {it_name}: {len(pairs)} pairs; survivors {stats['survivors']}; quality {stats['quality']}")
    return pairs


def save_examples(pairs, folder, n=8):
    """PNG per pair: the image with the chosen (green), rejected (red) and GT (blue) boxes."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in pairs[:n]:
        c, r = p["chosen"], p["rejected"]
        box_picture(folder / (re.sub(r"[^A-Za-z0-9_.-]", "_", str(p["id"])) + ".png"), data.open_image(p["image"]),
                        [(p["gt_box"], "blue"), (r["box"], "red"), (c["box"], "green")],
                        [(p["question"][:48], "black"),
                         (f"win: {c['answer'][:14]} sb {c['s_b']:.1f} sr {c['s_r']:.1f}", "green"),
                         (f"lose: {r['answer'][:14]} sb {r['s_b']:.1f} sr {r['s_r']:.1f}", "red")])


# ============================================================================ SFT + step-level DPO
def sft_stage(engine, processor, records, args, rank, world, out, state):
    """SFT warm-up on the GT boxes (sft_examples), next-token loss on every assistant turn."""
    def loss_fn(batch):
        convs, images = zip(*[ex for r in batch for ex in sft_examples(r, data.open_image(r["image_path"]))])
        return vlm.sft_loss(engine, processor, list(convs), list(images)), {}
    train_stage(engine, records, loss_fn, "sft", args.sft_lr, args.sft_epochs, args.sft_batch_size, args.seed,
                args, rank, world, out, state)


def box_step(pairs, images):
    """Stage 1's DPO data (eqs. 5-6): x = image + question + instruction, y = box text -> (convs, images, y_w, y_l)."""
    shapes = [p.get("shapes", False) for p in pairs]           # pairs of make_pairs say; a --pairs file may not
    convs = [box_turn(p["question"], sh) for p, sh in zip(pairs, shapes)]
    return (convs, [[im] for im in images], [canonical_box(p["chosen"]["box"], sh)[0] for p, sh in zip(pairs, shapes)],
            [canonical_box(p["rejected"]["box"], sh)[0] for p, sh in zip(pairs, shapes)])


def answer_step(pairs, images):
    """Stage 2's answer-step DPO data (eq. 7): x = image, question, the WINNING box and its crop for BOTH
    answers (the rejected one was produced from its own crop, but is scored in the winner's context)."""
    convs = [answer_turns(p["question"], canonical_box(p["chosen"]["box"], p.get("shapes", False))[0],
                          p.get("shapes", False)) for p in pairs]
    ims = [[im, crop(im, p["chosen"]["box"])] for p, im in zip(pairs, images)]
    return convs, ims, [p["chosen"]["answer"] for p in pairs], [p["rejected"]["answer"] for p in pairs]


def step_dpo_batch(model, ref, processor, steps, beta=0.1, nll_weight=0.0, device=None, max_prompt_len=None):
    """VisRL's step-level DPO loss of one batch (dpo.step_dpo_loss), from the model: steps = [box step]
    (stage 1, weight 1) or [box step, answer step] (stage 2, 0.5 each), each (convs, images, chosen texts,
    rejected texts) as vlm.pair_logps takes them. nll_weight > 0 adds that x the chosen steps' per-token
    NLL, same weights (RPO, Pang et al. 2024; not in VisRL). Returns (loss, stats)."""
    weights = [1.0] if len(steps) == 1 else [0.5, 0.5]
    logps = [vlm.pair_logps(model, ref, processor, *step, device, max_prompt_len) for step in steps]
    loss, stats = dpo.step_dpo_loss(logps[0], logps[1] if len(steps) == 2 else None, beta=beta, box_weight=weights[0])
    if nll_weight:
        nll = sum(w * chosen_nll(processor, step[2], lp[0]) for w, step, lp in zip(weights, steps, logps))
        loss, stats["nll"] = loss + nll_weight * nll, nll.item()
    return loss, stats


def chosen_nll(processor, targets, logp):
    """Mean per-token negative log-likelihood of the chosen targets (for --nll-weight), a scalar."""
    tok = processor.tokenizer
    lengths = torch.tensor([len(tok.encode(t, add_special_tokens=False)) + 1 for t in targets], device=logp.device)
    return (-logp / lengths).mean()


def dpo_stage(engine, ref, processor, pairs, stage, args, rank, world, out, state, name):
    """Stage 1 (box DPO, eqs. 5-6) or stage 2 (0.5 box DPO + 0.5 answer DPO, eqs. 7-10) over `pairs`
    (every rank has all of them). ref None: the policy with its LoRA adapters off."""
    def loss_fn(batch):
        images = [data.open_image(p["image"]) for p in batch]
        steps = [box_step(batch, images)] + ([answer_step(batch, images)] if stage == 2 else [])
        loss, stats = step_dpo_batch(engine, ref, processor, steps, args.beta, args.nll_weight, engine.device,
                                     args.max_prompt_len)
        stats["reward_accuracy"], stats["margin"] = stats["box_reward_accuracy"], stats["box_margin"]  # plotted
        return loss, stats
    train_stage(engine, pairs, loss_fn, name, args.lr, args.dpo_epochs, args.batch_size, args.seed + stage, args,
                rank, world, out, state)


def train_stage(engine, items, loss_fn, name, lr, epochs, per_rank, seed, args, rank, world, out, state):
    """One training stage, as a separate run would train it (run.new_stage: a fresh AdamW at `lr` and
    --lr-scheduler): `epochs` passes over `items` in a seeded order, per_rank items a rank a micro-step,
    at most --max-steps updates of --grad-accum micro-steps, guarded updates (vlm.update), the last
    (maybe partial) accumulation window applied at its end. loss_fn(batch) -> (loss, stats dict); one
    metrics.jsonl line a micro-step, numbered on from state["step"]."""
    total = math.ceil(epochs * len(items) / (per_rank * world)) if items else 0
    total = min(total, args.max_steps * args.grad_accum) if args.max_steps else total
    run.new_stage(engine, lr, math.ceil(total / args.grad_accum), args)
    order, first = run.data_order(len(items), seed), state["step"]
    engine.train()
    for k in tqdm(range(total), desc=name, disable=rank != 0):
        t0 = time.time()
        loss, stats = loss_fn(run.step_items(items, order, k, per_rank, rank, world))
        skipped = vlm.update(engine, loss, vlm.accumulation(k, total, args.grad_accum))
        state["skipped_in_a_row"] = state.get("skipped_in_a_row", 0) + 1 if skipped else 0
        if state["skipped_in_a_row"] >= 3:
            raise RuntimeError(f"3 non-finite losses in a row in {name}: stopping. Lower --lr, or check the data.")
        run.log(out, rank, dict(stats, step=first + k, stage=name, loss=loss.item(), skipped=skipped,
                                updates=engine.global_steps, lr=run.current_lr(engine), seconds=round(time.time() - t0, 2)))
    state["step"] = first + total


# ============================================================================ evaluation
@torch.no_grad()
def evaluate(model, processor, records, args, rank=0, world=1, critic=None, batch_size=16):
    """Greedy two-step inference on `records` (sharded over ranks, gathered on all) -> (metrics, predictions).
    Answer accuracy: normalised exact match; for long reference answers (> 3 words) the critic's
    s_r >= 0.5 when a critic is given (an unreadable judgement: wrong, counted in critic_unparsable).
    Over the records with a GT box: box accuracy (IoU >= 0.5), mean IoU, box coverage (the box holds half
    of the GT box or more), from the predicted box as written (never rounded; shapes world: 2 decimals);
    an unparsable box is wrong for all of them. A record whose prompt cannot be processed is skipped,
    counted and listed."""
    mine, preds, skipped = run.shard(records, rank, world), [], []
    for s in range(0, len(mine), batch_size):
        chunk, bad = run.partition(mine[s:s + batch_size], lambda r: sample_problem(r, processor, args.max_prompt_len))
        skipped += [{"id": r["id"], "question": r["question"], "skipped": why} for r, why in bad]
        if not chunk:
            continue
        images = [data.open_image(r["image_path"]) for r in chunk]
        shapes = [data.is_shapes([r]) for r in chunk]
        texts = generate_texts(model, processor, [box_turn(r["question"], sh) for r, sh in zip(chunk, shapes)],
                               [[im] for im in images], 1, args.max_new_tokens, 0, args.max_prompt_len)
        boxes = [canonical_box(t, sh) for t, sh in zip(texts, shapes)]    # (text, box) or (None, None)
        crops = [crop(im, b) if b is not None else None for im, (_, b) in zip(images, boxes)]
        ok, answers = [i for i, c in enumerate(crops) if c is not None], {}
        if ok:
            replies = generate_texts(model, processor, [answer_turns(chunk[i]["question"], boxes[i][0], shapes[i])
                                                        for i in ok], [[images[i], crops[i]] for i in ok],
                                     1, args.answer_max_new_tokens, 0, args.max_prompt_len)
            answers = {i: r.strip() for i, r in zip(ok, replies) if r is not None}   # None: prompt too long
        long = [i for i in answers if critic not in (None, "oracle") and rewards.is_long(chunk[i]["answer"])]
        judged = dict(zip(long, critic_scores(critic, [
            {"question": chunk[i]["question"], "reference": chunk[i]["answer"], "answer": answers[i],
             "image": images[i], "crop": crops[i], "shapes": shapes[i]} for i in long])[1])) if long else {}
        for i, (rec, im) in enumerate(zip(chunk, images)):
            box, ans = boxes[i][1] if i in answers else None, answers.get(i)
            gt = norm_box(rec["box"], *im.size) if rec.get("box") is not None else None
            correct = (judged[i] is not None and judged[i] >= 0.5) if i in judged else \
                (ans is not None and rewards.normalise_answer(ans) == rewards.normalise_answer(rec["answer"]))
            preds.append({"id": rec["id"], "question": rec["question"], "reference": rec["answer"],
                          "box_text": texts[i], "box": box, "answer": ans, "correct": bool(correct),
                          **({"critic_score": judged[i]} if i in judged else {}),
                          "gt_box": gt, "box_iou": rewards.box_iou(box, gt) if box and gt else (0.0 if gt else None)})
    preds, skipped = run.gather_records(preds), run.gather_records(skipped)
    with_gt = [p for p in preds if p["gt_box"] is not None]
    over_gt = lambda xs: sum(xs) / len(with_gt) if with_gt else None  # noqa: E731
    metrics = {"answer_accuracy": sum(p["correct"] for p in preds) / max(len(preds), 1),
               "box_accuracy": over_gt(p["box_iou"] >= 0.5 for p in with_gt),
               "mean_box_iou": over_gt(p["box_iou"] for p in with_gt),
               # ours, not the paper's: the box holds at least half of the GT box (the crop shows it)
               "box_coverage": over_gt(p["box"] is not None and rewards.covers(p["box"], p["gt_box"])
                                       for p in with_gt),
               "unparsable": sum(p["box"] is None for p in preds), "n": len(preds), "n_with_box": len(with_gt),
               "critic_unparsable": sum("critic_score" in p and p["critic_score"] is None for p in preds),
               "skipped_samples": len(skipped)}
    return metrics, preds + skipped


# ============================================================================ generation helpers
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


# ============================================================================ --eval
def evaluate_run(args, rank, world, out):
    """`--eval`: answer and box accuracy of --model on the test manifest -> OUT/eval.json, predictions.jsonl."""
    test_path = load_records(args)[2]                  # --test: a manifest or a shapes-world dataset name
    if test_path is None:
        raise SystemExit("visrl.py --eval --data X: name the test manifest with --test")
    test, _, _ = run.records(test_path, args.skip_bad, task="vqa")
    model, processor = vlm.load_model(args.model, max_pixels=args.max_pixels)
    critic = run.reference_model(args.critic, args, model.device, with_processor=True) \
        if args.critic and args.critic != "oracle" else None
    metrics, preds = evaluate(model, processor, test[:args.n_test], args, rank, world, critic)
    if rank == 0:
        (out / "eval.json").write_text(json.dumps(dict(metrics, model=str(args.model), test=str(test_path)), indent=1))
        data.write_jsonl(out / "predictions.jsonl", preds)
        print(json.dumps(metrics))
    return metrics


def main(argv=None):
    """VisRL training (SFT, then iterative step-level DPO), or with --eval only the evaluation of --model."""
    args = parse_args(argv)
    return (evaluate_run if args.eval else train)(args, *run.start(args, "visrl"))


if __name__ == "__main__":
    main()
    run.exit_finished()        # the run is complete: skip the interpreter's teardown
