"""visrl.py -- VisRL: intention-driven visual perception trained with iterative step-level DPO.

Paper: "VisRL: Intention-Driven Visual Perception via Reinforced Reasoning" (arXiv 2503.07523):
section 3.1 (data generation, eq. 4), 3.2 (step-level DPO, eqs. 5-7), 4.4, appendix C (critics).

The model answers in two steps (a "visual chain of thought"):
  step 1  image + question + instruction         -> a focus box "[x1,y1,x2,y2]", normalised 0..1
  step 2  ... + that box + the crop of that box  -> the answer

  0. SFT warm-up on the boxed subset: the two-turn chat (box, then crop + answer), loss on both
     assistant turns. The pre-SFT model is kept, frozen, as the CRITIC (self-evolution: no
     external judge).                                                          -> sft_phase()
  1. data generation with the current policy: per question K attempts, each two boxes b1, b2
     sampled at a high temperature; the diversity controller (eq. 3) replaces b2 by a random
     box away from b1 when they overlap (IoU > 0.05)                        -> diversify_box()
     each box is cropped and answered; the critic scores the crop alone (s_b: does it show
     what the reference answer needs?) and the answer (s_r: how close to the reference,
     given image + question), greedy, as {"score": x}                   -> generate_candidates()
  2. filter + selection (eq. 4): W = candidates with s_b and s_r >= 0.8, L = those with s_b and
     s_r <= 0.2; keep a question iff W and L are non-empty and W has a candidate holding the max
     of both scores (chosen), L one holding the min of both (rejected)
                                                                   -> select_pair(), make_pairs()
  3. stage 1: DPO on the box step (eq. 5-6), reference = the SFT model      -> dpo_phase(stage=1)
  4. stage 2: 0.5 DPO(box) + 0.5 DPO(answer) (eq. 7-10), both answers conditioned on the
     WINNING box and crop, reference = the stage-1 model                     -> dpo_phase(stage=2)
  5. --iters N: regenerate the pairs with the improved model and train again.
  6. evaluation: answer accuracy (normalised exact match; the critic for long answers) and
     box accuracy (IoU >= 0.5 with the GT box, where there is one)                -> evaluate()

    deepspeed visrl.py                                           # tiny base + shapes world, CPU, ~10 min
    deepspeed visrl.py --eval --model runs/visrl/final           # OUT/eval.json
    deepspeed --num_gpus 8 visrl.py --model Qwen/Qwen2-VL-7B-Instruct --data viscot_rl.jsonl \\
        --sft-data viscot_sft.jsonl --deepspeed ds_zero3.json    # the paper's setting (PAPER below)

-G/--num-generations is K (attempts per question, two boxes each); --lr/--beta are the DPO
stages' (--sft-lr the warm-up's); --max-steps caps the optimizer updates of every phase (default: epochs).
Every phase (SFT, stage 1, stage 2) trains as a separate run would: fresh AdamW, its own lr, and its
last (maybe partial) gradient-accumulation window applied before its model is saved.
--resume restarts at the newest finished phase (and skips questions already generated).

Outputs: OUT/sft/, OUT/iter{k}/{candidates,pairs}.jsonl, OUT/iter{k}/{stage1,stage2}/,
OUT/iter{k}/examples/*.png, OUT/metrics.jsonl, OUT/phases.json (test scores after every
phase), OUT/final/, OUT/eval.json + OUT/predictions.jsonl.
"""
import json
import math
import random
import re
import shutil
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import data
import dpo
import grpo
import rewards
import run
import vlm

# The paper prints no training hyper-parameters; PAPER takes them from the authors' released
# code (github.com/zhangquanchen/VisRL: configs/train_sft.yaml, configs/train_rl.yaml,
# data_gen/generate.py, data_gen/filter.py). Those configs train LoRA adapters (lora_target all,
# LLaMA-Factory's default rank 8) of Qwen2-VL-7B-Instruct at these rates: so does PAPER (--lora-rank 8;
# --lora-rank 0 fine-tunes all weights, which wants lower rates).
# K = 3 attempts x 2 boxes, temperature 2, thresholds 0.8 / 0.2, beta 0.1: paper + released code.
PAPER = dict(lr=5e-6, sft_lr=1e-4, sft_epochs=3.0, dpo_epochs=5.0, batch_size=3, grad_accum=8,
             sft_batch_size=2, num_generations=3, temperature=2.0, answer_temperature=2.0, iters=1,
             sft_fraction=1.0, gen_batch_size=8, phase_eval_n=0, max_new_tokens=64, answer_max_new_tokens=128,
             max_pixels=768 * 768, max_prompt_len=2048, lora_rank=8)
# Images: two per answer prompt (image + crop). The released configs leave the size to LLaMA-Factory,
# whose default cap is image_max_pixels = 768 x 768 (752 tokens each); their cutoff_len is 2048.
# One CPU, the tiny base, shapes world: about 5 minutes for `deepspeed visrl.py`.
TINY = dict(lr=2e-5, sft_lr=1e-4, sft_epochs=1.0, dpo_epochs=2.0, batch_size=8, grad_accum=1,
            sft_batch_size=8, num_generations=3, temperature=1.0, answer_temperature=1.0, iters=2,
            sft_fraction=0.25, gen_batch_size=16, phase_eval_n=512, max_new_tokens=32, answer_max_new_tokens=8,
            max_pixels=None, max_prompt_len=1024, lora_rank=0)


