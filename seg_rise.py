"""seg_rise.py -- Seg-RISE: instruction segmentation learnt from a self-supervised semantic reward.

Paper: "Reasoning via Implicit Self-supervised Emergence for Instruction Segmentation" (Zhou et al.
2025; no arXiv id printed), section 4 "Method: RISE" (rewards eqs. 4-6), section 5 (evaluation).

Training sees an image I and an instruction T only: no mask, no box.
  1. the policy writes G answers per (I, T), for real data to Seg-Zero's prompt word for word (the
     paper keeps "consistency with the Seg-Zero configuration")    -> prompt_text(), data.seg_prompt
         <think>CoT</think><answer>{"bbox": [x1,y1,x2,y2], "points_1": [x,y], "points_2": [x,y]}</answer>
     (shapes-world data: its own prompt and {"bbox": [...], "points": [[x,y],[x,y]]}), in its own
     coordinate frame (Qwen2-VL: 0..1000; Qwen2.5-VL: pixels of the resized input; real data: of the
     840x840 image Seg-Zero resizes every photo to, --image-side), converted to original-image
     pixels in one place                                     -> box_to_pixels, vlm.from_model_frame
  2. reward  R = R_sem + R_think + R_seg                       (paper eq. 6)  -> seg_rewards()
       R_sem   = cos(CLIP_img(crop of the box), CLIP_txt(T)), 0 without a valid box  (eqs. 4-5)
                                                                  -> rewards.clip_semantic_reward
       R_think = 1 if <think>...</think><answer>...</answer>         -> rewards.think_reward
       R_seg   = 1 if the answer is JSON with an in-image box and two in-image points
                                                                    -> rewards.seg_format_reward
     (the ablations: --reward sem,think,seg picks the terms; --no-cot; --no-points)
  3. GRPO on the G answers                                                    -> vlm.grpo_step
Inference (--eval): greedy answer -> box + points (pixels) -> frozen SAM2 image predictor (the box
and both points as positive clicks; the best-scoring of its masks) -> mask      -> sam2_mask()
-> gIoU, cIoU, box IoU, unparsable -> OUT/eval.json; --save-vis DIR draws overlays.

The semantic scorer is the paper's CLIP ViT-B/32 (open_clip, --clip-ckpt: a checkpoint file or a
pretrained tag such as openai). On shapes-world data it is the shapes CLIP (shapes-clip/, committed; built
by `python tiny.py clip`): a small open_clip CLIP trained on shapes-world crops and their names, since a
CLIP of photos knows nothing of 112-px coloured shapes                  -> load_clip()

    deepspeed seg_rise.py                                        # tiny base + shapes world, CPU
    deepspeed seg_rise.py --eval --model runs/seg_rise/final --save-vis runs/seg_rise-eval/vis
    deepspeed --num_gpus 8 seg_rise.py --model Qwen/Qwen2.5-VL-3B-Instruct --data refcocog/train.jsonl \\
        --deepspeed ds_zero3.json                                # the paper's setting (PAPER below)
    deepspeed seg_rise.py --eval --model runs/seg_rise/final --test reasonseg/test/seg.jsonl \\
        --sam2-ckpt sam2.1_hiera_large.pt                        # SAM2.1-Large (the paper's executor)
"""
import copy
import json
import math
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import data
import rewards
import run
import vlm

# The paper's setting: Qwen2.5-VL-3B, G = 8, lr 1e-6, KL 5e-3 (Seg-Zero's), 2,000 RefCOCOg pairs, SAM2-Large.
# Neither the batch nor the number of steps is printed: 125 steps x 2 prompts x 8 GPUs = one pass. Images:
# the paper prints no size; Seg-Zero, whose configuration it keeps, resizes every image to 840x840 (training
# data refCOCOg_2k_840, inference image.resize((840, 840))) and maps the answer back by W/840, H/840: so does
# image_side=840 (real data only; --image-side 0 keeps the aspect ratio at the same budget of 840x840 pixels,
# Qwen's own smart_resize). The prompt limit 1280 is ours (900 image tokens + the instruction).
PAPER = dict(lr=1e-6, beta=5e-3, max_steps=125, num_generations=8, batch_size=2, grad_accum=1,
             max_new_tokens=512, save_every=25, max_pixels=840 * 840, image_side=840, max_prompt_len=1280,
             gradient_checkpointing=True, sam2_config="configs/sam2.1/sam2.1_hiera_l.yaml", deepspeed="ds_zero3.json")
