"""data.py -- datasets and prompts for the three pipelines (SPEC sections 3 and 5).

  1. manifest I/O    read_manifest() validates a JSONL manifest, write_jsonl() writes one
  2. shapes world    a deterministic synthetic data set of coloured shapes (the default data)
  3. prompts, text   prompt templates, answer formatting, scene descriptions ("CoTs")
  4. converters      from the original dataset layouts (Emotion6, LISA, COCO, ...)
  5. command line    python data.py shapes --out DIR [--n-train N] [--n-test M] [--seed S]
Only the standard library, numpy and Pillow are used, so any function can be copied alone.
"""
import argparse
import json
import math
import os
import pickle
import re
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


# ============================================================================ 1. manifest I/O
# A manifest is a JSONL file, one record per line; image paths are relative to its folder.
# Extra fields are allowed and kept. "cls" covers soft and one-hot classification.
REQUIRED = {
    "cls": ("id", "image", "classes", "probs"),
    "det": ("id", "image", "target", "boxes"),
    "seg": ("id", "image", "instruction"),            # optional: "mask", "box"
    "vqa": ("id", "image", "question", "answer"),     # optional: "box"
}


class ManifestError(ValueError):
    """A bad manifest record; the message starts with "<path>:<line>: "."""

    def __init__(self, path, line, reason):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = str(path), line, reason


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _nonempty_str(x):
    return isinstance(x, str) and x.strip() != ""


def box_problem(box):
    """What is wrong with a pixel box [x1, y1, x2, y2], or None if nothing is."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(map(_is_number, box)):
        return f"box {box!r} is not 4 numbers"
    if not all(math.isfinite(v) for v in box):
        return f"box {box!r} has a non-finite number"
    if min(box) < 0:
        return f"box {box!r} has a negative coordinate"
    if box[2] <= box[0] or box[3] <= box[1]:
        return f"box {box!r} is degenerate (needs x2 > x1 and y2 > y1)"
    return None


def _record_problem(rec, task, base, seen_ids):
    """What is wrong with one parsed record, or None. Cheap checks first, the image last."""
    if not isinstance(rec, dict):
        return "record is not a JSON object"
    missing = [k for k in REQUIRED[task] if k not in rec]
    if missing:
        return "missing field(s): " + ", ".join(missing)
    if not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool):
        return f"id {rec['id']!r} is not a string or an integer"
    if rec["id"] in seen_ids:
        return f"duplicate id {rec['id']!r} (first on line {seen_ids[rec['id']]})"
    if not _nonempty_str(rec["image"]):
        return "image is not a non-empty path"
    if task == "cls":
        classes, probs = rec["classes"], rec["probs"]
        if not isinstance(classes, list) or not classes or not all(map(_nonempty_str, classes)):
            return "classes is not a non-empty list of names"
        if len(set(classes)) != len(classes):
            return "classes has duplicate names"
        if not isinstance(probs, list) or not all(map(_is_number, probs)):
            return "probs is not a list of numbers"
        if len(probs) != len(classes):
            return f"{len(classes)} classes but {len(probs)} probs"
        if not all(math.isfinite(p) for p in probs):
            return "probs has a non-finite value"
        if min(probs) < 0:
            return f"negative probability {min(probs)}"
        if abs(sum(probs) - 1.0) > 1e-2:
            return f"probs sum to {sum(probs):.4f}, not 1"
    elif task == "det":
        if not _nonempty_str(rec["target"]):
            return "target is not a non-empty string"
        if not isinstance(rec["boxes"], list) or not rec["boxes"]:
            return "boxes is not a non-empty list of boxes"
        problems = [box_problem(b) for b in rec["boxes"] if box_problem(b)]
        if problems:
            return problems[0]
    else:
        for key in REQUIRED[task][2:]:
            if not _nonempty_str(rec[key]):
                return f"{key} is not a non-empty string"
        if rec.get("box") is not None and box_problem(rec["box"]):
            return box_problem(rec["box"])
        if task == "seg" and rec.get("mask") is not None:
            if not _nonempty_str(rec["mask"]):
                return "mask is not a path"
            if not (base / rec["mask"]).is_file():
                return f"mask file not found: {base / rec['mask']}"
    image = base / rec["image"]
    if not image.is_file():
        return f"image file not found: {image}"
    try:
        with Image.open(image) as im:
            im.verify()        # reads headers/chunks only, no full decode
    except Exception as e:     # PIL raises many types for broken files
        return f"unreadable image {image}: {type(e).__name__}: {e}"
    return None


def read_manifest(path, task, skip_bad=False):
    """Read and validate a manifest. Returns (records, n_skipped).

    task: "cls" | "det" | "seg" | "vqa". Each record comes back with its original fields plus
    "image_path" (absolute) and, for a segmentation record with a mask, "mask_path".
    A bad record raises ManifestError naming file:line, or, with skip_bad=True, is skipped
    with a warning on stderr and counted. Blank lines are not records and are ignored.
    """
    if task not in REQUIRED:
        raise ValueError(f"task must be one of {sorted(REQUIRED)}, not {task!r}")
    path = Path(path)
    base = path.parent.resolve()
    records, seen_ids, n_skipped = [], {}, 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                why = _record_problem(rec, task, base, seen_ids)
            except json.JSONDecodeError as e:
                why = f"invalid JSON ({e.msg}, column {e.colno})"
            if why is not None:
                if not skip_bad:
                    raise ManifestError(path, lineno, why)
                print(f"warning: skipped {path}:{lineno}: {why}", file=sys.stderr)
                n_skipped += 1
                continue
            seen_ids[rec["id"]] = lineno
            rec = dict(rec, image_path=str(base / rec["image"]))
            if task == "seg" and rec.get("mask") is not None:
                rec["mask_path"] = str(base / rec["mask"])
            records.append(rec)
    if n_skipped:
        print(f"warning: {path}: skipped {n_skipped} bad record(s), kept {len(records)}",
              file=sys.stderr)
    return records, n_skipped


def write_jsonl(path, records):
    """Write records one per line, fields in their given order, UTF-8 kept as is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