def parse_args(argv=None):
    p = run.common_args("visrl", __doc__.split("\n")[0])
    p.add_argument("--sft-data", default=None,
                   help="boxed VQA manifest for the SFT warm-up (default: a --sft-fraction of --data's "
                        "boxed records, which are then left out of the RL questions)")
    p.add_argument("--sft-fraction", type=float, default=None,
                   help="share of --data's boxed records used for SFT when no --sft-data is given")
    p.add_argument("--sft-lr", type=float, default=None)
    p.add_argument("--sft-epochs", type=float, default=None)
    p.add_argument("--sft-batch-size", type=int, default=None)
    p.add_argument("--dpo-epochs", type=float, default=None, help="epochs over the pairs, per stage")
    p.add_argument("--iters", type=int, default=None, help="rounds of generation + stage 1 + stage 2")
    p.add_argument("--stages", default="sft,stage1,stage2",
                   help="which of sft,stage1,stage2 to run (the paper's ablations: e.g. sft,stage2)")
    p.add_argument("--answer-temperature", type=float, default=None, help="sampling temperature of answers")
    p.add_argument("--answer-max-new-tokens", type=int, default=None,
                   help="answer length limit (--max-new-tokens limits the box step)")
    p.add_argument("--gen-batch-size", type=int, default=None, help="questions per generate() call per rank")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="train LoRA adapters of this rank on the language model's linear layers (peft; 0: all "
                        "weights). The released configs: rank 8 (LLaMA-Factory's default), alpha 2 x rank")
    p.add_argument("--win-threshold", type=float, default=0.8, help="tau_w for s_b and s_r")
    p.add_argument("--lose-threshold", type=float, default=0.2, help="tau_l for s_b and s_r")
    p.add_argument("--iou-thresh", type=float, default=0.05, help="diversity controller: IoU(b1, b2) limit")
    p.add_argument("--size-tol", type=float, default=0.3, help="diversity controller: width/height tolerance")
    p.add_argument("--quality-iou", type=float, default=0.5,
                   help="a box is 'positive' for the data-quality table if IoU with the GT box >= this")
    p.add_argument("--nll-weight", type=float, default=0.0,
                   help="add this x the chosen steps' per-token NLL to the DPO loss (RPO, Pang et al. 2024; "
                        "0 = the paper). Keeps DPO from pushing the chosen box's likelihood down too")
    p.add_argument("--pairs", default=None,
                   help="train iteration 1 on this pairs.jsonl instead of generating it (e.g. to rerun "
                        "the DPO stages with other settings on the same data)")
    p.add_argument("--critic", default=None,
                   help="critic model (default: --model, the pre-SFT model, as in the paper); 'oracle' scores "
                        "with the GT box and exact match instead: a diagnostic upper bound that needs box labels")
    p.add_argument("--phase-eval-n", type=int, default=None,
                   help="evaluate on the first N test records after every phase -> OUT/phases.json (0: off)")
    p.add_argument("--n-examples", type=int, default=8, help="example PNGs per iteration")
    p.set_defaults(max_steps=None, beta=0.1)
    args = run.parse_with_preset(p, argv, PAPER, TINY)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = set(args.stages) - {"sft", "stage1", "stage2"}
    if bad:
        p.error(f"--stages: unknown {sorted(bad)}")
    if not args.win_threshold > args.lose_threshold:
        p.error("--win-threshold must be above --lose-threshold (eq. 4's win and lose sets are disjoint)")
    return args


# ============================================================================ boxes and the chat
def norm_box(box, width, height):
    """Pixel box -> normalised [x1,y1,x2,y2] in 0..1 (clipped)."""
    return [min(max(v / s, 0.0), 1.0) for v, s in zip(box, (width, height, width, height))]


def pixel_box(box, width, height):
    """Normalised box -> pixels of a width x height image."""
    return [box[0] * width, box[1] * height, box[2] * width, box[3] * height]


def canonical_box(text_or_box):
    """The box the model means, as VisRL's canonical 2-decimal text and numbers, or (None, None).

    Takes the first box of a model output (or a list of 4 numbers), clips it to 0..1 and rounds
    it to 2 decimals, exactly as it is written back into the chat. Unparsable, inverted, or
    empty after rounding (e.g. "[0.3,0.3,0.301,0.5]") -> (None, None).
    """
    if isinstance(text_or_box, str):
        boxes = rewards.parse_boxes(text_or_box)
        if not boxes:
            return None, None
        box = boxes[0]
    else:
        box = rewards.valid_box(text_or_box)
        if box is None:
            return None, None
    box = [round(min(max(v, 0.0), 1.0), 2) for v in box]
    if box[2] <= box[0] or box[3] <= box[1]:
        return None, None
    return data.format_norm_box(box, 1, 1), box


def crop(image, box):
    """Crop of a normalised box (rounded outwards to whole pixels), or None if it has no pixel.
    A crop the processor could not take (a thin strip: aspect ratio over 200) is padded with white
    to one it can (data.fit_image): data generation, the critic, DPO stage 2, the SFT warm-up and
    evaluation all crop here."""
    c = rewards.crop_box(image, pixel_box(box, *image.size))
    return data.fit_image(c) if c is not None else None


def box_turn(question):
    """Step 1's prompt: image + question + the CoT instruction."""
    return [vlm.user_turn(data.VISRL_BOX_PROMPT.format(question=question))]


def answer_turns(question, box_text):
    """Step 2's prompt: step 1 with the box as the assistant's reply, then the crop + question.
    Images, in placeholder order: [full image, crop]."""
    return box_turn(question) + [vlm.assistant_turn(box_text),
                                 vlm.user_turn(data.VISRL_ANSWER_PROMPT.format(question=question))]


def sft_example(record, image):
    """(conversation, images) of the two-turn warm-up chat with the GT box: loss on both replies."""
    box_text, box = canonical_box(norm_box(record["box"], *image.size))
    conv = answer_turns(record["question"], box_text) + [vlm.assistant_turn(record["answer"])]
    return conv, [image, crop(image, box)]