# The tiny base on one CPU: ~4.5 minutes (~2.2 s a step).
TINY = dict(lr=2e-4, beta=5e-3, max_steps=120, num_generations=8, batch_size=2, grad_accum=1,
            max_new_tokens=128, save_every=25, max_pixels=None, image_side=0, max_prompt_len=1024,
            sam2_config="configs/sam2.1/sam2.1_hiera_t.yaml")
TERMS = ("sem", "think", "seg")
SHAPES_CLIP = Path(__file__).resolve().parent / "shapes-clip"     # committed; python tiny.py clip rebuilds it


def parser():
    """The script's command line (run.common_args and its own options); parse_args fills the presets."""
    p = run.common_args("seg_rise", __doc__.split("\n")[0])
    p.add_argument("--reward", default="sem,think,seg",
                   help="comma-separated reward terms summed into R (paper Table 4): sem, think, seg")
    p.add_argument("--no-cot", dest="cot", action="store_false",
                   help="answer without <think> (paper Table 5); R_think is then not part of R")
    p.add_argument("--no-points", dest="points", action="store_false",
                   help="ask for the box only (paper Table 6); SAM2 then gets the box only")
    p.add_argument("--image-side", type=int,
                   help="real data: every image is resized to SIDE x SIDE before the model sees it, as Seg-Zero "
                        "does (840), and the answer mapped back to the original pixels; 0 keeps the aspect "
                        "ratio (Qwen's resize within --max-pixels). Shapes-world data is never resized, nor "
                        "is the image of --eval-prompt grounding")
    p.add_argument("--clip", default=None,
                   help="semantic scorer: an open_clip model name (the paper: ViT-B-32) or 'shapes' (the shapes "
                        "CLIP); default: shapes on shapes-world data, else ViT-B-32")
    p.add_argument("--clip-ckpt", default=None,
                   help="open_clip checkpoint file or pretrained tag (default: openai) for --clip NAME; for "
                        "--clip shapes a folder written by python tiny.py clip (default: shapes-clip/)")
    p.add_argument("--executor", default="sam2", choices=["sam2", "box"],
                   help="mask maker for --eval: SAM2 (the paper), or the filled box (no SAM2; a quick "
                        "floor for the shapes world)")
    p.add_argument("--sam2-config", help="a SAM2 config: a name inside the sam2 package or a file")
    p.add_argument("--sam2-ckpt", default=None,
                   help="SAM2 checkpoint file; without one SAM2 has RANDOM weights (plumbing only)")
    p.add_argument("--eval-prompt", default="seg", choices=["seg", "grounding"],
                   help="--eval's prompt: seg (the training prompt) or grounding: the real checkpoint's own "
                        "grounding prompt (data.GROUNDING_PROMPT, Qwen2.5-VL's), with which the Seg-RISE paper "
                        "tests RefCOCO/+/g; its box is read from the answer's \"bbox_2d\", no points")
    p.add_argument("--save-vis", default=None, help="--eval: write PNG overlays to this folder")
    p.add_argument("--n-vis", type=int, default=16, help="how many overlays --save-vis writes")
    p.add_argument("--eval-batch-size", type=int, default=16, help="prompts per greedy generate() in --eval")
    p.add_argument("--eval-max-new-tokens", type=int, default=None,
                   help="token budget of --eval's greedy answers (default 2x --max-new-tokens: a greedy CoT "
                        "can repeat itself and would otherwise be cut before its answer)")
    return p


def parse_args(argv=None):
    p = parser()
    args = run.parse_args(p, argv, PAPER, TINY)
    args.eval_max_new_tokens = args.eval_max_new_tokens or 2 * args.max_new_tokens
    args.terms = [t.strip() for t in args.reward.split(",") if t.strip()]
    unknown = sorted(set(args.terms) - set(TERMS))
    if unknown or not args.terms:
        p.error(f"--reward takes a comma-separated subset of {','.join(TERMS)}; got {args.reward!r}")
    if not args.cot and "think" in args.terms:
        args.terms.remove("think")          # nothing to reward: the prompt asks for no <think>
        if not args.terms:
            p.error("--no-cot leaves nothing of --reward think: add sem and/or seg")
    return args