# ============================================================================ 2. shapes world
# Small images of coloured circles, squares and triangles on a plain light-grey background.
# A shape is {"color", "shape", "box": [x1, y1, x2, y2]} with x2 = x1 + size (integers).
# Boxes are half-open: the shape's pixels are columns x1..x2-1 and rows y1..y2-1, so the
# box is the shape's exact extent (as for a box computed from a mask). Shapes are drawn
# without antialiasing, so a mask is exactly the pixels of the shape's colour.
IMAGE_SIZE = 112
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (230, 200, 30)}
SHAPES = ["circle", "square", "triangle"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
SHAPE_TASKS = ["soft_cls", "onehot_cls", "det", "multi_det", "seg", "vqa"]
GAP = 2   # minimum empty pixels between two shapes' boxes


def _draw_shape(draw, shape, fill):
    x1, y1, x2, y2 = shape["box"]
    x2, y2 = x2 - 1, y2 - 1                      # PIL includes the last pixel
    if shape["shape"] == "circle":
        draw.ellipse((x1, y1, x2, y2), fill=fill)
    elif shape["shape"] == "square":
        draw.rectangle((x1, y1, x2, y2), fill=fill)
    else:
        draw.polygon([(x1, y2), (x2, y2), ((x1 + x2) / 2, y1)], fill=fill)


def render(scene, background):
    """The RGB image of a scene on a grey background level (0..255)."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (background,) * 3)
    draw = ImageDraw.Draw(image)
    for shape in scene:
        _draw_shape(draw, shape, COLORS[shape["color"]])
    return image


def shape_mask(shape):
    """Boolean HxW mask of one shape: the same drawing on an "L" image."""
    image = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    _draw_shape(ImageDraw.Draw(image), shape, 255)
    return np.asarray(image) > 0


def _rng(seed, task, split):
    # A stable seed from (seed, task, split); Python's hash() of a str changes per process.
    return np.random.default_rng([seed, zlib.crc32(task.encode()), zlib.crc32(split.encode())])


def _pick(rng, items):
    return items[int(rng.integers(len(items)))]


def _apart(a, b):
    return (a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or
            a[3] + GAP <= b[1] or b[3] + GAP <= a[1])


def _scene(rng, specs, tries=200):
    """Place shapes given as (color, kind, min_size, max_size) without overlap.

    Rejection sampling, biggest first; if a shape does not fit after `tries` positions,
    all sizes are drawn again. Returns the scene in the order of `specs`.
    """
    while True:
        sizes = [int(rng.integers(lo, hi + 1)) for _, _, lo, hi in specs]
        boxes = [None] * len(specs)
        for i in sorted(range(len(specs)), key=lambda i: -sizes[i]):
            s = sizes[i]
            for _ in range(tries):
                x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - s + 1, size=2))
                box = [x, y, x + s, y + s]
                if all(b is None or _apart(box, b) for b in boxes):
                    boxes[i] = box
                    break
            else:
                break
        else:
            return [{"color": c, "shape": k, "box": b} for (c, k, _, _), b in zip(specs, boxes)]


def _round_probs(weights):
    """Normalise, round to 2 decimals, and fix the largest so the hundredths sum to 100."""
    total = sum(weights)
    cents = [round(100 * w / total) for w in weights]
    cents[max(range(len(cents)), key=cents.__getitem__)] += 100 - sum(cents)
    return [c / 100 for c in cents]


# Each generator returns (scene, task fields in record order, mask array or None).
def _gen_soft_cls(rng):
    n = int(rng.integers(2, 5))
    scene = _scene(rng, [(_pick(rng, list(COLORS)), _pick(rng, SHAPES), 14, 44) for _ in range(n)])
    area = dict.fromkeys(COLORS, 0)
    for shape in scene:
        area[shape["color"]] += int(shape_mask(shape).sum())
    return scene, {"classes": list(COLORS), "probs": _round_probs(list(area.values()))}, None


def _gen_onehot_cls(rng):
    big = _pick(rng, SHAPES)
    others = [k for k in SHAPES if k != big]
    n_small = int(rng.integers(1, 3))
    specs = [(_pick(rng, list(COLORS)), big, 40, 56)]
    specs += [(_pick(rng, list(COLORS)), _pick(rng, others), 12, 20) for _ in range(n_small)]
    probs = [1.0 if k == big else 0.0 for k in SHAPES]
    return _scene(rng, specs), {"classes": list(SHAPES), "probs": probs}, None


def _unique_target_scene(rng, lo, hi):
    """A target (colour, kind) that occurs once, plus 1-3 distractors with distinct pairs."""
    pairs = [(c, k) for c in COLORS for k in SHAPES]
    n = 1 + int(rng.integers(1, 4))
    chosen = rng.choice(len(pairs), size=n, replace=False)
    scene = _scene(rng, [(*pairs[i], lo, hi) for i in chosen])
    return scene, scene[int(rng.integers(n))]


def _gen_det(rng):
    scene, t = _unique_target_scene(rng, 16, 40)
    return scene, {"target": f"the {t['color']} {t['shape']}", "boxes": [t["box"]]}, None


def _gen_multi_det(rng):
    kind = _pick(rng, SHAPES)
    others = [k for k in SHAPES if k != kind]
    n_kind, n_other = int(rng.integers(1, 4)), int(rng.integers(1, 3))
    kinds = [kind] * n_kind + [_pick(rng, others) for _ in range(n_other)]
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    scene = _scene(rng, [(_pick(rng, list(COLORS)), k, 14, 32) for k in kinds])
    boxes = sorted((s["box"] for s in scene if s["shape"] == kind), key=lambda b: (b[1], b[0]))
    return scene, {"target": PLURAL[kind], "boxes": boxes}, None


def _gen_seg(rng):
    scene, t = _unique_target_scene(rng, 16, 40)
    fields = {"instruction": f"the {t['color']} {t['shape']}", "mask": None, "box": t["box"]}
    return scene, fields, shape_mask(t)


def _gen_vqa(rng):
    half, scene = IMAGE_SIZE // 2, []
    for qy, qx in [(0, 0), (0, 1), (1, 0), (1, 1)]:     # top-left, top-right, bottom-left, ...
        s = int(rng.integers(12, 23))
        x = int(rng.integers(qx * half + GAP, (qx + 1) * half - GAP - s + 1))
        y = int(rng.integers(qy * half + GAP, (qy + 1) * half - GAP - s + 1))
        scene.append({"color": _pick(rng, list(COLORS)), "shape": _pick(rng, SHAPES),
                      "box": [x, y, x + s, y + s]})
    shape = scene[int(rng.integers(4))]
    where = position_word(shape["box"], grid=2)
    if rng.integers(2) == 0:
        question, answer = f"What colour is the shape in the {where}?", shape["color"]
    else:
        question, answer = f"What shape is in the {where}?", shape["shape"]
    return scene, {"question": question, "answer": answer, "box": shape["box"]}, None


GENERATORS = {"soft_cls": _gen_soft_cls, "onehot_cls": _gen_onehot_cls, "det": _gen_det,
              "multi_det": _gen_multi_det, "seg": _gen_seg, "vqa": _gen_vqa}
MANIFEST_TASK = {"soft_cls": "cls", "onehot_cls": "cls", "det": "det", "multi_det": "det",
                 "seg": "seg", "vqa": "vqa"}   # the read_manifest task of each shapes task


def make_shapes_world(out, n_train=64, n_test=32, seed=0):
    """Write OUT/<task>/{train,test}.jsonl, images/ (and masks/ for seg) for every task.

    Deterministic: the same arguments give byte-identical files. Returns
    {task: {"train": manifest path, "test": manifest path}}.
    """
    out, paths = Path(out), {}
    for task in SHAPE_TASKS:
        folder = out / task
        (folder / "images").mkdir(parents=True, exist_ok=True)
        if task == "seg":
            (folder / "masks").mkdir(exist_ok=True)
        paths[task] = {}
        for split, n in (("train", n_train), ("test", n_test)):
            rng, records = _rng(seed, task, split), []
            for i in range(n):
                background = int(rng.integers(200, 246))
                scene, fields, mask = GENERATORS[task](rng)
                name = f"{split}_{i:05d}.png"
                render(scene, background).save(folder / "images" / name)
                if mask is not None:
                    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / name)
                    fields["mask"] = f"masks/{name}"
                records.append({"id": f"{task}-{split}-{i:05d}", "image": f"images/{name}",
                                **fields, "scene": scene})
            paths[task][split] = folder / f"{split}.jsonl"
            write_jsonl(paths[task][split], records)
    return paths


# ============================================================================ 3. prompts, text
# The exact texts the tiny model is pretrained on; change them only together with vlm.py.
COT_PROMPT_CLS = ("The answer is {annotation}. Describe the image so that someone could infer "
                  "this answer from your description alone. Do not write any numbers{no_names}.")
NO_NAMES = " or class names"
COT_PROMPT_DET = ("The {target} is at {annotation}. Describe where it is and what is around it "
                  "so that someone could find it from your description alone. "
                  "Do not write any numbers or coordinates.")
COT_PROMPT_MULTI_DET = ("The {target} are at {annotation}. Describe where they are and what is "
                        "around them so that someone could find them from your description "
                        "alone. Do not write any numbers or coordinates.")
REC_PROMPT_CLS = ("Description: {cot}\nUsing the image and the description, give the probability "
                  "of each class in {class_list} as JSON.")
REC_PROMPT_DET = ("Description: {cot}\nUsing the image and the description, give the box of "
                  "{target} as [x1,y1,x2,y2].")
REC_PROMPT_MULTI_DET = ("Description: {cot}\nUsing the image and the description, give the boxes "
                        "of all {target} as [[x1,y1,x2,y2], ...].")
R1_PROMPT_CLS = ("Give the probability of each class in {class_list}. Think in <think></think>, "
                 "then answer in <answer></answer> with JSON.")
R1_PROMPT_DET = ("Find {target}. Think in <think></think>, then answer in <answer></answer> "
                 "with [x1,y1,x2,y2].")
R1_PROMPT_MULTI_DET = ("Find {target}. Think in <think></think>, then answer in <answer></answer> "
                       "with [[x1,y1,x2,y2], ...].")
PLAIN_PROMPT_CLS = "Give the probability of each class in {class_list} as JSON."
PLAIN_PROMPT_DET = "Give the box of {target} as [x1,y1,x2,y2]."
PLAIN_PROMPT_MULTI_DET = "Give the boxes of all {target} as [[x1,y1,x2,y2], ...]."
SEG_PROMPT = ('Find {instruction}. Think in <think></think>, then answer in <answer></answer> '
              'with JSON {{"bbox": [x1,y1,x2,y2], "points": [[x,y],[x,y]]}}.')
SEG_PROMPT_NO_COT = ('Find {instruction}. Answer in <answer></answer> with JSON '
                     '{{"bbox": [x1,y1,x2,y2], "points": [[x,y],[x,y]]}}.')
VISRL_BOX_PROMPT = ("{question} Please first give the box of the region that helps answer the "
                    "question as [x1,y1,x2,y2] in 0..1.")
VISRL_ANSWER_PROMPT = ("This is the region you chose. Now answer the question in one word: "
                       "{question}")
CRITIC_BOX_PROMPT = ('Question: {question} Reference answer: {answer}. Does this image show what '
                     'is needed to give the reference answer? Reply with JSON {{"score": x}}, '
                     'x between 0 and 1.')
CRITIC_ANSWER_PROMPT = ('Question: {question} Reference answer: {reference} Candidate answer: '
                        '{answer}. How close is the candidate to the reference? Reply with JSON '
                        '{{"score": x}}, x between 0 and 1.')


def class_list(classes):
    return ", ".join(classes)


def format_probs(classes, probs):
    """'{"red": 0.50, "green": 0.00, ...}' with 2 decimals, in class order."""
    items = (f"{json.dumps(c, ensure_ascii=False)}: {float(p) + 0.0:.2f}"
             for c, p in zip(classes, probs))
    return "{" + ", ".join(items) + "}"


def format_box(box):
    return "[" + ",".join(str(int(round(v))) for v in box) + "]"


def format_boxes(boxes):
    return "[" + ",".join(format_box(b) for b in boxes) + "]"


def format_norm_box(box, width, height):
    """A pixel box as VisRL's normalised '[0.12,0.30,0.56,0.78]' (2 decimals, 0..1)."""
    scale = (width, height, width, height)
    return "[" + ",".join(f"{min(max(v / s, 0.0), 1.0):.2f}" for v, s in zip(box, scale)) + "]"


def cot_prompt_cls(classes, probs, mask_names=True):
    return COT_PROMPT_CLS.format(annotation=format_probs(classes, probs),
                                 no_names=NO_NAMES if mask_names else "")


def cot_prompt_det(target, boxes, multi=False):
    """COT_PROMPT_DET starts with "The {target}", so a leading "the " is dropped from target."""
    if target.lower().startswith("the "):
        target = target[4:]
    if multi:
        return COT_PROMPT_MULTI_DET.format(target=target, annotation=format_boxes(boxes))
    return COT_PROMPT_DET.format(target=target, annotation=format_box(boxes[0]))


def position_word(box, size=IMAGE_SIZE, grid=3):
    """Where a box's centre is: 3x3 grid -> "top-left", "top", ..., "centre", ..., "bottom-right";
    grid=2 -> the quadrants "top-left", "top-right", "bottom-left", "bottom-right"."""
    col = min(int((box[0] + box[2]) / 2 * grid / size), grid - 1)
    row = min(int((box[1] + box[3]) / 2 * grid / size), grid - 1)
    if grid == 2:
        return ["top", "bottom"][row] + "-" + ["left", "right"][col]
    r, c = ["top", "middle", "bottom"][row], ["left", "centre", "right"][col]
    if r == "middle":
        return c
    return r if c == "centre" else f"{r}-{c}"


MASKED_KIND = {"circle": "round shape", "square": "boxy shape", "triangle": "pointed shape"}


def size_word(box):
    """"small" (< 22 px), "" (medium) or "large" (>= 34 px)."""
    side = max(box[2] - box[0], box[3] - box[1])
    return "small" if side < 22 else "large" if side >= 34 else ""


def _noun(shape, with_names):
    kind = f"{shape['color']} {shape['shape']}" if with_names else MASKED_KIND[shape["shape"]]
    return " ".join(w for w in (size_word(shape["box"]), kind) if w)


def _where(box):
    word = position_word(box)
    return {"centre": "in the centre", "left": "on the left",
            "right": "on the right"}.get(word, f"at the {word}")


def _centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _relation(a, b):   # where box a is relative to box b
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    if abs(ax - bx) >= abs(ay - by):
        return "to the left of" if ax < bx else "to the right of"
    return "above" if ay < by else "below"


INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of",
           "above": "below", "below": "above"}