# ============================================================================ diversity controller
def diversify_box(b1, b2, rng, iou_thresh=0.05, size_tol=0.3, max_tries=100, widen=0.1, widen_every=20):
    """VisRL's diversity controller (paper eq. 3): b2 if IoU(b1, b2) <= iou_thresh, else a random box.

    The random box lies inside the image (normalised [0,1]^2), does not overlap b1 (touching
    edges is allowed) and has width and height each within +-size_tol of b1's. The tolerance
    widens by `widen` after every `widen_every` failed tries; after `max_tries` it gives up
    and returns None (the caller drops the candidate). rng: a random.Random.
    Boxes are normalised [x1, y1, x2, y2].
    """
    if rewards.box_iou(b1, b2) <= iou_thresh:
        return list(b2)
    w1, h1 = b1[2] - b1[0], b1[3] - b1[1]
    for t in range(max_tries):
        tol = size_tol + widen * (t // widen_every)
        w_lo, w_hi = max(w1 * (1 - tol), 0.0), min(w1 * (1 + tol), 1.0)
        h_lo, h_hi = max(h1 * (1 - tol), 0.0), min(h1 * (1 + tol), 1.0)
        if w_lo >= w_hi or h_lo >= h_hi:          # even the smallest allowed box is wider than the image
            continue
        w, h = rng.uniform(w_lo, w_hi), rng.uniform(h_lo, h_hi)
        if w <= 0 or h <= 0:
            continue
        x1, y1 = rng.uniform(0.0, 1.0 - w), rng.uniform(0.0, 1.0 - h)
        box = [x1, y1, min(x1 + w, 1.0), min(y1 + h, 1.0)]
        if box[2] <= b1[0] or box[0] >= b1[2] or box[3] <= b1[1] or box[1] >= b1[3]:
            return box
    return None


# ============================================================================ generation + critic
def _greedy_or_sample(model, processor, convs, images, n, max_new_tokens, temperature, max_prompt_len=None):
    """n texts per prompt (temperature 0: greedy). A prompt over max_prompt_len gets n None texts
    instead of failing its whole batch (one long prompt never aborts a run)."""
    try:
        batch = vlm.chat_inputs(processor, convs, images, max_prompt_len=max_prompt_len)
    except vlm.PromptTooLong:
        fits = [vlm.prompt_problem(processor, c, ims, max_prompt_len) is None for c, ims in zip(convs, images)]
        kept = [k for k, f in enumerate(fits) if f]
        texts = iter(_greedy_or_sample(model, processor, [convs[k] for k in kept], [images[k] for k in kept], n,
                                       max_new_tokens, temperature, max_prompt_len) if kept else [])
        return [next(texts) if f else None for f in fits for _ in range(n)]
    greedy = temperature == 0
    return vlm.sample(model, processor, batch, n, max_new_tokens, temperature or 1.0, do_sample=not greedy)["texts"]


def sample_problem(rec, processor, max_prompt_len=None):
    """Why a question's first prompt (image + question) cannot be processed (over max_prompt_len, an
    image the processor refuses or that cannot be opened), or None: such samples are skipped."""
    try:
        image = data.open_image(rec["image_path"])
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return vlm.prompt_problem(processor, box_turn(rec["question"]), [image], max_prompt_len)


def critic_scores(critic, processor, items, batch_size=32, max_new_tokens=24):
    """Critic scores s_b, s_r (greedy, temperature 0) for items {question, reference, answer, image, crop}.

    s_b sees the crop only: does it show what the reference answer needs, given the question?
    s_r sees the full image: how close is the answer to the reference? Both are parsed from
    '{"score": x}' with rewards.parse_score (unparsable -> 0). Returns (s_b list, s_r list, raw texts).
    """
    box_convs = [[vlm.user_turn(data.CRITIC_BOX_PROMPT.format(question=it["question"], answer=it["reference"]))]
                 for it in items]
    ans_convs = [[vlm.user_turn(data.CRITIC_ANSWER_PROMPT.format(question=it["question"], reference=it["reference"],
                                                               answer=it["answer"]))] for it in items]
    raw_b, raw_r = [], []
    critic = getattr(critic, "module", critic)          # a DeepSpeed inference engine under ZeRO-3
    with vlm.generation_mode(critic):
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            raw_b += _greedy_or_sample(critic, processor, box_convs[s:s + batch_size], [[it["crop"]] for it in chunk],
                                       1, max_new_tokens, 0)
            raw_r += _greedy_or_sample(critic, processor, ans_convs[s:s + batch_size], [[it["image"]] for it in chunk],
                                       1, max_new_tokens, 0)
    return [rewards.parse_score(t) for t in raw_b], [rewards.parse_score(t) for t in raw_r], list(zip(raw_b, raw_r))


def oracle_scores(items, records, boxes):
    """--critic oracle (NOT VisRL: a diagnostic): s_b = 1 if the box holds half of the GT box (0 without
    one), s_r = 1 if the answer matches the reference after normalisation. How good could the pairs be?"""
    s_b = [float(r.get("box") is not None and rewards.covers(b, norm_box(r["box"], *it["image"].size)))
           for it, r, b in zip(items, records, boxes)]
    s_r = [float(rewards.normalise_answer(it["answer"]) == rewards.normalise_answer(it["reference"])) for it in items]
    return s_b, s_r


def generate_candidates(policy, critic, processor, records, args, rng):
    """Steps 1-2 of the data generation for a list of questions (one rank's share).

    Per question: K attempts x (b1, b2) sampled in ONE generate call per batch of questions,
    b2 diversified against b1, every valid box cropped and answered (one more generate call),
    every (crop, answer) scored by the critic. Returns one record per question:
    {id, question, answer, image, size, gt_box?, candidates: [{box, answer, s_b, s_r, attempt,
    which, diversified}], dropped: {unparsable, no_crop, no_diverse_box}}.
    """
    K = args.num_generations
    out = []
    for s in range(0, len(records), args.gen_batch_size):
        chunk = records[s:s + args.gen_batch_size]
        images = [data.open_image(r["image_path"]) for r in chunk]
        with vlm.generation_mode(policy):
            box_texts = _greedy_or_sample(policy, processor, [box_turn(r["question"]) for r in chunk],
                                          [[im] for im in images], 2 * K, args.max_new_tokens, args.temperature,
                                          args.max_prompt_len)
        cands, prompt_index = [], []
        results = []
        for i, (rec, im) in enumerate(zip(chunk, images)):
            res = {"id": rec["id"], "question": rec["question"], "answer": rec["answer"], "image": rec["image_path"],
                   "size": list(im.size), "candidates": [],
                   "dropped": {"unparsable": 0, "no_crop": 0, "no_diverse_box": 0, "too_long": 0}}
            if rec.get("box") is not None:
                res["gt_box"] = [round(v, 4) for v in norm_box(rec["box"], *im.size)]
            for k in range(K):
                t1, t2 = box_texts[i * 2 * K + 2 * k], box_texts[i * 2 * K + 2 * k + 1]
                _, b1 = canonical_box(t1)
                _, b2 = canonical_box(t2)
                diversified = False
                if b1 is not None and b2 is not None:
                    new = diversify_box(b1, b2, rng, args.iou_thresh, args.size_tol)
                    diversified = new is not None and new != b2
                    if new is None:
                        res["dropped"]["no_diverse_box"] += 1
                    b2 = canonical_box(new)[1] if new is not None else None
                for which, b, raw in (("b1", b1, t1), ("b2", b2, t2)):
                    if b is None:                  # unparsable, or no room for a diverse b2
                        res["dropped"]["unparsable"] += canonical_box(raw)[1] is None
                        continue
                    c = crop(im, b)
                    if c is None:
                        res["dropped"]["no_crop"] += 1
                        continue
                    cands.append({"box": b, "attempt": k, "which": which,
                                  "diversified": diversified and which == "b2", "crop": c})
                    prompt_index.append(i)
            results.append(res)
        # step 2: answer every (box, crop), sampled
        if cands:
            with vlm.generation_mode(policy):
                answers = []
                for a in range(0, len(cands), args.gen_batch_size * 2):
                    part = list(range(a, min(a + args.gen_batch_size * 2, len(cands))))
                    answers += _greedy_or_sample(
                        policy, processor,
                        [answer_turns(chunk[prompt_index[j]]["question"], canonical_box(cands[j]["box"])[0])
                         for j in part],
                        [[images[prompt_index[j]], cands[j]["crop"]] for j in part], 1, args.answer_max_new_tokens,
                        args.answer_temperature, args.max_prompt_len)
            for j in [j for j, a in enumerate(answers) if a is None][::-1]:   # answer prompt over the limit
                results[prompt_index[j]]["dropped"]["too_long"] += 1
                del cands[j], prompt_index[j], answers[j]
            items = [{"question": chunk[o]["question"], "reference": chunk[o]["answer"], "answer": a.strip(),
                      "image": images[o], "crop": c["crop"]} for c, o, a in zip(cands, prompt_index, answers)]
            if critic == "oracle":
                s_b, s_r = oracle_scores(items, [chunk[o] for o in prompt_index], [c["box"] for c in cands])
            else:
                s_b, s_r, _ = critic_scores(critic, processor, items)
            for c, o, it, sb, sr in zip(cands, prompt_index, items, s_b, s_r):
                c.pop("crop")
                results[o]["candidates"].append(dict(c, answer=it["answer"], s_b=sb, s_r=sr))
        out += results
    return out


# ============================================================================ filter + selection
FILTERS = ["questions", "with_candidates", "win_set", "lose_set", "chosen_holds_both_max",
           "rejected_holds_both_min"]


def select_pair(candidates, win=0.8, lose=0.2):
    """VisRL eq. 4 and the text after it (arXiv 2503.07523, sec. 3.1) for one question.

    W = {c : s_b >= win and s_r >= win}, L = {c : s_b <= lose and s_r <= lose}. The question is
    kept iff W and L are both non-empty; the chosen c_w is the candidate of W holding the maximum
    of BOTH s_b and s_r within W, the rejected c_l the one of L holding the minimum of both
    within L; if no candidate does, the question is dropped too (ties: the first).
    Returns (chosen_index, rejected_index, reason); reason = the first condition failed
    (a FILTERS name) or "ok". Raises ValueError unless win > lose (W and L must be disjoint).
    """
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
    failed = {name: 0 for name in FILTERS}
    pairs = []
    for q in questions:
        ci, ri, reason = select_pair(q["candidates"], win, lose)
        if reason != "ok":
            failed[reason] += 1
            continue
        pair = {k: q[k] for k in ("id", "question", "answer", "image", "size") if k in q}
        pair.update(chosen=q["candidates"][ci], rejected=q["candidates"][ri], gt_box=q.get("gt_box"))
        pair["quality"] = quality(pair, quality_iou)
        pairs.append(pair)
    survivors, left = {}, len(questions)
    for name in FILTERS:                       # survivors after each filter, in order
        left -= failed[name]
        survivors[name] = left
    graded = [p for p in pairs if p["quality"]]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    fractions = {k: mean([p["quality"] == k for p in graded]) for k in ("WP-LP", "WP-LN", "WN-LP", "WN-LN")}
    fractions.update(graded=len(graded),        # and how close to the GT box the two sides are on average
                     chosen_gt_iou=mean([rewards.box_iou(p["chosen"]["box"], p["gt_box"]) for p in graded]),
                     rejected_gt_iou=mean([rewards.box_iou(p["rejected"]["box"], p["gt_box"]) for p in graded]))
    return pairs, survivors, fractions


# ============================================================================ step-level DPO data
def box_step(pairs, images):
    """Stage 1's DPO data (eq. 5-6): x = image + question + instruction, y_w / y_l = box texts.
    Returns (convs, images, chosen texts, rejected texts)."""
    convs = [box_turn(p["question"]) for p in pairs]
    return (convs, [[im] for im in images], [canonical_box(p["chosen"]["box"])[0] for p in pairs],
            [canonical_box(p["rejected"]["box"])[0] for p in pairs])


def answer_step(pairs, images):
    """Stage 2's answer-step DPO data (eq. 7): the context is the image, the question, the WINNING
    box and the crop of the winning box, for BOTH the chosen and the rejected answer (the rejected
    answer was produced from its own crop, but is scored here in the winner's context)."""
    convs = [answer_turns(p["question"], canonical_box(p["chosen"]["box"])[0]) for p in pairs]
    ims = [[im, crop(im, p["chosen"]["box"])] for p, im in zip(pairs, images)]
    return convs, ims, [p["chosen"]["answer"] for p in pairs], [p["rejected"]["answer"] for p in pairs]


def phase_steps(n_items, per_step, epochs, max_steps=None, grad_accum=1):
    """Micro-steps of a phase: `epochs` passes over n_items, per_step items a micro-step, capped at
    max_steps optimizer updates (max_steps * grad_accum micro-steps)."""
    steps = math.ceil(epochs * n_items / per_step) if n_items else 0
    return min(steps, max_steps * grad_accum) if max_steps else steps


def dpo_phase(engine, ref, processor, pairs, stage, args, rank, world, out, log_state):
    """Stage 1 (box DPO) or stage 2 (0.5 box DPO + 0.5 answer DPO) over `pairs` (every rank has all).

    Each step every rank takes its share of batch_size * world pairs (round robin); ranks
    walk the same number of steps (DeepSpeed all-reduces the gradients).
    """
    grpo.fresh_optimizer(engine, args.lr)     # each stage trains as a separate run (fresh AdamW, constant lr)
    per_step = args.batch_size * world
    steps = phase_steps(len(pairs), per_step, args.dpo_epochs, args.max_steps, args.grad_accum)
    order = run.data_order(len(pairs), args.seed + stage)
    guard = run.NonFiniteGuard()
    engine.train()
    bar = tqdm(range(steps), desc=f"{log_state['iter_name']} stage {stage}", disable=rank != 0)
    for step in bar:
        t0 = time.time()
        mine = run.step_items(pairs, order, step, args.batch_size, rank, world)
        images = [data.open_image(p["image"]) for p in mine]
        box_data = box_step(mine, images)
        box = dpo.pair_logps(engine, ref, processor, *box_data, engine.device, args.max_prompt_len)
        if stage == 2:              # the answer step: both answers in the winning box's context
            answer_data = answer_step(mine, images)
            answer = dpo.pair_logps(engine, ref, processor, *answer_data, engine.device, args.max_prompt_len)
        else:
            answer = None
        loss, stats = dpo.step_dpo_loss(box, answer, beta=args.beta, box_weight=1.0 if stage == 1 else 0.5)
        if args.nll_weight:         # optional RPO-style NLL on the chosen steps (not in the paper)
            nll = dpo.chosen_nll(processor, box_data[2], box[0])
            if stage == 2:
                nll = 0.5 * nll + 0.5 * dpo.chosen_nll(processor, answer_data[2], answer[0])
            loss = loss + args.nll_weight * nll
            stats["nll"] = nll.item()
        # the phase's last, maybe partial, window is applied at its end
        skipped = guard.update(engine, loss, log_state["step"], window=grpo.accumulation(step, steps, args.grad_accum))
        stats.update(step=log_state["step"], phase=f"{log_state['iter_name']}/stage{stage}", loss=loss.item(),
                     skipped=skipped, updates=engine.global_steps, seconds=round(time.time() - t0, 2))
        stats["reward_accuracy"], stats["margin"] = stats["box_reward_accuracy"], stats["box_margin"]
        run.log(out, rank, stats)
        log_state["step"] += 1
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{stats['reward_accuracy']:.2f}")
    return steps


def sft_phase(engine, processor, records, args, rank, world, out, log_state):
    """SFT warm-up: the two-turn chat with the GT box, next-token loss on both assistant turns."""
    grpo.fresh_optimizer(engine, args.sft_lr)
    per_step = args.sft_batch_size * world
    steps = phase_steps(len(records), per_step, args.sft_epochs, args.max_steps, args.grad_accum)
    order = run.data_order(len(records), args.seed)
    guard = run.NonFiniteGuard()
    engine.train()
    for step in tqdm(range(steps), desc="sft warm-up", disable=rank != 0):
        examples = [sft_example(rec, data.open_image(rec["image_path"]))
                    for rec in run.step_items(records, order, step, args.sft_batch_size, rank, world)]
        convs, images = zip(*examples)
        loss = vlm.sft_loss(engine, processor, list(convs), list(images))
        # the phase's last, maybe partial, window is applied at its end
        skipped = guard.update(engine, loss, log_state["step"], window=grpo.accumulation(step, steps, args.grad_accum))
        run.log(out, rank, {"step": log_state["step"], "phase": "sft", "loss": loss.item(), "skipped": skipped,
                            "updates": engine.global_steps})
        log_state["step"] += 1
    return steps


# ============================================================================ evaluation
@torch.no_grad()
def evaluate(model, processor, records, args, rank=0, world=1, critic=None, batch_size=16):
    """Greedy two-step inference on `records` (sharded over ranks, gathered on all).

    Answer accuracy: normalised exact match for short reference answers (<= 3 words); for long
    ones the critic's s_r >= 0.5 when a critic is given, else exact match. Box accuracy: IoU >= 0.5
    with the GT box, over the records that have one; also mean IoU and box coverage (the box holds
    half of the GT box or more: the crop shows the evidence, however loose). An unparsable box
    counts as wrong for all of them and is counted in "unparsable". A record whose prompt cannot be
    processed (sample_problem) is left out of the scores, counted in "skipped_samples" and listed
    in the predictions with the reason. Returns (metrics, predictions).
    """
    critic = None if critic == "oracle" else critic
    mine = run.shard(records, rank, world)
    preds, skipped = [], []
    for s in range(0, len(mine), batch_size):
        # a sample that cannot be processed is skipped, counted
        chunk, bad = run.partition(mine[s:s + batch_size], lambda r: sample_problem(r, processor, args.max_prompt_len))
        skipped += [{"id": r["id"], "question": r["question"], "skipped": why} for r, why in bad]
        if not chunk:
            continue
        images = [data.open_image(r["image_path"]) for r in chunk]
        with vlm.generation_mode(model):
            texts = _greedy_or_sample(model, processor, [box_turn(r["question"]) for r in chunk],
                                      [[im] for im in images], 1, args.max_new_tokens, 0, args.max_prompt_len)
        boxes = [canonical_box(t) for t in texts]
        ok = [i for i, (_, b) in enumerate(boxes) if b is not None and crop(images[i], b) is not None]
        answers = {}
        if ok:
            with vlm.generation_mode(model):
                replies = _greedy_or_sample(model, processor,
                                            [answer_turns(chunk[i]["question"], boxes[i][0]) for i in ok],
                                            [[images[i], crop(images[i], boxes[i][1])] for i in ok], 1,
                                            args.answer_max_new_tokens, 0, args.max_prompt_len)
            answers = {i: r.strip() for i, r in zip(ok, replies) if r is not None}   # None: prompt too long
        long_items = [i for i in answers if critic is not None and rewards.is_long(chunk[i]["answer"])]
        judged = {}
        if long_items:
            items = [{"question": chunk[i]["question"], "reference": chunk[i]["answer"], "answer": answers[i],
                      "image": images[i], "crop": crop(images[i], boxes[i][1])} for i in long_items]
            judged = dict(zip(long_items, critic_scores(critic, processor, items)[1]))
        for i, (rec, im) in enumerate(zip(chunk, images)):
            box = boxes[i][1] if i in answers else None
            gt = norm_box(rec["box"], *im.size) if rec.get("box") is not None else None
            ans = answers.get(i)
            correct = (judged[i] >= 0.5) if i in judged else \
                (ans is not None and rewards.normalise_answer(ans) == rewards.normalise_answer(rec["answer"]))
            preds.append({"id": rec["id"], "question": rec["question"], "reference": rec["answer"],
                          "box_text": texts[i], "box": box, "answer": ans, "correct": bool(correct),
                          "gt_box": gt, "box_iou": rewards.box_iou(box, gt) if box and gt else (0.0 if gt else None)})
    preds, skipped = run.gather_records(preds), run.gather_records(skipped)
    with_gt = [p for p in preds if p["gt_box"] is not None]
    metrics = {"answer_accuracy": sum(p["correct"] for p in preds) / max(len(preds), 1),
               "box_accuracy": (sum(p["box_iou"] >= 0.5 for p in with_gt) / len(with_gt)) if with_gt else None,
               "mean_box_iou": (sum(p["box_iou"] for p in with_gt) / len(with_gt)) if with_gt else None,
               # ours, not the paper's: the box holds at least half of the GT box (the crop shows it)
               "box_coverage": (sum(p["box"] is not None and rewards.covers(p["box"], p["gt_box"]) for p in with_gt)
                                / len(with_gt)) if with_gt else None,
               "unparsable": sum(p["box"] is None for p in preds), "n": len(preds), "n_with_box": len(with_gt),
               "skipped_samples": len(skipped)}
    return metrics, preds + skipped


# ============================================================================ pictures
def save_examples(pairs, folder, n=8):
    """PNG per pair: the image with the chosen (green), rejected (red) and GT (blue) boxes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for p in pairs[:n]:
        im = data.open_image(p["image"])
        scale = max(1, 256 // max(im.size))
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
        canvas = Image.new("RGB", (im.width, im.height + 46), "white")
        canvas.paste(im, (0, 0))
        draw = ImageDraw.Draw(canvas)
        for key, colour in (("gt_box", "blue"), ("rejected", "red"), ("chosen", "green")):
            box = p[key] if key == "gt_box" else p[key]["box"]
            if box:
                draw.rectangle(pixel_box(box, im.width, im.height), outline=colour, width=2)
        c, r = p["chosen"], p["rejected"]
        draw.text((2, im.height + 2), p["question"][:48], fill="black")
        draw.text((2, im.height + 16), f"win: {c['answer'][:14]} sb {c['s_b']:.1f} sr {c['s_r']:.1f}", fill="green")
        draw.text((2, im.height + 30), f"lose: {r['answer'][:14]} sb {r['s_b']:.1f} sr {r['s_r']:.1f}", fill="red")
        canvas.save(folder / (re.sub(r"[^A-Za-z0-9_.-]", "_", str(p["id"])) + ".png"))


# ============================================================================ main
def load_records(args, rank):
    """(sft records, RL question records, test manifest). Default: a shapes-world VQA set in the cache.

    With --sft-data, the SFT warm-up uses that boxed manifest and every --data record is an RL
    question (the paper: 30k boxed VisCoT samples for SFT, 180k plain QA pairs for RL). Without it
    a --sft-fraction of --data's boxed records is held out for SFT and the rest become RL
    questions (their boxes are then used only to grade the pairs, never to train).
    """
    root = vlm.CACHE / f"shapes-visrl-{args.seed}"              # bigger than the default world: 512 + 512
    if not args.data:
        if rank == 0 and not (root / "vqa" / "test.jsonl").exists():
            data.make_shapes_world(root, n_train=512, n_test=512, seed=args.seed)
        run.barrier()
    train_path = run.manifest_path(args.data, "train", args.seed, "vqa", world=root)
    test_path = (run.manifest_path(args.test, "test", args.seed, "vqa", world=root)
                 if args.test or not args.data else None)
    records, skipped = data.read_manifest(train_path, "vqa", skip_bad=args.skip_bad)
    if args.sft_data:
        sft, _ = data.read_manifest(args.sft_data, "vqa", skip_bad=args.skip_bad)
        sft = [r for r in sft if r.get("box") is not None]
        questions = records
    else:
        boxed = [i for i, r in enumerate(records) if r.get("box") is not None]
        random.Random(args.seed).shuffle(boxed)
        take = set(boxed[:round(args.sft_fraction * len(boxed))])
        sft = [records[i] for i in sorted(take)]
        questions = [r for i, r in enumerate(records) if i not in take] if args.sft_fraction < 1 else records
    return sft, questions, test_path, skipped


def generation_round(engine, critic, processor, questions, folder, args, rank, world, it):
    """Steps 1-2 of one iteration: every rank generates for its share of each chunk, rank 0 appends
    the merged records to candidates.jsonl (resumable: ids already there are skipped), then the
    filter makes the pairs. Every rank returns all pairs, in the same order."""
    t0 = time.time()
    done = {q["id"]: q for q in run.read_jsonl(folder / "candidates.jsonl")}
    todo = [q for q in questions if q["id"] not in done]
    rng = random.Random(args.seed + 1000 * rank + it)
    per_chunk = args.gen_batch_size * world
    chunks = [todo[k:k + per_chunk] for k in range(0, len(todo), per_chunk)]
    for chunk in tqdm(chunks, desc=f"iter{it} generate", disable=rank != 0):
        mine = run.shard(chunk, rank, world)          # every rank walks every chunk (all_gather)
        found = generate_candidates(engine.module, critic, processor, mine, args, rng) if mine else []
        for q in run.gather_records(found):
            done[q["id"]] = q
            if rank == 0:
                run.append_jsonl(folder / "candidates.jsonl", q)
    generated = [done[q["id"]] for q in questions if q["id"] in done]
    pairs, survivors, fractions = make_pairs(generated, args.win_threshold, args.lose_threshold,
                                             args.quality_iou)
    cands = [c for q in generated for c in q["candidates"]]
    stats = {"survivors": survivors, "quality": fractions, "candidates": len(cands),
             "dropped": {k: sum(q["dropped"][k] for q in generated)
                         for k in ("unparsable", "no_crop", "no_diverse_box", "too_long")},
             "diversified": sum(c["diversified"] for c in cands),
             "mean_s_b": sum(c["s_b"] for c in cands) / max(len(cands), 1),
             "mean_s_r": sum(c["s_r"] for c in cands) / max(len(cands), 1),
             # how often the critic's s_r agrees with a plain normalised match (a check on the critic)
             "critic_sr_agreement": sum((c["s_r"] >= 0.5) == (rewards.normalise_answer(c["answer"]) ==
                                                               rewards.normalise_answer(q["answer"]))
                                        for q in generated for c in q["candidates"]) / max(len(cands), 1),
             "seconds": round(time.time() - t0, 1)}
    if rank == 0:
        save_examples(pairs, folder / "examples", args.n_examples)
    return pairs, stats


def write_eval(out, metrics, preds, model, test_path):
    (out / "eval.json").write_text(json.dumps(dict(metrics, model=str(model), test=str(test_path)), indent=1))
    data.write_jsonl(out / "predictions.jsonl", preds)


def phase_plan(args):
    """The run's phases in order: "sft", then per iteration "iter{k}/generate", "iter{k}/stage1",
    "iter{k}/stage2" (--stages picks the trained ones). Every phase but generate saves a model."""
    plan = ["sft"] if "sft" in args.stages else []
    for it in range(1, args.iters + 1):
        plan += [f"iter{it}/generate"] + [f"iter{it}/{s}" for s in ("stage1", "stage2") if s in args.stages]
    return plan


def save_phase(engine, processor, out, name, args, cfg):
    """Save the phase's model to OUT/<name>; returns the engine the next phase trains. With LoRA the
    adapter is folded into the weights and the next phase trains a fresh one (a new engine), as the
    released code trains each stage on the merged model of the last one."""
    model = run.merged(engine) if args.lora_rank else engine
    run.save_final(model, processor, out / Path(name).parent, Path(name).name)
    return run.deepspeed_engine(run.lora_model(model, args.lora_rank), cfg) if args.lora_rank else engine


def save_progress(out, progress, step, rank):
    """OUT/progress.json: the finished phases, the step counter and the record counts that
    run.prepare_out cuts metrics.jsonl back to on --resume. Written atomically (kill -9 safe)."""
    progress["step"], progress["records"] = step, run.record_counts(out)
    if rank == 0:
        (out / "progress.tmp").write_text(json.dumps(progress))
        (out / "progress.tmp").replace(out / "progress.json")
    run.barrier()


def main(argv=None):
    args = parse_args(argv)
    rank, world, out = run.start(args)
    cfg = run.deepspeed_config(args, micro_batch=args.batch_size)

    if args.eval:                        # evaluation only: eval_only(), at the end of this file
        return eval_only(args, cfg, rank, world, out)

    # ---- data
    sft_records, questions, test_path, skipped = load_records(args, rank)
    test = data.read_manifest(test_path, "vqa", skip_bad=args.skip_bad)[0] if test_path else []
    if rank == 0:
        print(f"[visrl] {len(sft_records)} SFT records, {len(questions)} RL questions ({skipped} skipped), "
              f"{len(test)} test records, {world} rank(s), K {args.num_generations}, iters {args.iters}, "
              f"stages {','.join(args.stages)}")

    # ---- resume (phase granularity): OUT/progress.json lists the finished phases; the newest saved
    # model becomes the policy, metrics.jsonl is cut back to that point (run.prepare_out)
    progress_path = out / "progress.json"
    progress = json.loads(progress_path.read_text()) if args.resume and progress_path.exists() else {"done": []}
    if not args.resume and rank == 0:
        stale_files = [out / n for n in ("metrics.jsonl", "phases.json", "progress.json", "eval.json")]
        for stale in stale_files + list(out.glob("iter*")):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    run.barrier()
    run.prepare_out(out, rank, progress if "records" in progress else None)
    phases = json.loads((out / "phases.json").read_text()) if args.resume and (out / "phases.json").exists() else []
    phases = [p for p in phases if p["phase"] in ["base"] * ("records" in progress) + progress["done"]]
    latest = next((out / p for p in reversed(progress["done"]) if not p.endswith("generate")), args.model)

    # ---- models: the policy (a DeepSpeed engine) and the critic = the pre-SFT model, frozen
    model, processor = run.load_policy(args, latest)
    if args.lora_rank and cfg.get("zero_optimization", {}).get("stage") == 3:
        raise SystemExit("--lora-rank: use ZeRO-2 (ds_zero2.json); merging adapters needs whole weights")
    engine = run.deepspeed_engine(run.lora_model(model, args.lora_rank) if args.lora_rank else model, cfg)
    critic = "oracle" if args.critic == "oracle" else \
        run.reference_model(args.critic or args.model, cfg, device=engine.device, max_pixels=args.max_pixels)
    # a sample whose prompt cannot be processed is skipped (OUT/skipped.jsonl), never fatal
    problem = lambda r: sample_problem(r, processor, args.max_prompt_len)  # noqa: E731
    sft_records, _ = run.usable(sft_records, problem, rank, world, out, split="sft")
    questions, _ = run.usable(questions, problem, rank, world, out)
    log_state = {"step": progress.get("step", 0), "iter_name": "sft"}

    def score(name):
        """Test scores of the current policy -> OUT/phases.json (the SFT / +stage 1 / +stage 2 table)."""
        if not (args.phase_eval_n and test):
            return
        metrics, _ = evaluate(engine.module, processor, test[:args.phase_eval_n], args, rank, world, critic)
        phases.append(dict(metrics, phase=name))
        if rank == 0:
            print(f"[visrl] {name}: answer accuracy {metrics['answer_accuracy']:.3f}, "
                  f"box accuracy {metrics['box_accuracy']}")
            (out / "phases.json").write_text(json.dumps(phases, indent=1))
            run.log(out, rank, dict(metrics, step=log_state["step"], phase=f"eval/{name}"))

    if not phases:
        score("base")
        save_progress(out, progress, log_state["step"], rank)

    # ---- the phases, one after another: SFT warm-up, then per iteration generate -> stage 1 -> stage 2.
    # Each DPO stage's reference is the model the stage starts from (`latest`): stage 1's the model its
    # iteration started from (the SFT model first), stage 2's the stage-1 model.
    pairs = None
    for phase in phase_plan(args):
        if phase in progress["done"]:
            continue
        it_name, _, kind = phase.rpartition("/")          # "iter1/stage2" -> ("iter1", "stage2"); "sft" -> ("", "sft")
        folder, log_state["iter_name"] = out / it_name, it_name or "sft"
        if kind == "sft":                                  # 0. SFT warm-up
            if not sft_records:
                raise SystemExit("[visrl] the SFT warm-up needs boxed records (--sft-data, or boxes in --data)")
            sft_phase(engine, processor, sft_records, args, rank, world, out, log_state)
        elif kind == "generate":                           # 1.-2. data generation + filter
            if rank == 0:
                folder.mkdir(parents=True, exist_ok=True)
            run.barrier()
            if it_name == "iter1" and args.pairs:
                pairs = run.read_jsonl(args.pairs)
                stats = {"survivors": {"given": len(pairs)}, "quality": {}}
            else:
                pairs, stats = generation_round(engine, critic, processor, questions, folder, args, rank, world,
                                                int(it_name[4:]))
            if rank == 0:
                data.write_jsonl(folder / "pairs.jsonl", pairs)          # written even when no pair survived
                (folder / "stats.json").write_text(json.dumps(stats, indent=1))
                run.log(out, rank, {"step": log_state["step"], "phase": phase, "pairs": len(pairs),
                                    **{f"survive_{k}": v for k, v in stats["survivors"].items()},
                                    **{f"quality_{k}": v for k, v in stats["quality"].items()},
                                    **{k: stats[k] for k in ("candidates", "mean_s_b", "mean_s_r",
                                                             "critic_sr_agreement") if k in stats}})
                print(f"[visrl] {it_name}: {len(pairs)} pairs; survivors {stats['survivors']}; "
                      f"quality {stats['quality']}")
        else:                                              # 3.-4. stage 1 (box DPO) / stage 2 (step DPO)
            if pairs is None:                              # --resume after this iteration's generation
                pairs = run.read_jsonl(folder / "pairs.jsonl")
            if pairs:
                ref = None if args.lora_rank else \
                    run.reference_model(latest, cfg, device=engine.device, max_pixels=args.max_pixels)
                dpo_phase(engine, ref, processor, pairs, int(kind[-1]), args, rank, world, out, log_state)
                del ref
        if kind != "generate":                             # save the phase's model, score it
            engine, latest = save_phase(engine, processor, out, phase, args, cfg), out / phase
            score(phase)
        progress["done"].append(phase)
        save_progress(out, progress, log_state["step"], rank)

    # ---- save + evaluate
    policy = run.merged(engine) if args.lora_rank else engine.module
    run.save_final(policy, processor, out)
    if test:
        metrics, preds = evaluate(policy, processor, test[:args.n_test], args, rank, world, critic)
        if rank == 0:
            write_eval(out, metrics, preds, out / "final", test_path)
            print(f"[visrl] final: {json.dumps(metrics)}")
    if rank == 0:
        try:
            run.plot(out, keys=["loss", "reward_accuracy", "margin"])
        except Exception as e:          # a picture must never fail a finished run
            print(f"[visrl] no plot: {e}")
        print(f"[visrl] model in {out / 'final'}")


def eval_only(args, cfg, rank, world, out):
    """`--eval`: two-step answers (box, then the crop) on the test manifest -> OUT/eval.json and
    OUT/predictions.jsonl; answer and box accuracy."""
    test_path = Path(args.test) if args.test else load_records(args, rank)[2]
    test, _ = data.read_manifest(test_path, "vqa", skip_bad=args.skip_bad)
    model, processor = vlm.load_model(args.model, max_pixels=args.max_pixels)
    critic = run.reference_model(args.critic, cfg, device=model.device, max_pixels=args.max_pixels) \
        if args.critic and args.critic != "oracle" else None
    metrics, preds = evaluate(model, processor, test[:args.n_test], args, rank, world, critic)
    if rank == 0:
        write_eval(out, metrics, preds, args.model, test_path)
        print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
    run.exit_finished()        # the run is complete: skip the interpreter's teardown