# ============================================================================ training
def train(args, rank, world, out):
    """Seg-RISE: GRPO with R = the --reward terms -> OUT/final/, then the test scores."""
    # ---- data: the policy and the reward see the image and the instruction, nothing else
    manifest = run.manifest_path(args.data, "train", args.seed, "seg")
    records, _, skipped = run.records(manifest, args.skip_bad, task="seg")
    samples = [{"id": r["id"], "image_path": r["image_path"], "instruction": r["instruction"]} for r in records]
    # GT boxes, where the manifest has them, only for a logged diagnostic (never for the reward)
    diag_boxes = {r["id"]: r["box"] for r in records if r.get("box")}
    args.shapes = data.is_shapes(records)            # the data pick the prompt and answer format, never the model
    if rank == 0:
        print(f"[seg_rise] {len(samples)} training samples from {manifest} ({skipped} skipped), {world} rank(s), "
              f"lr {args.lr}, G {args.num_generations}, beta {args.beta}, {args.max_steps} steps, "
              f"R = {' + '.join('R_' + t for t in args.terms)}, cot {args.cot}, points {args.points}, "
              f"prompt {'shapes world' if args.shapes else 'Seg-Zero'}, image side {input_side(args)}")

    # ---- models: the policy (DeepSpeed), its frozen reference, the frozen CLIP scorer
    engine, processor = run.policy(args)
    ref = run.reference_model(args.model, args, engine.device) if args.beta and not args.lora_rank else None
    clip = load_clip(*scorer_name(args, records), device=engine.device)
    run.open_tracker(args, out, rank)
    text_cache = {}                                  # one CLIP text embedding per instruction
    model_type = engine.module.config.model_type
    # a sample whose prompt cannot be processed is skipped and listed in OUT/skipped.jsonl, never fatal
    samples, _ = run.usable(samples, lambda r: sample_problem(r, processor, model_type, args, training=True),
                            rank, world, out)
    total = args.max_steps * args.grad_accum
    state = run.resume(out, args, engine)
    run.new_stage(engine, args.lr, args.max_steps, args, done=state["step"] // args.grad_accum)

    # ---- the GRPO loop (paper sec. 4)
    G, order = args.num_generations, run.data_order(len(samples), args.seed)
    for step in run.steps(engine, state, total, rank, "seg_rise"):
        t0 = time.time()
        batch = run.step_items(samples, order, step, args.batch_size, rank, world)
        images = [data.open_image(r["image_path"]) for r in batch]
        instructions = [r["instruction"] for r in batch]
        convs = [[vlm.user_turn(train_prompt(t, im, model_type, processor, args))]
                 for t, im in zip(instructions, images)]

        def reward_fn(texts, owner):                 # R = R_sem + R_think + R_seg (paper eq. 6)
            return seg_rewards(texts, owner, images, instructions, clip, model_type, processor, args.terms,
                               args.cot, args.points, text_cache, args.shapes, input_side(args))

        stats, rollout, reward = vlm.grpo_step(
            engine, ref, processor, convs, [[model_image(im, input_side(args))] for im in images], reward_fn,
            group_size=G,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, max_prompt_len=args.max_prompt_len,
            window=vlm.accumulation(step, total, args.grad_accum), **run.grpo_options(args))
        # diagnostic only: IoU of the sampled boxes with GT boxes the reward never sees
        ious = [rewards.box_iou(read_answer(t, images[k // G], model_type, processor, False, args.shapes,
                                            input_side(args))[0] or [0, 0, 0, 0],
                                diag_boxes[batch[k // G]["id"]])
                for k, t in enumerate(rollout["texts"]) if batch[k // G]["id"] in diag_boxes]
        if ious:
            stats["diag_gt_box_iou"] = float(np.mean(ious))
        run.log_completions(out, rank, step, [{"id": batch[k // G]["id"], "completion": t, "reward": r}
                                              for k, (t, r) in enumerate(zip(rollout["texts"], reward.tolist()))],
                            args.log_completions_every)
        run.end_step(engine, out, state, step, total, stats, args, rank, seconds=time.time() - t0)

    # ---- save
    final = run.save_final(engine, processor, out)
    if rank == 0:
        report(out, final)


def report(out, final):
    """What a finished run prints (R_sem and R, first vs last fifth of the steps) and draws (curves.png)."""
    rows = run.read_jsonl(out / "metrics.jsonl")
    if rows:
        k = max(1, len(rows) // 5)
        mean = lambda rs, key: np.mean([r[key] for r in rs if key in r]) if any(key in r for r in rs) else float("nan")  # noqa: E731
        print(f"[seg_rise] R_sem {mean(rows[:k], 'reward_sem'):.3f} -> {mean(rows[-k:], 'reward_sem'):.3f}, "
              f"R {mean(rows[:k], 'reward'):.3f} -> {mean(rows[-k:], 'reward'):.3f} (first vs last fifth of the steps); "
              f"model in {final}")
        run.plot(out, ["reward", "reward_sem", "reward_think", "reward_seg", "diag_gt_box_iou", "kl", "completion_len"])


# ============================================================================ prompts and answers
def prompt_text(instruction, cot=True, points=True, frame=None, shapes=False):
    """The Seg-RISE prompt (data.seg_prompt): for real data Seg-Zero's word for word, which states no
    frame; for shapes-world data (shapes=True) the shapes world's, after the sentence stating `frame`
    (vlm.box_frame(...)), as the tiny base was trained. cot / points: False for the --no-cot /
    --no-points ablations (paper Tab. 5 / 6)."""
    return (data.frame_note(frame) if shapes else "") + data.seg_prompt(instruction, cot, points, shapes)


def points_format(shapes):
    """The answer's point keys (rewards.parse_seg_answer): Seg-Zero's, or the shapes world's."""
    return "shapes" if shapes else "seg_zero"


# ---- the model's coordinate frame (Qwen2-VL 0..1000, Qwen2.5-VL resized pixels) <-> pixels.
# Every conversion goes through vlm.to_model_frame / vlm.from_model_frame, applied to the image the model
# is shown: the original, or with side=S the S x S resize of it (model_image; Seg-Zero's 840 x 840), whose
# pixels map back to the original by W/S, H/S (Seg-Zero's x_factor, y_factor).
def model_image(image, side=None):
    """The image the model is shown: `image`, or resized to side x side (bilinear, as Seg-Zero's
    inference; the aspect ratio is not kept)."""
    return image.resize((side, side), Image.BILINEAR) if side else image


def _view(image, side):
    """(size of the image the model is shown, its x and y factors back to original pixels)."""
    w, h = image.size
    return ((side, side), (w / side, h / side)) if side else ((w, h), (1.0, 1.0))


def frame_size(image, model_type, processor=None, side=None):
    """(width, height) of the image in the model's frame: (1000, 1000) for Qwen2-VL; for Qwen2.5-VL the
    pixels of its resize of the image it is shown (side x side with `side`)."""
    size, _ = _view(image, side)
    return tuple(vlm.to_model_frame([0, 0, *size], model_type, size, processor)[2:])


def box_to_pixels(box, image, model_type, processor=None, side=None):
    """A box in the model's frame -> pixels of the original `image` (floats)."""
    size, (fx, fy) = _view(image, side)
    x1, y1, x2, y2 = vlm.from_model_frame(box, model_type, size, processor)
    return [x1 * fx, y1 * fy, x2 * fx, y2 * fy]


def point_to_pixels(point, image, model_type, processor=None, side=None):
    return box_to_pixels([point[0], point[1], point[0], point[1]], image, model_type, processor, side)[:2]


def point_to_model_frame(point, image, model_type, processor=None, side=None):
    size, (fx, fy) = _view(image, side)
    return vlm.to_model_frame([point[0] / fx, point[1] / fy] * 2, model_type, size, processor)[:2]


def read_answer(text, image, model_type, processor=None, points=True, shapes=False, side=None):
    """A completion -> (box, points) in original-image pixels; box None when unparsable, points []
    when absent (or with points=False). Points in the data's format (points_format(shapes))."""
    answer = rewards.seg_answer(text)
    box = rewards.parse_seg_box(answer)
    if box is None:
        return None, []
    pts = []
    parsed = rewards.parse_seg_answer(answer, points_format(shapes)) if points else None
    if parsed and parsed[0] == box:
        pts = [point_to_pixels(p, image, model_type, processor, side) for p in parsed[1]]
    return box_to_pixels(box, image, model_type, processor, side), pts


# ============================================================================ the reward (paper eq. 6)
def seg_rewards(texts, prompt_index, images, instructions, clip, model_type, processor=None, terms=TERMS,
                cot=True, points=True, text_cache=None, shapes=False, side=None):
    """R = sum of the chosen terms of {R_sem, R_think, R_seg} for each completion (Seg-RISE eq. 6).

    texts[k] answers prompt i = prompt_index[k] (original image images[i], instruction instructions[i]).
    clip: (model, preprocess, tokenizer) of open_clip. All crops of one prompt's group go through
    CLIP in one batch; text_cache keeps one text embedding per instruction across calls. The crop is
    taken from the original image; R_seg's bounds are the model's frame of the image it was shown
    (side x side with `side`). shapes: the shapes world's answer format, else Seg-Zero's.
    Every component is returned (and logged) even when it is not part of R.
    """
    boxes = [read_answer(t, images[o], model_type, processor, False, shapes, side)[0]
             for t, o in zip(texts, prompt_index)]
    sem = [0.0] * len(texts)
    for i, image in enumerate(images):
        rows = [k for k, o in enumerate(prompt_index) if o == i]
        if rows:
            scores = rewards.clip_semantic_reward(*clip, image, [boxes[k] for k in rows], instructions[i], text_cache)
            for k, s in zip(rows, scores):
                sem[k] = s
    out = []
    for k, text in enumerate(texts):
        fw, fh = frame_size(images[prompt_index[k]], model_type, processor, side)
        seg = rewards.seg_format_reward(text, fw, fh, points_format(shapes)) if points \
            else rewards.seg_box_format_reward(text, fw, fh)
        parts = {"sem": sem[k], "think": rewards.think_reward(text) if cot else 0.0, "seg": seg}
        out.append({"reward": sum(parts[t] for t in terms), **parts})
    return out


# ============================================================================ the semantic scorer
def scorer_name(args, records):
    """(name, ckpt) of the semantic scorer: --clip, else the shapes CLIP when --clip-ckpt is a folder
    holding one or the records are the shapes world's (data.is_shapes), else the paper's ViT-B-32 with
    OpenAI's weights."""
    shapes_folder = args.clip_ckpt and (Path(args.clip_ckpt) / "config.json").is_file()
    name = args.clip or ("shapes" if shapes_folder or data.is_shapes(records) else "ViT-B-32")
    return name, args.clip_ckpt or (None if name == "shapes" else "openai")


def load_clip(name="shapes", ckpt=None, device="cpu"):
    """(model, preprocess, tokenizer) of the semantic scorer, frozen, in eval mode.

    name "shapes": the shapes CLIP in the folder `ckpt` (default: shapes-clip/ beside this file;
    `python tiny.py clip --out DIR` writes one). Any other name is an open_clip model (e.g. ViT-B-32)
    whose weights come from `ckpt`: a checkpoint file, or a pretrained tag open_clip knows (it downloads
    those). Raises SystemExit for a missing folder or a missing ckpt (a random CLIP is never used)."""
    import open_clip
    if name == "shapes":
        folder = Path(ckpt or SHAPES_CLIP)
        if not (folder / "config.json").exists():
            raise SystemExit(f"{folder} holds no shapes CLIP (config.json): `git checkout shapes-clip`, or build one "
                             f"with `python tiny.py clip --out {folder}`")
        from safetensors.torch import load_file
        cfg = json.loads((folder / "config.json").read_text())
        model = open_clip.model.CLIP(**cfg["model"])
        model.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in load_file(folder / "model.safetensors").items()})
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["model"]["text_cfg"]["context_length"])
        size = cfg["model"]["vision_cfg"]["image_size"]
        preprocess = lambda im: shapes_clip_preprocess(im, size)  # noqa: E731
    else:
        if not ckpt:
            raise SystemExit(f"--clip {name} needs --clip-ckpt (a checkpoint file, or a pretrained tag such "
                             "as 'openai'): a random CLIP gives a meaningless reward")
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=ckpt, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    model = model.to(device).eval().requires_grad_(False)
    return model, preprocess, tokenizer


def shapes_clip_preprocess(image, size=64):
    """The shapes CLIP's image transform: a crop -> [3, size, size] in [-1, 1], squashed, not centre-cropped
    (the whole box is seen). tiny.build_shapes_clip trains with it."""
    a = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    return (torch.from_numpy(a).permute(2, 0, 1) - 0.5) / 0.5


# ============================================================================ the segmentation executor
def load_sam2(config, ckpt=None, device="cpu"):
    """A frozen SAM2 image predictor. Without a checkpoint its weights are random: the masks are
    then meaningless, so this says so loudly (the plumbing still runs end to end).

    config (--sam2-config): a model config of the sam2 package by its package name
    ("configs/sam2.1/sam2.1_hiera_t.yaml") or by the bare file name SAM2's README shows
    ("sam2.1_hiera_t.yaml", ".yaml" optional), or a YAML file anywhere (absolute or relative path).
    SAM2's build_sam2 composes configs with hydra, which finds only names inside the package: a file
    elsewhere is composed from its own folder. Raises SystemExit listing the package's names for
    anything else."""
    try:
        import sam2
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor
    except ImportError as e:
        raise SystemExit(f"SAM2 is not installed ({e}): pip install sam2 (on a machine without CUDA: "
                         "SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2), or use --executor box")
    name, folder = sam2_config_name(config, Path(sam2.__file__).resolve().parent)
    if not ckpt:
        print("\n" + "!" * 88 + "\n!! SAM2 HAS RANDOM WEIGHTS (no --sam2-ckpt): its masks, gIoU and cIoU are MEANINGLESS."
              "\n!! Pass --sam2-ckpt sam2.1_hiera_tiny.pt (or _large.pt with the matching --sam2-config),"
              "\n!! or --executor box for a SAM-free floor. box_iou does not depend on SAM2.\n" + "!" * 88,
              file=sys.stderr, flush=True)
    if folder is None:
        return SAM2ImagePredictor(build_sam2(name, ckpt_path=ckpt, device=device))
    from hydra import initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()            # hydra has one search path at a time: the file's folder
    try:
        with initialize_config_dir(config_dir=str(folder), version_base="1.2"):
            return SAM2ImagePredictor(build_sam2(name, ckpt_path=ckpt, device=device))
    finally:
        GlobalHydra.instance().clear()
        initialize_config_module("sam2", version_base="1.2")       # the search path `import sam2` sets


SAM2_CONFIG_FOLDERS = ("", "configs/sam2.1", "configs/sam2")   # where the sam2 package ships model configs


def sam2_config_name(config, package):
    """--sam2-config -> (config name, folder) for build_sam2: folder None for a config of the sam2
    package (`package`: its directory), else the folder of a YAML file outside it (load_sam2)."""
    file = Path(config).expanduser()
    if file.is_file():
        file = file.resolve()
        if file.is_relative_to(package):
            return file.relative_to(package).as_posix(), None
        return file.name, file.parent
    name = config if config.endswith(".yaml") else config + ".yaml"
    for folder in SAM2_CONFIG_FOLDERS:
        if (package / folder / name).is_file():
            return (Path(folder) / name).as_posix(), None
    known = sorted(p.relative_to(package).as_posix() for folder in SAM2_CONFIG_FOLDERS[1:]
                   for p in (package / folder).glob("*.yaml"))
    raise SystemExit(f"--sam2-config {config!r}: no such file, nor a config of the sam2 package ({package}). "
                     "Give a YAML file, or one of " + ", ".join(known)
                     + " (or its bare file name, e.g. sam2.1_hiera_t.yaml)")


@torch.no_grad()
def sam2_mask(predictor, image, box, points=()):
    """Box (+ points, all positive clicks) in pixels -> the best-scoring of SAM2's masks, HxW bool."""
    predictor.set_image(np.asarray(image.convert("RGB")))
    coords = np.asarray(points, dtype=np.float32) if len(points) else None
    labels = np.ones(len(points), dtype=np.int32) if len(points) else None
    masks, scores, _ = predictor.predict(point_coords=coords, point_labels=labels,
                                         box=np.asarray(box, dtype=np.float32), multimask_output=True)
    return np.asarray(masks[int(np.argmax(scores))]) > 0


def box_mask(image_size, box):
    """The filled box (rounded outwards, clipped) as an HxW bool mask: the SAM-free executor."""
    w, h = image_size
    mask = np.zeros((h, w), dtype=bool)
    x1, y1 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x2, y2 = min(w, math.ceil(box[2])), min(h, math.ceil(box[3]))
    mask[y1:y2, x1:x2] = True
    return mask


# ============================================================================ evaluation
# A run's data decide its wording: args.shapes = data.is_shapes(the records), set where they are read.
def grounding(args):
    return getattr(args, "eval_prompt", "seg") == "grounding"


def input_side(args):
    """The side of the square the model's images are resized to (--image-side, Seg-Zero's 840), or None:
    never for shapes-world data, nor for the grounding prompt (Qwen2.5-VL as it is used)."""
    side = getattr(args, "image_side", 0)
    return side if side and not getattr(args, "shapes", False) and not grounding(args) else None


def train_prompt(instruction, image, model_type, processor, args):
    """The training prompt for one (image, instruction): the data's wording, --no-cot / --no-points,
    and for shapes-world data the model's box frame."""
    return prompt_text(instruction, args.cot, args.points, vlm.box_frame(model_type, image.size, processor),
                       getattr(args, "shapes", False))


def eval_prompt(rec, image, model_type, processor, args):
    """--eval's prompt for one record: the training prompt, or with --eval-prompt grounding the
    checkpoint's own grounding prompt, word for word (no frame note: the model knows its frame)."""
    if grounding(args):
        return data.prompt("grounding", rec)
    return train_prompt(rec["instruction"], image, model_type, processor, args)


def eval_answer(text, image, model_type, processor, args):
    """--eval's reading of a greedy answer -> (box, points) in pixels, as read_answer()."""
    if grounding(args):
        box = rewards.parse_grounding_box(text)
        return (box_to_pixels(box, image, model_type, processor), []) if box else (None, [])
    return read_answer(text, image, model_type, processor, args.points, getattr(args, "shapes", False),
                       input_side(args))


def sample_problem(rec, processor, model_type, args, training=False):
    """Why a record's prompt (--eval's, or with `training` the training prompt) cannot be processed
    (too long, an image the processor refuses), or None."""
    try:
        image = data.open_image(rec["image_path"])
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    text = train_prompt(rec["instruction"], image, model_type, processor, args) if training \
        else eval_prompt(rec, image, model_type, processor, args)
    conv = [vlm.user_turn(text)]
    return vlm.prompt_problem(processor, conv, [model_image(image, input_side(args))], args.max_prompt_len)


def summarise(rows):
    """Per-sample rows -> eval.json numbers. gIoU and cIoU as rewards.mask_iou_stats (mean of
    per-sample IoU; total intersection / total union), from counts so ranks can merge them.
    An unparsable answer (box None) scores IoU 0, whatever the GT mask. Samples that could not
    be processed (rows with "skipped") are left out of the scores and counted in skipped_samples."""
    n_skipped = sum("skipped" in r for r in rows)
    rows = [r for r in rows if "skipped" not in r]
    with_mask = [r for r in rows if r.get("union") is not None]
    giou, ciou = rewards.iou_from_counts([(r["inter"], r["union"]) for r in with_mask],
                                         [r["box"] is not None for r in with_mask])
    with_box = [r for r in rows if r.get("box_iou") is not None]
    return {"giou": giou if with_mask else None, "ciou": ciou if with_mask else None,
            "box_iou": float(np.mean([r["box_iou"] for r in with_box])) if with_box else None,
            "unparsable": sum(r["box"] is None for r in rows), "n": len(rows), "skipped_samples": n_skipped,
            **({"r_sem": float(np.mean([r["r_sem"] for r in rows]))} if rows and "r_sem" in rows[0] else {})}


def save_vis(path, image, rec, row, pred_mask, gt_mask):
    """One PNG: the image, the predicted mask (tinted), the GT outline, the box, the points, the
    instruction, and the chain of thought."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    fig, ax = plt.subplots(figsize=(4.5, 5.6))
    ax.imshow(image)
    if pred_mask is not None and pred_mask.any():
        tint = np.zeros((*pred_mask.shape, 4))
        tint[pred_mask] = (0.0, 1.0, 1.0, 0.45)
        ax.imshow(tint)
    if gt_mask is not None:
        ax.contour(gt_mask.astype(float), levels=[0.5], colors="white", linewidths=1, linestyles="dashed")
    if row["box"] is not None:
        x1, y1, x2, y2 = row["box"]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="magenta", linewidth=2))
        for x, y in row["points"]:
            ax.plot([x], [y], marker="*", color="yellow", markeredgecolor="black", markersize=12)
    ax.set_axis_off()
    iou = row["inter"] / row["union"] if row.get("union") else None
    ax.set_title(textwrap.fill(f"{rec['instruction']}" + (f"  (mask IoU {iou:.2f})" if iou is not None else ""), 50),
                 fontsize=9)
    think = rewards.parse_think_answer(row["text"])
    cot = think[0] if think else row["text"]
    fig.text(0.03, 0.02, textwrap.fill(cot[:600] or "(empty)", 70), fontsize=7, va="bottom", family="monospace")
    fig.subplots_adjust(top=0.9, bottom=0.24)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def make_executor(args, device):
    if args.executor == "box":
        return lambda image, box, points: box_mask(image.size, box)
    predictor = load_sam2(args.sam2_config, args.sam2_ckpt, device)
    return lambda image, box, points: sam2_mask(predictor, image, box, points if args.points else ())


@torch.no_grad()
def evaluate(model, processor, records, args, executor, rank=0, world=1, vis_dir=None, clip=None):
    """Greedy answers on `records` -> masks -> per-sample rows (all ranks' rows, merged).

    Unparsable answers get an empty mask and count as `unparsable`; nothing raises on bad text.
    The model sees model_image(image, input_side(args)); SAM2 and the scores use the original image.
    A record's "ignore" pixels (ReasonSeg's, convert.convert_reasonseg) are in neither the intersection
    nor the union. box_iou compares the predicted box with the tight box of the GT mask. With a
    `clip` scorer each row also gets r_sem, the training reward of its box (0 when unparsable).
    The records' data pick the prompt and answer format (data.is_shapes), never the model.
    """
    args = copy.copy(args)
    args.shapes = data.is_shapes(records)
    model_type, rows, n_vis = model.config.model_type, [], 0
    mine = run.shard(records, rank, world)
    bs = args.eval_batch_size
    for start in tqdm(range(0, len(mine), bs), desc="eval", disable=rank != 0):
        # a sample that cannot be processed: a row that says why
        chunk, bad = run.partition(mine[start:start + bs], lambda r: sample_problem(r, processor, model_type, args))
        rows += [{"id": r["id"], "instruction": r["instruction"], "skipped": why} for r, why in bad]
        if not chunk:
            continue
        images = [data.open_image(r["image_path"]) for r in chunk]
        batch = vlm.chat_inputs(processor, [[vlm.user_turn(eval_prompt(r, im, model_type, processor, args))]
                                            for r, im in zip(chunk, images)],
                                [[model_image(im, input_side(args))] for im in images],
                                max_prompt_len=args.max_prompt_len)
        with vlm.generation_mode(model):
            texts = vlm.sample(model, processor, batch, 1, args.eval_max_new_tokens, do_sample=False)["texts"]
        for rec, image, text in zip(chunk, images, texts):
            box, points = eval_answer(text, image, model_type, processor, args)
            if box is not None and rewards.crop_box(image, box) is None:
                box, points = None, []                  # entirely outside the image: nothing to segment
            gt_mask = data.read_mask(rec["mask_path"]) if rec.get("mask_path") else None   # 0/1, 0/255, P, RGB
            gt_box = data.mask_box(gt_mask) if gt_mask is not None else rec.get("box")
            pred_mask = executor(image, box, points) if box is not None else None
            row = {"id": rec["id"], "instruction": rec["instruction"], "text": text,
                   "box": [round(v, 2) for v in box] if box else None,
                   "points": [[round(v, 2) for v in p] for p in points],
                   "box_iou": (rewards.box_iou(box, gt_box) if box else 0.0) if gt_box else None}
            if gt_mask is not None:       # ReasonSeg's "ignore" pixels count in neither (LISA's protocol)
                ignore = data.read_mask(rec["ignore_mask_path"]) if rec.get("ignore_mask_path") else None
                row["inter"], row["union"] = rewards.mask_counts(pred_mask, gt_mask, ignore)
            if clip is not None:
                row["r_sem"] = rewards.clip_semantic_reward(*clip, image, [box], rec["instruction"])[0]
            rows.append(row)
            if vis_dir is not None and rank == 0 and n_vis < args.n_vis:
                save_vis(Path(vis_dir) / f"{rec['id']}.png", image, rec, row, pred_mask, gt_mask)
                n_vis += 1
    return run.gather_records(rows)


# ============================================================================ --eval
def evaluate_run(args, rank, world, out):
    """`--eval`: policy -> box + points -> SAM2 (or the box) -> mask -> gIoU / cIoU / box IoU,
    written to OUT/predictions.jsonl and OUT/eval.json."""
    device = "cuda" if vlm.on_gpu() else "cpu"
    manifest = run.manifest_path(args.test, "test", args.seed, "seg")
    records, _, skipped = run.records(manifest, args.skip_bad, task="seg")
    records = records[:args.n_test]
    args.shapes = data.is_shapes(records)            # the data pick the prompt and answer format, never the model
    model, processor = vlm.load_model(args.model, max_pixels=args.max_pixels)
    if args.save_vis and rank == 0:
        Path(args.save_vis).mkdir(parents=True, exist_ok=True)
    # R_sem of the predicted boxes too, when the scorer is at hand without a download
    name, ckpt = scorer_name(args, records)
    clip = load_clip(name, ckpt, device) if name == "shapes" or args.clip_ckpt else None
    rows = evaluate(model, processor, records, args, make_executor(args, device), rank, world, args.save_vis, clip)
    if rank == 0:
        result = {**summarise(rows), "executor": args.executor, "eval_prompt": args.eval_prompt,
                  "image_side": input_side(args),
                  "model": str(args.model), "test": str(manifest), "skipped": skipped}
        if args.executor == "sam2":
            result.update(sam2_config=args.sam2_config, sam2_ckpt=args.sam2_ckpt, sam2_random_weights=not args.sam2_ckpt)
        (out / "eval.json").write_text(json.dumps(result, indent=1))
        data.write_jsonl(out / "predictions.jsonl", rows)
        print(json.dumps(result))
    run.barrier()


def main(argv=None):
    """Seg-RISE training (GRPO on R_sem + R_think + R_seg), or with --eval only the evaluation of --model."""
    args = parse_args(argv)
    return (evaluate_run if args.eval else train)(args, *run.start(args, "seg_rise"))


if __name__ == "__main__":
    main()
    run.exit_finished()        # the run is complete: skip the interpreter's teardown