def describe_scene(scene, rng, with_names=True, target=None):
    """A short description without digits or number words (the "chain of thought" the tiny
    model learns). with_names=False hides colours and kind names ("a large round shape").
    With a target shape, says where it is in the image and relative to its nearest neighbour.
    Deterministic given rng (a numpy Generator)."""
    if target is None:
        shapes = sorted(scene, key=lambda s: -(s["box"][2] - s["box"][0]))   # biggest first
        parts = [f"a {_noun(s, with_names)} {_where(s['box'])}" for s in shapes]
        listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        opener = _pick(rng, ["The image shows {}.", "There is {}.", "I can see {}.",
                             "On a grey background there is {}."])
        return opener.format(listing)
    others = [s for s in scene if s != target]
    name = _noun(target, with_names)
    sentences = [_pick(rng, ["The {n} is {w} of the image.", "The {n} sits {w}.",
                             "You can find the {n} {w}."]).format(n=name, w=_where(target["box"]))]
    if others:
        tc = _centre(target["box"])
        near = min(others, key=lambda s: math.dist(tc, _centre(s["box"])))
        rel, other = _relation(target["box"], near["box"]), _noun(near, with_names)
        if rng.integers(2) == 0:
            sentences.append(f"It is {rel} a {other}.")
        else:
            sentences.append(f"A {other} lies {INVERSE[rel]} it.")
        rest = [s for s in others if s != near][:2]
        if rest:
            sentences.append("There is also " + " and ".join(
                f"a {_noun(s, with_names)} {_where(s['box'])}" for s in rest) + ".")
    return " ".join(sentences)


# ============================================================================ 4. converters
# From the layouts the datasets are distributed in to the manifests of section 1. Images are
# referenced where they lie (paths relative to the output manifest's folder), never copied;
# only masks are written. A bad input record raises ManifestError naming the input file and
# the line or entry; with skip_bad=True it is skipped, reported on stderr and counted. Nothing
# is dropped silently. Random choices use _rng(seed, dataset, class or split), so the same
# seed gives byte-identical files and one class's sample does not depend on the others.
# Every converter returns ({name: manifest path}, number of skipped records).
EMOTION6_CLASSES = ["anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VISCOT_COT_PROMPTS = (   # appended to every VisCoT question (tools/convert_data_to_llava_format.py)
    "Please provide the bounding box coordinate of the region that can help you answer the "
    "question better.",
    "Please think step by step and provide the bounding box coordinate of the region that can "
    "help you answer the question better.")


class _Bad(Exception):
    """One bad input record: the converter's loop turns it into an error or a counted skip."""

    def __init__(self, reason, where=None):
        super().__init__(reason)
        self.reason, self.where = reason, where


class _Skips:
    """bad(path, where, reason): raise ManifestError, or with skip_bad warn and count."""

    def __init__(self, skip_bad):
        self.skip_bad, self.count = skip_bad, 0

    def __call__(self, path, where, reason):
        if not self.skip_bad:
            raise ManifestError(path, where, reason)
        print(f"warning: skipped {path}:{where}: {reason}", file=sys.stderr)
        self.count += 1


def _image_size(path):
    """(width, height) of a readable image; raises _Bad saying what is wrong otherwise."""
    path = Path(path)
    if not path.is_file():
        raise _Bad(f"image file not found: {path}", "image")
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()        # reads headers/chunks only, no full decode
    except Exception as e:     # PIL raises many types for broken files
        raise _Bad(f"unreadable image {path}: {type(e).__name__}: {e}", "image") from None
    return size


def _rel(path, folder):
    """path relative to folder, with "/": the manifest points at the image where it lies."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(folder))).as_posix()


def _load_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ManifestError(path, e.lineno, f"invalid JSON ({e.msg}, column {e.colno})") from None


def _save_mask(mask, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)     # 0 / 255, mode "L"


def mask_box(mask):
    """Tight half-open box [x1, y1, x2, y2] of a boolean mask (columns x1..x2-1, rows
    y1..y2-1, as shapes-world boxes), or None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _xywh_box(bbox):
    """COCO [x, y, w, h] -> [x1, y1, x2, y2], to COCO's own 2 decimals; raises _Bad."""
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(map(_is_number, bbox)):
        raise _Bad(f"bbox {bbox!r} is not 4 numbers")
    x, y, w, h = bbox
    box = [round(x, 2), round(y, 2), round(x + w, 2), round(y + h, 2)]
    if box_problem(box):
        raise _Bad(f"bbox {bbox!r}: {box_problem(box)}")
    return box


# ---------------------------------------------------------------- Emotion6 (RISE, soft labels)
def convert_emotion6(root, out, seed=0, test_frac=0.3, skip_bad=False):
    """ROOT/images/<emotion>/<n>.jpg + ROOT/ground_truth.txt -> OUT/{train,test}.jsonl.

    ground_truth.txt is tab-separated with a header ("[image_filename]", "[valence]",
    "[arousal]", "[prob. anger]", ...); columns are found by their header name. The seven
    probabilities must be finite, >= 0 and sum to 1 within 1e-2; they are renormalised to
    sum to 1. Valence and arousal, when present, are kept as extra fields.
    Split: the paper gives only the sizes (1,386 / 594 of 1,980, 70% / 30%). We split each
    emotion folder separately (stratified): a seeded permutation of the folder's records,
    the first test_frac * n (rounded) to test, the rest to train (330 per folder -> 231 / 99).
    """
    root, out, skip = Path(root), Path(out), _Skips(skip_bad)
    gt = root / "ground_truth.txt"
    lines = gt.read_text(encoding="utf-8").splitlines()
    header = [h.strip().strip("[]").lower() for h in lines[0].split("\t")] if lines else []
    col = {name: i for i, name in enumerate(header)}
    missing = [n for n in ["image_filename"] + [f"prob. {c}" for c in EMOTION6_CLASSES]
               if n not in col]
    if missing:
        raise ManifestError(gt, 1, "header lacks column(s) " + ", ".join(f"[{m}]" for m in missing))
    records, group = {}, {}
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        try:
            if len(fields) != len(header):
                raise _Bad(f"{len(fields)} tab-separated fields, the header has {len(header)}")
            name = fields[col["image_filename"]]
            rid = "emotion6-" + name.rsplit(".", 1)[0].replace("/", "-")
            if rid in records:
                raise _Bad(f"duplicate image {name!r}")
            try:
                probs = [float(fields[col[f"prob. {c}"]]) for c in EMOTION6_CLASSES]
                extra = {k: float(fields[col[k]]) for k in ("valence", "arousal") if k in col}
            except ValueError as e:
                raise _Bad(f"not a number: {e}") from None
            if not all(map(math.isfinite, probs)) or min(probs) < 0:
                raise _Bad(f"probabilities {probs} are not all finite and >= 0")
            if abs(sum(probs) - 1) > 1e-2:
                raise _Bad(f"probabilities sum to {sum(probs):.4f}, not 1")
            image = root / "images" / name
            _image_size(image)
        except _Bad as e:
            skip(gt, lineno, e.reason)
            continue
        total = sum(probs)
        records[rid] = {"id": rid, "image": _rel(image, out), "classes": EMOTION6_CLASSES,
                        "probs": [p / total for p in probs], **extra}
        group.setdefault(name.split("/")[0] if "/" in name else "", []).append(rid)
    test = set()
    for g, ids in sorted(group.items()):
        perm = _rng(seed, "emotion6", g).permutation(len(ids))
        test.update(ids[i] for i in perm[:int(test_frac * len(ids) + 0.5)])
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl"}
    write_jsonl(paths["train"], [r for rid, r in records.items() if rid not in test])
    write_jsonl(paths["test"], [r for rid, r in records.items() if rid in test])
    return paths, skip.count


# ------------------------------------------------- LISA / ReasonSeg (RISE det. and Seg-RISE)
def lisa_mask(shapes, width, height):
    """The target mask of a LISA annotation, by LISA's own rule (get_mask_from_json):
    shapes labelled "flag" are dropped; the others are drawn largest first, so a smaller shape
    drawn later wins where they overlap; a label containing "ignore" marks pixels to leave out,
    any other label marks target pixels. As LISA's cv2.fillPoly on int32 points, the points
    are truncated to integers and the polygon is filled with its boundary (PIL does too)."""
    layers = []
    for i, shape in enumerate(shapes):
        label = str(shape.get("label", "")).lower() if isinstance(shape, dict) else ""
        if label == "flag":
            continue
        pts = shape.get("points") if isinstance(shape, dict) else None
        if (not isinstance(pts, list) or len(pts) < 3 or not all(
                isinstance(p, list) and len(p) == 2 and all(map(_is_number, p))
                and all(map(math.isfinite, p)) for p in pts)):
            raise _Bad("points is not a list of 3 or more [x, y] numbers", f"shapes[{i}]")
        layer = Image.new("L", (width, height), 0)
        ImageDraw.Draw(layer).polygon([(int(x), int(y)) for x, y in pts], fill=1)
        layer = np.asarray(layer, dtype=bool)
        layers.append((-int(layer.sum()), i, "ignore" in label, layer))
    canvas = np.zeros((height, width), np.uint8)          # 0 background, 1 target, 2 ignore
    for _, _, ignore, layer in sorted(layers, key=lambda t: t[:2]):
        canvas[layer] = 2 if ignore else 1
    return canvas == 1


def convert_reasonseg(src, out, skip_bad=False):
    """One LISA / ReasonSeg split folder (<name>.jpg + <name>.json, the JSON holding "text":
    [queries], "is_sentence" and labelme "shapes") -> OUT/det.jsonl, OUT/seg.jsonl, OUT/masks/.

    det.jsonl (RISE's LISA detection, single target): one record per image, target = the first
    query, boxes = [the tight box of the target mask] (the union of all target polygons).
    seg.jsonl (Seg-RISE): one record per query, id "<name>-<k>", with the mask PNG
    masks/<name>.png (0/255) and the same box. Run once per split folder (train, val, test).
    """
    src, out, skip = Path(src), Path(out), _Skips(skip_bad)
    det, seg = [], []
    for js in sorted(src.glob("*.json")):
        name = js.stem
        try:
            try:
                ann = json.loads(js.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise _Bad(f"invalid JSON ({e.msg}, column {e.colno})", e.lineno) from None
            texts = ann.get("text") if isinstance(ann, dict) else None
            texts = [texts] if isinstance(texts, str) else texts
            if not isinstance(texts, list) or not texts or not all(map(_nonempty_str, texts)):
                raise _Bad('"text" is not a non-empty list of queries', "text")
            if not isinstance(ann.get("shapes"), list):
                raise _Bad('"shapes" is not a list', "shapes")
            image = next((src / (name + s) for s in IMAGE_SUFFIXES
                          if (src / (name + s)).is_file()), src / (name + ".jpg"))
            mask = lisa_mask(ann["shapes"], *_image_size(image))
            box = mask_box(mask)
            if box is None:
                raise _Bad("no target pixels (every shape is ignore/flag or off the image)",
                           "shapes")
        except _Bad as e:
            skip(js, e.where or "json", e.reason)
            continue
        _save_mask(mask, out / "masks" / f"{name}.png")
        extra = {"is_sentence": ann["is_sentence"]} if "is_sentence" in ann else {}
        det.append({"id": name, "image": _rel(image, out), "target": texts[0].strip(),
                    "boxes": [box], **extra})
        seg += [{"id": f"{name}-{k}", "image": _rel(image, out), "instruction": t.strip(),
                 "mask": f"masks/{name}.png", "box": box, **extra} for k, t in enumerate(texts)]
    paths = {"det": out / "det.jsonl", "seg": out / "seg.jsonl"}
    write_jsonl(paths["det"], det)
    write_jsonl(paths["seg"], seg)
    return paths, skip.count


# ----------------------------------------------------------------- COCO masks without pycocotools
def coco_polygon_mask(xy, height, width):
    """Boolean mask of one COCO polygon [x1, y1, x2, y2, ...], pixel for pixel as
    pycocotools' rleFrPoly (maskApi.c) draws it, so masks equal the official ones.

    The method: scale the vertices by 5, walk every edge in unit steps (along its longer
    axis), keep the points where the walk enters a new column at a pixel centre, and toggle
    the mask on/off there, scanning each column top to bottom (COCO's column-major order)."""
    scale = 5.0
    pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    x = np.trunc(scale * pts[:, 0] + 0.5).astype(np.int64)        # C's (int) truncates
    y = np.trunc(scale * pts[:, 1] + 0.5).astype(np.int64)
    x, y = np.append(x, x[0]), np.append(y, y[0])
    us, vs = [], []
    for j in range(len(pts)):
        xs, xe, ys, ye = x[j], x[j + 1], y[j], y[j + 1]
        dx, dy = abs(xe - xs), abs(ye - ys)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)   # always walk forwards
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        n = max(dx, dy)
        t = np.arange(n + 1)
        t = n - t if flip else t
        slope = ((ye - ys) if dx >= dy else (xe - xs)) / n if n else 0.0
        if dx >= dy:
            us.append(xs + t)
            vs.append(np.trunc(ys + slope * t + 0.5).astype(np.int64))
        else:
            vs.append(ys + t)
            us.append(np.trunc(xs + slope * t + 0.5).astype(np.int64))
    u, v = np.concatenate(us), np.concatenate(vs)
    j = np.nonzero(u[1:] != u[:-1])[0] + 1                          # column changes
    xd = (np.where(u[j] < u[j - 1], u[j], u[j] - 1) + 0.5) / scale - 0.5
    yd = (np.minimum(v[j], v[j - 1]) + 0.5) / scale - 0.5
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= width - 1)
    yd = np.ceil(np.clip(yd[keep], 0, height)).astype(np.int64)
    toggles = np.bincount(xd[keep].astype(np.int64) * height + yd, minlength=height * width + 1)
    inside = np.cumsum(toggles[:height * width]) % 2 == 1            # parity of crossings
    return inside.reshape(width, height).T


def _rle_string_counts(s):
    """The run lengths in pycocotools' compressed RLE string (rleFrString in maskApi.c):
    each count is written in 5-bit groups, least significant first, as chr(48 + group), with
    0x20 set while more groups follow and 0x10 of the last group a sign bit; from the third
    count on, a count is stored as its difference from the count two places before."""
    counts, p = [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError("truncated RLE string")
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = c & 0x20
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)                                  # negative: sign-extend
        if len(counts) > 2:
            x += counts[-2]
        if x < 0:
            raise ValueError("negative run length in RLE string")
        counts.append(x)
    return counts


def rle_decode(rle):
    """COCO RLE {"size": [h, w], "counts": [runs] or compressed string} -> bool HxW mask.
    Runs alternate 0s and 1s, starting with 0s, over the pixels in column-major order."""
    height, width = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = _rle_string_counts(counts)
    if sum(counts) != height * width:
        raise ValueError(f"RLE runs cover {sum(counts)} pixels, not {height}x{width}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(width, height).T


def coco_mask(segmentation, height, width):
    """The mask of a COCO annotation's "segmentation": polygons (their union) or RLE."""
    if isinstance(segmentation, dict):
        if list(segmentation.get("size", [])) != [height, width]:
            raise _Bad(f"RLE size {segmentation.get('size')} is not the image's {[height, width]}")
        try:
            return rle_decode(segmentation)
        except (ValueError, TypeError, KeyError) as e:
            raise _Bad(f"bad RLE: {e}") from None
    if not isinstance(segmentation, list) or not segmentation:
        raise _Bad("segmentation is neither polygons nor RLE")
    mask = np.zeros((height, width), bool)
    for poly in segmentation:
        if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2
                or not all(map(_is_number, poly))):
            raise _Bad("a polygon is not a list of 3 or more x, y pairs")
        mask |= coco_polygon_mask(poly, height, width)
    return mask


def _coco_tables(path):
    """images by id and category names by id of a COCO JSON, checked for the keys we use."""
    coco = _load_json(path)
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise ManifestError(path, 1, 'not a COCO file: needs lists "images", "annotations", '
                                     '"categories"')
    for key, need in (("images", ("id", "file_name")), ("categories", ("id", "name"))):
        for i, e in enumerate(coco[key]):
            if not isinstance(e, dict) or any(k not in e for k in need):
                raise ManifestError(path, f"{key}[{i}]", "needs " + " and ".join(need))
    images = {im["id"]: im for im in coco["images"]}
    categories = {c["id"]: c["name"] for c in coco["categories"]}
    return coco, images, categories


# ------------------------------------------------------------------------ COCO-Sub (RISE det.)
def convert_coco(instances, image_dir, out, classes=None, n_train=25, n_test=10, seed=0,
                 skip_bad=False):
    """COCO instances JSON + its image folder -> OUT/{train,test}.jsonl of COCO-Sub.

    One detection record per (image, class): target = the class name, boxes = every non-crowd
    box of that class in the image ([x, y, w, h] -> [x1, y1, x2, y2]); crowd regions are not
    object boxes (COCO's evaluation ignores them too) and are counted in the log. Classes: all
    categories, or `classes` (names). Sampling, per class with its own seeded generator: a
    permutation of the images containing it; its first n_test are its test images. Then each
    class takes as training images the next n_train of its permutation that are no class's test
    image, so no image (hence no image-class pair) is in both splits.
    """
    inst, out, skip = Path(instances), Path(out), _Skips(skip_bad)
    coco, images, categories = _coco_tables(inst)
    boxes, n_crowd = {}, 0               # (image id, category id) -> boxes in file order
    for i, a in enumerate(coco["annotations"]):
        where = f"annotations[{i}] (id {a.get('id') if isinstance(a, dict) else None})"
        try:
            if not isinstance(a, dict):
                raise _Bad("not a JSON object")
            if a.get("image_id") not in images or a.get("category_id") not in categories:
                raise _Bad(f"unknown image_id {a.get('image_id')!r} or category_id "
                           f"{a.get('category_id')!r}")
            if a.get("iscrowd"):
                n_crowd += 1
                continue
            box = _xywh_box(a.get("bbox"))
        except _Bad as e:
            skip(inst, where, e.reason)
            continue
        boxes.setdefault((a["image_id"], a["category_id"]), []).append(box)
    if n_crowd:
        print(f"note: {inst}: {n_crowd} crowd annotation(s) are not used as boxes", file=sys.stderr)
    chosen = sorted(categories)
    if classes:
        unknown = sorted(set(classes) - set(categories.values()))
        if unknown:
            raise ValueError(f"{inst}: no category named {', '.join(map(repr, unknown))}")
        chosen = [c for c in chosen if categories[c] in classes]
    order, test = {}, {}
    for c in chosen:
        with_c = sorted(im for im, cat in boxes if cat == c)
        if len(with_c) < n_train + n_test:
            skip(inst, f"category {categories[c]!r}",
                 f"{len(with_c)} images contain it, {n_train} + {n_test} are needed")
            continue
        order[c] = [with_c[i] for i in _rng(seed, "coco", categories[c]).permutation(len(with_c))]
        test[c] = order[c][:n_test]
    test_images = {im for ims in test.values() for im in ims}
    split = {"train": [], "test": []}
    for c in list(order):
        train = [im for im in order[c][n_test:] if im not in test_images][:n_train]
        if len(train) < n_train:
            skip(inst, f"category {categories[c]!r}", f"only {len(train)} training images are "
                                                      "left once the test images are set aside")
            continue
        split["train"] += [(c, im) for im in sorted(train)]
        split["test"] += [(c, im) for im in sorted(test[c])]
    paths, checked = {}, {}
    for name, pairs in split.items():
        records = []
        for c, im in pairs:
            image = Path(image_dir) / images[im]["file_name"]
            if image not in checked:             # an image can serve several classes
                try:
                    _image_size(image)
                    checked[image] = None
                except _Bad as e:
                    checked[image] = e.reason
            if checked[image]:
                skip(inst, f"image id {im}", checked[image])
                continue
            records.append({"id": f"coco-{im}-{c}", "image": _rel(image, out),
                            "target": categories[c], "boxes": boxes[im, c], "category_id": c})
        paths[name] = out / f"{name}.jsonl"
        write_jsonl(paths[name], records)
    return paths, skip.count


# ------------------------------------------------ ImageNet-Sub (RISE cls., Seg-RISE ClsOnly)
def _read_names(path):
    """A "wnid name" file (ImageNet's LOC_synset_mapping.txt: "n01440764 tench, Tinca tinca")
    -> {wnid: first synonym}. One name only: class lists are joined with ", " in prompts."""
    names = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            parts = line.strip().split(maxsplit=1)
            if len(parts) != 2 or not parts[1].split(",")[0].strip():
                raise ManifestError(path, lineno, 'expected "<folder name> <class name>"')
            names[parts[0]] = parts[1].split(",")[0].strip()
    return names


def convert_imagenet(root, out, classes=None, names=None, n_classes=20, n_train=25, n_test=10,
                     seed=0, as_seg=False, skip_bad=False):
    """ROOT/<class folder>/*.JPEG -> OUT/{train,test}.jsonl of ImageNet-Sub.

    Classes: `classes` (folder names or, with `names`, class names), else all folders if there
    are at most n_classes, else a seeded choice of n_classes of them. Per class, a seeded
    permutation of its image files (sorted): the first n_test to test, the next n_train to
    train. Records are one-hot over the chosen classes' names (the folder name unless the
    `names` file maps it; a name shared by two chosen classes gets its folder in brackets).
    as_seg=True writes Seg-RISE "ClsOnly" records {id, image, instruction: class name} instead.
    """
    root, out, skip = Path(root), Path(out), _Skips(skip_bad)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    label = _read_names(names) if names else {}
    if classes:
        by_label = {label.get(f, f): f for f in folders}
        unknown = [c for c in classes if c not in folders and c not in by_label]
        if unknown:
            raise ValueError(f"{root}: no class folder for {', '.join(map(repr, unknown))}")
        chosen = [c if c in folders else by_label[c] for c in classes]
    elif len(folders) > n_classes:
        pick = _rng(seed, "imagenet", "classes").choice(len(folders), n_classes, replace=False)
        chosen = [folders[i] for i in sorted(pick)]
    else:
        chosen = folders
    picked = {}                          # folder -> {"train": files, "test": files}
    for f in chosen:
        files = sorted(p for p in (root / f).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) < n_train + n_test:
            skip(root, f"class {f}", f"{len(files)} images, {n_train} + {n_test} are needed")
            continue
        perm = _rng(seed, "imagenet", f).permutation(len(files))
        picked[f] = {"test": sorted(files[i] for i in perm[:n_test]),
                     "train": sorted(files[i] for i in perm[n_test:n_test + n_train])}
    shown = [label.get(f, f) for f in picked]
    class_names = [n if shown.count(n) == 1 else f"{n} ({f})" for n, f in zip(shown, picked)]
    paths = {}
    for name in ("train", "test"):
        records = []
        for k, f in enumerate(picked):
            for image in picked[f][name]:
                try:
                    _image_size(image)
                except _Bad as e:
                    skip(root / f, image.name, e.reason)
                    continue
                rec = {"id": f"{f}-{image.stem}", "image": _rel(image, out)}
                if as_seg:
                    rec["instruction"] = class_names[k]
                else:
                    rec["classes"] = class_names
                    rec["probs"] = [1.0 if i == k else 0.0 for i in range(len(class_names))]
                records.append(rec)
        paths[name] = out / f"{name}.jsonl"
        write_jsonl(paths[name], records)
    return paths, skip.count


# ------------------------------------------------------- RefCOCO / RefCOCO+ / RefCOCOg (Seg-RISE)
class RefsUnpickler(pickle.Unpickler):
    """An unpickler that builds only lists, dicts, tuples, strings and numbers.

    Unpickling an untrusted file with pickle.load runs code: a pickle can name any importable
    callable (os.system, ...) with its GLOBAL / STACK_GLOBAL opcodes, which the unpickler looks
    up with find_class, and REDUCE then calls it. A refs(unc).p / refs(umd).p file holds only
    lists, dicts, str, int and float, which pickle writes with opcodes of their own that never
    go through find_class. So refusing every find_class loses nothing for a genuine refs file,
    and a tampered one fails with UnpicklingError before anything it names can run."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a refs file holds only "
                                     "lists, dicts, strings and numbers")


def load_refs(path):
    """The list of refs in a refs(unc).p / refs(umd).p pickle, read with RefsUnpickler.
    The files were written by Python 2: its byte strings are decoded as UTF-8."""
    with open(path, "rb") as f:
        try:
            refs = RefsUnpickler(f, encoding="utf-8").load()
        except Exception as e:       # malformed pickles raise many types
            raise ManifestError(path, "pickle", f"{type(e).__name__}: {e}") from None
    if not isinstance(refs, list):
        raise ManifestError(path, "pickle", f"holds a {type(refs).__name__}, not a list of refs")
    return refs


def convert_refcoco(refs, instances, image_dir, out, split="val", sample=None, seed=0,
                    skip_bad=False):
    """refs(unc).p (RefCOCO, RefCOCO+) or refs(umd).p (RefCOCOg) + the dataset's instances.json
    + the COCO train2014 image folder -> OUT/<split>.jsonl and OUT/masks/<ann_id>.png.

    One segmentation record per (ref, sentence) of the split (unc: train / val / testA / testB;
    umd: train / val / test): id "<ref_id>-<k>", instruction = the sentence, mask = the referred
    annotation's polygons or RLE drawn as pycocotools does, box = its COCO bbox as [x1,y1,x2,y2].
    The image file is named by instances.json (the refs' own "file_name" carries the ann id).
    sample=N keeps a seeded random N of the records (Seg-RISE trains on 2,000 RefCOCOg pairs).
    """
    refs_path, inst, out, skip = Path(refs), Path(instances), Path(out), _Skips(skip_bad)
    coco, images, _ = _coco_tables(inst)
    anns = {a["id"]: a for a in coco["annotations"] if isinstance(a, dict) and "id" in a}
    items = []                           # (where, ref, k, sentence) of the split
    for i, ref in enumerate(load_refs(refs_path)):
        where = f"refs[{i}]"
        if not isinstance(ref, dict) or any(k not in ref for k in ("ref_id", "ann_id", "split",
                                                                    "sentences")):
            skip(refs_path, where, "needs ref_id, ann_id, split and sentences")
            continue
        if ref["split"] != split:
            continue
        for k, s in enumerate(ref["sentences"] if isinstance(ref["sentences"], list) else [None]):
            sent = s.get("sent") if isinstance(s, dict) else None
            if _nonempty_str(sent):
                items.append((f"{where} (ref_id {ref['ref_id']})", ref, k, sent.strip()))
            else:
                skip(refs_path, f"{where} (ref_id {ref['ref_id']}) sentence {k}",
                     'needs a non-empty "sent"')
    if sample is not None and sample < len(items):
        keep = _rng(seed, "refcoco", split).choice(len(items), sample, replace=False)
        items = [items[i] for i in sorted(keep)]
    records, done = [], {}               # ann id -> (image, box) once its mask is written
    for where, ref, k, sent in items:
        ann_id = ref["ann_id"]
        try:
            if ann_id not in done:
                ann = anns.get(ann_id)
                if ann is None or ann.get("image_id") not in images:
                    raise _Bad(f"ann_id {ann_id!r} is not an annotation of {inst} with an image")
                im = images[ann["image_id"]]
                image = Path(image_dir) / im["file_name"]
                size = _image_size(image)
                if size != (im.get("width"), im.get("height")):
                    raise _Bad(f"{image} is {size[0]}x{size[1]}, {inst} says "
                               f"{im.get('width')}x{im.get('height')}")
                mask = coco_mask(ann.get("segmentation"), size[1], size[0])
                if not mask.any():
                    raise _Bad(f"annotation {ann_id} has an empty mask")
                box = _xywh_box(ann.get("bbox"))
                _save_mask(mask, out / "masks" / f"{ann_id}.png")
                done[ann_id] = (image, box)
        except _Bad as e:
            skip(refs_path, where, e.reason)
            continue
        image, box = done[ann_id]
        records.append({"id": f"{ref['ref_id']}-{k}", "image": _rel(image, out),
                        "instruction": sent, "mask": f"masks/{ann_id}.png", "box": box,
                        "ref_id": ref["ref_id"], "ann_id": ann_id})
    path = out / f"{split}.jsonl"
    write_jsonl(path, records)
    return {split: path}, skip.count


# ---------------------------------------------------------------------------- VisCoT (VisRL)
def viscot_box_to_pixels(box, width, height, norm="square"):
    """A VisCoT box in 0..1 -> pixels of the original image, clipped to it.

    norm="square": VisCoT's own frame (tools/convert_data_to_llava_format.py): the image padded
    to a square as LLaVA's expand2square does, i.e. the shorter axis shifted by
    (long - short) // 2 and every coordinate divided by the long side.
    norm="image": plain x / width, y / height."""
    if norm == "square":
        side = max(width, height)
        pad_x, pad_y = (side - width) // 2, (side - height) // 2
        px = [box[0] * side - pad_x, box[1] * side - pad_y, box[2] * side - pad_x,
              box[3] * side - pad_y]
    else:
        px = [box[0] * width, box[1] * height, box[2] * width, box[3] * height]
    limits = (width, height, width, height)
    return [round(min(max(v, 0.0), lim), 2) for v, lim in zip(px, limits)]


def _numbers(text):
    return [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text)]


def convert_viscot(json_path, image_root, out, norm="square", skip_bad=False):
    """VisCoT-style JSON (a list) or JSONL -> OUT/<file stem>.jsonl of VQA records.

    Two forms per entry. Flat: {"question_id" | "id", "image", "question", "answer",
    "bbox"?: [x1,y1,x2,y2] pixels} (or "bboxs": boxes, whose union is taken, as in VisCoT's
    metadata files). Conversations (viscot_363k.json): "image" is a path or a list of paths, one
    possibly suffixed "###[x1, y1, x2, y2]" with the box in pixels; "conversations" alternates
    human / gpt: "<image>\\n{question} Please provide the bounding box ... better.", then the box
    in 0..1 (see viscot_box_to_pixels), then "<image>", then the answer. The question loses the
    image tag and the CoT instruction; the answer is the last gpt turn; the box comes from the
    "###" pixels when present, else from the gpt box turn. An entry without an id gets its index.
    """
    path, out, skip = Path(json_path), Path(out), _Skips(skip_bad)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        entries = list(enumerate(_load_json(path)))
        where_of = "entry {}".format
    else:                                  # JSON lines
        entries, where_of = [], str
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    skip(path, lineno, f"invalid JSON ({e.msg}, column {e.colno})")
    records, seen = [], set()
    for index, item in entries:
        try:
            if not isinstance(item, dict):
                raise _Bad("not a JSON object")
            rid = item.get("question_id", item.get("id", index))
            if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                raise _Bad(f"id {rid!r} is not a string or an integer")
            if rid in seen:
                raise _Bad(f"duplicate id {rid!r}")
            paths = item.get("image")
            paths = paths if isinstance(paths, list) else [paths]
            if not paths or not all(map(_nonempty_str, paths)):
                raise _Bad('"image" is not a path or a list of paths')
            pixel_box, norm_box = None, None
            tagged = [p for p in paths if "###" in p]
            if tagged:
                pixel_box = _numbers(tagged[0].split("###", 1)[1])
            if "conversations" in item:
                turns = item["conversations"]
                if not isinstance(turns, list) or not all(
                        isinstance(t, dict) and _nonempty_str(t.get("value")) for t in turns):
                    raise _Bad('"conversations" is not a list of {"from", "value"} turns')
                human = [t["value"] for t in turns if t.get("from") == "human"]
                gpt = [t["value"].strip() for t in turns if t.get("from") == "gpt"]
                if not human or not gpt:
                    raise _Bad("conversations need a human and a gpt turn")
                question = human[0].replace("<image>", "").strip()
                for prompt in VISCOT_COT_PROMPTS:
                    question = question.removesuffix(prompt).strip()
                answer = gpt[-1]
                if len(gpt) >= 2:          # the first gpt turn is the box, the last the answer
                    norm_box = _numbers(gpt[0])
                    if len(norm_box) != 4 or not all(0 <= v <= 1 for v in norm_box):
                        raise _Bad(f"box turn {gpt[0]!r} is not [x1, y1, x2, y2] in 0..1")
            else:
                question, answer = item.get("question"), item.get("answer")
                if item.get("bbox") is not None:
                    pixel_box = item["bbox"]
                elif item.get("bboxs"):
                    try:
                        b = np.asarray(item["bboxs"], dtype=float).reshape(-1, 4)
                    except (ValueError, TypeError):
                        raise _Bad(f'"bboxs" {item["bboxs"]!r} is not a list of boxes') from None
                    pixel_box = [*b[:, :2].min(0).tolist(), *b[:, 2:].max(0).tolist()]
            if not _nonempty_str(question) or not _nonempty_str(answer):
                raise _Bad("question or answer is not a non-empty string")
            image = Path(image_root) / paths[0].split("###", 1)[0]
            width, height = _image_size(image)
            if pixel_box is not None:
                if box_problem(pixel_box):
                    raise _Bad(box_problem(pixel_box))
                box = [round(min(float(v), lim), 2)
                       for v, lim in zip(pixel_box, (width, height, width, height))]
            elif norm_box is not None:
                box = viscot_box_to_pixels(norm_box, width, height, norm)
            else:
                box = None
            if box is not None and box_problem(box):
                raise _Bad(f"box in pixels {box}: {box_problem(box)}")
        except _Bad as e:
            skip(path, where_of(index), e.reason)
            continue
        seen.add(rid)
        rec = {"id": rid, "image": _rel(image, out), "question": question, "answer": answer.strip()}
        if box is not None:
            rec["box"] = box
        if "dataset" in item:
            rec["dataset"] = item["dataset"]
        records.append(rec)
    manifest = out / f"{path.stem}.jsonl"
    write_jsonl(manifest, records)
    return {path.stem: manifest}, skip.count


# ----------------------------------------------------------------------- converter commands
def _add_converter_commands(sub):
    def command(name, help_text):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--skip-bad", action="store_true",
                       help="skip (and count) bad records instead of stopping at the first")
        return p

    def sampling(p, n_train=25, n_test=10):
        p.add_argument("--n-train", type=int, default=n_train, help="training images per class")
        p.add_argument("--n-test", type=int, default=n_test, help="test images per class")
        p.add_argument("--seed", type=int, default=0)

    p = command("emotion6", "Emotion6 -> OUT/{train,test}.jsonl (soft classification)")
    p.add_argument("--root", required=True, help="folder with images/ and ground_truth.txt")
    p.add_argument("--test-frac", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p = command("reasonseg", "one LISA/ReasonSeg split folder -> OUT/det.jsonl, OUT/seg.jsonl")
    p.add_argument("--src", required=True, help="split folder with <name>.jpg + <name>.json")
    p = command("coco", "COCO instances -> COCO-Sub OUT/{train,test}.jsonl (detection)")
    p.add_argument("--instances", required=True, help="instances_*.json")
    p.add_argument("--images", required=True, help="the folder of its images")
    p.add_argument("--classes", help='comma-separated category names (default: all)')
    sampling(p)
    p = command("imagenet", "class-folder tree -> ImageNet-Sub OUT/{train,test}.jsonl")
    p.add_argument("--root", required=True, help="folder of class folders")
    p.add_argument("--names", help='file of "<folder> <class name>" lines (LOC_synset_mapping.txt)')
    p.add_argument("--classes", help="comma-separated folder or class names (default: a seeded "
                                     "choice of --n-classes)")
    p.add_argument("--n-classes", type=int, default=20)
    p.add_argument("--as-seg", action="store_true",
                   help="write Seg-RISE ClsOnly records {id, image, instruction: class name}")
    sampling(p)
    p = command("refcoco", "RefCOCO/+/g refs + instances -> OUT/<split>.jsonl (segmentation)")
    p.add_argument("--refs", required=True, help="refs(unc).p or refs(umd).p")
    p.add_argument("--instances", required=True, help="the dataset's instances.json")
    p.add_argument("--images", required=True, help="COCO train2014 image folder")
    p.add_argument("--split", default="val", choices=["train", "val", "test", "testA", "testB"])
    p.add_argument("--sample", type=int, help="keep a seeded random N records")
    p.add_argument("--seed", type=int, default=0)
    p = command("viscot", "VisCoT-style JSON/JSONL -> OUT/<stem>.jsonl (VQA)")
    p.add_argument("--json", required=True, help="e.g. viscot_363k.json")
    p.add_argument("--images", required=True, help="folder the image paths are relative to")
    p.add_argument("--norm", default="square", choices=["square", "image"],
                   help="frame of 0..1 boxes: VisCoT's padded square (default) or the image")


def _run_converter(args):
    """Run the converter named by args.command; exit with the error message on bad input."""
    listed = lambda s: [c.strip() for c in s.split(",") if c.strip()] if s else None  # noqa: E731
    for key in ("n_train", "n_test", "n_classes", "sample", "seed"):
        if (getattr(args, key, None) or 0) < 0:
            sys.exit(f"error: --{key.replace('_', '-')} must be >= 0")
    try:
        if args.command == "emotion6":
            paths, skipped = convert_emotion6(args.root, args.out, args.seed, args.test_frac,
                                              args.skip_bad)
        elif args.command == "reasonseg":
            paths, skipped = convert_reasonseg(args.src, args.out, args.skip_bad)
        elif args.command == "coco":
            paths, skipped = convert_coco(args.instances, args.images, args.out,
                                          listed(args.classes), args.n_train, args.n_test,
                                          args.seed, args.skip_bad)
        elif args.command == "imagenet":
            paths, skipped = convert_imagenet(args.root, args.out, listed(args.classes),
                                              args.names, args.n_classes, args.n_train,
                                              args.n_test, args.seed, args.as_seg, args.skip_bad)
        elif args.command == "refcoco":
            paths, skipped = convert_refcoco(args.refs, args.instances, args.images, args.out,
                                             args.split, args.sample, args.seed, args.skip_bad)
        else:
            paths, skipped = convert_viscot(args.json, args.images, args.out, args.norm,
                                            args.skip_bad)
    except (ManifestError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    for name, path in paths.items():
        with open(path, encoding="utf-8") as f:
            print(f"{name:>6}: {path} ({sum(1 for line in f if line.strip())} records)")
    if skipped:
        print(f"warning: skipped {skipped} bad record(s)", file=sys.stderr)


# ============================================================================ 5. command line
def main(argv=None):
    parser = argparse.ArgumentParser(description="Data sets for the RISE / VisRL pipelines.")
    sub = parser.add_subparsers(dest="command", required=True)
    shapes = sub.add_parser("shapes", help="write the synthetic shapes world")
    shapes.add_argument("--out", required=True, help="output folder")
    shapes.add_argument("--n-train", type=int, default=64, help="training images per task")
    shapes.add_argument("--n-test", type=int, default=32, help="test images per task")
    shapes.add_argument("--seed", type=int, default=0)
    _add_converter_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "shapes":
        if min(args.n_train, args.n_test, args.seed) < 0:
            parser.error("--n-train, --n-test and --seed must be >= 0")
        paths = make_shapes_world(args.out, args.n_train, args.n_test, args.seed)
        for task, splits in paths.items():
            print(f"{task:>10}: {splits['train']}, {splits['test']}")
    else:
        _run_converter(args)


if __name__ == "__main__":
    main()
