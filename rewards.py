"""Rewards and metrics for RISE (annotation), Seg-RISE (segmentation) and VisRL.

Papers: "RISE: Enhancing VLM Image Annotation with Self-Supervised Reasoning" (arXiv 2508.13229;
"the RISE annotation paper"), "Reasoning via Implicit Self-supervised Emergence for Instruction
Segmentation" ("the Seg-RISE paper"), "VisRL: Intention-Driven Visual Perception via Reinforced
Reasoning" (arXiv 2503.07523).

Everything here reads untrusted model output, so every parser is total: it returns a
value (or None) for any string and never raises, and is parsed with json /
ast.literal_eval (guarded) / regex only, never eval or exec.  Only torch, numpy, scipy
and the standard library are imported, so any function can be copied alone.

Boxes are [x1, y1, x2, y2] in pixels, x1 < x2 and y1 < y2.
"""
import ast
import json
import math
import re
import string
from collections import defaultdict

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import rel_entr

LN2 = math.log(2.0)
MAX_BOXES = 100          # an answer listing more boxes is garbage (and spamming boxes is a hack)
MAX_LITERAL_CHARS = 2000  # longest dict literal we hand to ast.literal_eval
MAX_JSON_TRIES = 20       # at most this many '{' positions are tried as JSON starts
MIN_NARRATIVE_WORDS = 3   # a RISE-CoT chain of thought needs at least this many words
NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"   # a plain decimal number
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


# ----------------------------------------------------------------------------- parsing
def parse_think_answer(text):
    """`<think>c</think><answer>a</answer>` -> (c, a) stripped, else None. Exactly one of
    each tag, in order, only whitespace around and between. Counting tags (not one regex)
    stays linear on 10k-char outputs and rejects duplicated tags."""
    if not isinstance(text, str) or any(text.count(t) != 1 for t in TAGS):
        return None
    i0, i1, i2, i3 = (text.index(t) for t in TAGS)
    if not i0 < i1 < i2 < i3:
        return None
    outside = text[:i0] + text[i1 + len("</think>"):i2] + text[i3 + len("</answer>"):]
    if outside.strip():
        return None
    return text[i0 + len("<think>"):i1].strip(), text[i2 + len("<answer>"):i3].strip()


def answer_text(text):
    """The content of the single `<answer>...</answer>` block of `text`, else None
    (no block, several blocks or stray tags are all ambiguous)."""
    if not isinstance(text, str) or text.count("<answer>") != 1 or text.count("</answer>") != 1:
        return None
    start, end = text.index("<answer>") + len("<answer>"), text.index("</answer>")
    return text[start:end].strip() if start <= end else None


def _number(v):
    """v as a float if it is a finite int/float (not a bool; a 400-digit int is not), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not -1e308 < v < 1e308:
        return None  # NaN fails the comparison too
    return float(v)


def _json_objects(text):
    """Yield the JSON values starting at the first few '{' of text (prose, fences skipped)."""
    decoder = json.JSONDecoder()  # it accepts NaN/Infinity: callers check finiteness
    start = text.find("{")
    for _ in range(MAX_JSON_TRIES):
        if start < 0:
            return
        try:
            obj, _ = decoder.raw_decode(text, start)
            yield obj
        except (ValueError, RecursionError):
            pass
        start = text.find("{", start + 1)


_LITERAL_NODES = (ast.Expression, ast.Dict, ast.List, ast.Constant, ast.UnaryOp,
                  ast.USub, ast.UAdd, ast.Load)


def _safe_literal(src):
    """ast.literal_eval restricted to dict/list/number/str literals of bounded size."""
    if len(src) > MAX_LITERAL_CHARS:
        return None
    try:
        tree = ast.parse(src, mode="eval")
        for node in ast.walk(tree):
            if not isinstance(node, _LITERAL_NODES):
                return None
            if isinstance(node, ast.Constant) and not isinstance(node.value, (str, int, float)):
                return None  # no bytes, None, complex ...
        return ast.literal_eval(tree)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError, OverflowError):
        return None


def _class_dict(obj):
    """obj as {class: prob} if it is a non-empty mapping str -> finite number >= 0."""
    if not isinstance(obj, dict) or not obj:
        return None
    out = {}
    for k, v in obj.items():
        v = _number(v)
        if not isinstance(k, str) or not k.strip() or v is None or v < 0:
            return None
        out[k.strip()] = v
    return out


def parse_class_probs(text):
    """The first flat {...} in text that is a class -> probability mapping, as JSON or a
    Python dict literal ({'red': 0.5, "blue": .5}), prose/code fences around it allowed ->
    dict, else None. Values must be finite and >= 0; they need not sum to 1 (the
    similarity penalises that with exp(-|sum q - 1|))."""
    if not isinstance(text, str):
        return None
    for cand in re.findall(r"\{[^{}]*\}", text)[:MAX_JSON_TRIES]:
        obj = next(_json_objects(cand), None)  # JSON first, then a Python dict literal
        probs = _class_dict(obj) or _class_dict(_safe_literal(cand))
        if probs:
            return probs
    return None


_BOX_RE = re.compile(  # [x1, y1, x2, y2]  or Qwen2-VL's  (x1,y1),(x2,y2)
    r"\[\s*({n})\s*,\s*({n})\s*,\s*({n})\s*,\s*({n})\s*\]"
    r"|\(\s*({n})\s*,\s*({n})\s*\)\s*,?\s*\(\s*({n})\s*,\s*({n})\s*\)".format(n=NUM))


def valid_box(b):
    """b as a tuple of 4 finite floats with x1 < x2 and y1 < y2, else None."""
    if isinstance(b, (str, bytes, dict)):
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in b)
    except (TypeError, ValueError, OverflowError):
        return None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x1 >= x2 or y1 >= y2:
        return None
    return x1, y1, x2, y2


def parse_boxes(text):
    """Every "[x1,y1,x2,y2]" (or Qwen2-VL "(x1,y1),(x2,y2)") in text -> list of boxes.
    None if there is none, more than MAX_BOXES, or any is non-finite, inverted or empty:
    an answer with a broken box is not well-formatted."""
    if not isinstance(text, str):
        return None
    boxes = []
    for m in _BOX_RE.finditer(text):
        box = valid_box([float(g) for g in m.groups() if g is not None])
        if box is None or len(boxes) == MAX_BOXES:
            return None
        boxes.append(list(box))
    return boxes or None


def parse_seg_answer(text, points_format=None):
    """A Seg-RISE answer (text around it allowed) -> (bbox, [point, point]) of finite floats, else None.

    points_format "seg_zero": Seg-Zero's keys, which the Seg-RISE paper keeps (real data):
    {"bbox": [x1,y1,x2,y2], "points_1": [x,y], "points_2": [x,y]} (Seg-Zero's
    seg_segmentation_format_reward: the three keys, 4 and 2 and 2 values); "shapes": the shapes
    world's {"bbox": [...], "points": [[x,y],[x,y]]}; None: either (the first object that holds one).
    Strict JSON, as Seg-Zero reads it (json.loads): single-quoted dicts do not parse. Box order and
    image bounds: seg_format_reward."""
    if not isinstance(text, str):
        return None
    for obj in _json_objects(text):
        if not isinstance(obj, dict):
            continue
        box = obj.get("bbox")
        for fmt in [points_format] if points_format else ["seg_zero", "shapes"]:
            pts = obj.get("points") if fmt == "shapes" else [obj.get("points_1"), obj.get("points_2")]
            if (isinstance(box, list) and len(box) == 4 and isinstance(pts, list) and len(pts) == 2
                    and all(isinstance(p, list) and len(p) == 2 for p in pts)):
                nums, points = [_number(v) for v in box], [[_number(v) for v in p] for p in pts]
                if None not in nums + points[0] + points[1]:
                    return nums, points
    return None


def seg_answer(text):
    """The part of a Seg-RISE completion that holds the answer: the <answer> block, or the
    whole text when it has no <answer> tag (--no-cot answers)."""
    return answer_text(text) if isinstance(text, str) and "<answer>" in text else text


def parse_seg_box(answer):
    """The "bbox" of the first JSON object in `answer` with 4 finite numbers, x1 < x2 and
    y1 < y2 -> 4 floats, else None. The points are not needed: --no-points answers and R_sem
    (Seg-RISE eqs. 4-5) read the box alone."""
    if not isinstance(answer, str):
        return None
    for obj in _json_objects(answer):
        box = obj.get("bbox") if isinstance(obj, dict) else None
        if (isinstance(box, list) and len(box) == 4 and all(_number(v) is not None for v in box)
                and valid_box(box)):
            return [float(v) for v in box]
    return None


def parse_grounding_box(text):
    """A real checkpoint's answer to its own grounding prompt (data.GROUNDING_PROMPT) -> 4 floats in
    the model's frame, else None: the first JSON object with a valid "bbox_2d" (Qwen2.5-VL's
    format, e.g. '```json [{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}] ```') or "bbox", else the
    first box parse_boxes() finds (Qwen2-VL's "<|box_start|>(x1,y1),(x2,y2)<|box_end|>")."""
    if not isinstance(text, str):
        return None
    for obj in _json_objects(text):
        for key in ("bbox_2d", "bbox"):
            box = obj.get(key) if isinstance(obj, dict) else None
            if (isinstance(box, list) and len(box) == 4 and all(_number(v) is not None for v in box)
                    and valid_box(box)):
                return [float(v) for v in box]
    boxes = parse_boxes(text)
    return boxes[0] if boxes else None


_SCALE = r"\s*(?:(%)|(?:/|\bout\s+of\b)\s*({num}))?".format(num=NUM)   # "80%", "2/10", "7 out of 10"
_SCORE_RE = re.compile(r"""["']?\bscore\b["']?\s*[:=]?\s*["']?({num}){scale}""".format(num=NUM, scale=_SCALE), re.I)
_BARE_SCORE_RE = re.compile(r"""\s*["']?({num}){scale}["']?\s*""".format(num=NUM, scale=_SCALE))


def parse_score(text):
    """VisRL critic output (paper section 3.1, appendix C) -> a score in [0, 1] read on the scale the
    text states, or None when it cannot be read (the candidate is then dropped, as the released
    data_gen/filter.py drops a judgement json.loads could not read: never a score of 0).

    '{"score": 0.7}', '```json {"score": 0.7} ```' and 'Score: 0.7' -> 0.7; 'Score: 2/10' and
    '2 out of 10' -> 0.2; 'Score: 80%' -> 0.8. Text without the word "score" is read only when it is
    the number alone ("0.7", "80%", "2/10"). Unparsable, NaN, infinite, a zero or negative scale, or a
    number outside its scale (1.5, 12/10, 150%, -0.2) -> None: never clamped, so a critic writing on a
    scale it was not asked for cannot make a poor answer the chosen one."""
    if not isinstance(text, str):
        return None
    m = _SCORE_RE.search(text) or _BARE_SCORE_RE.fullmatch(text)
    if not m:
        return None
    x, percent, scale = float(m.group(1)), m.group(2), m.group(3)
    top = 100.0 if percent else float(scale) if scale is not None else 1.0
    if not (math.isfinite(x) and math.isfinite(top) and top > 0 and 0.0 <= x <= top):
        return None
    return x / top


def cls_similarity(pred, gt):
    """RISE Sim_cls (RISE annotation paper, arXiv 2508.13229, eqs. 2-5), in [0, 1]:

        Sim = exp(-0.5 KL(p || q) - 0.5 MSE(p_raw, q_raw)) * exp(-|sum(q_raw) - 1|)

    p = ground truth, q = prediction over the ground truth's classes (matched by class_key: case,
    spaces, underscores and hyphens ignored; missing classes count 0). KL uses p and q clipped at 1e-10
    and renormalised; MSE = mean over classes of the unclipped values. sum(q_raw) runs
    over *all* predicted values, so probability mass on made-up classes is not free.
    Non-numeric, NaN, inf or negative values, or a prediction with no mass on any true
    class (clip+renormalise would turn it into a uniform guess), give 0."""
    try:
        p_raw = np.array([float(v) for v in gt.values()])
        q_raw = np.array(probs_vector(pred, list(gt)), dtype=float)
        values = np.array([float(v) for v in pred.values()])
    except (AttributeError, TypeError, ValueError, OverflowError):
        return 0.0
    with np.errstate(all="ignore"):
        total = values.sum()
        if not (np.isfinite(p_raw).all() and np.isfinite(values).all() and np.isfinite(total)):
            return 0.0
        if (p_raw < 0).any() or (values < 0).any() or p_raw.sum() <= 0 or q_raw.sum() <= 0:
            return 0.0
        p = np.clip(p_raw, 1e-10, None); p = p / p.sum()
        q = np.clip(q_raw, 1e-10, None); q = q / q.sum()
        kl = float(np.sum(p * np.log(p / q)))
        mse = float(np.mean((p_raw - q_raw) * (p_raw - q_raw)))
        sim = math.exp(-0.5 * kl - 0.5 * mse) * math.exp(-abs(total - 1.0))
    return min(max(sim, 0.0), 1.0) if math.isfinite(sim) else 0.0


def covers(box, target, frac=0.5):
    """True if `box` contains at least `frac` of the area of `target` (both [x1, y1, x2, y2])."""
    iw = max(0.0, min(box[2], target[2]) - max(box[0], target[0]))
    ih = max(0.0, min(box[3], target[3]) - max(box[1], target[1]))
    return iw * ih >= frac * (target[2] - target[0]) * (target[3] - target[1])


def box_iou(a, b):
    """Intersection over union of two boxes; 0 for invalid/degenerate/non-finite boxes."""
    a, b = valid_box(a), valid_box(b)
    if a is None or b is None:
        return 0.0
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, iw) * max(0.0, ih)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    iou = inter / union if union > 0 else 0.0  # huge coordinates can make union inf/NaN
    return min(max(iou, 0.0), 1.0) if math.isfinite(iou) else 0.0


def det_similarity(pred_boxes, gt_boxes, penalize_extra=False):
    """RISE Sim_det (RISE annotation paper, arXiv 2508.13229, eq. 6): Hungarian matching maximising IoU,

        Sim = (sum of matched IoUs) / N_gt          (unmatched GT boxes add 0)

    Invalid predicted boxes have IoU 0. No GT boxes: 1.0 if nothing is predicted, else 0.
    Note: with the paper's denominator extra predicted boxes cost nothing, so listing many
    boxes is never punished; penalize_extra=True divides by max(N_gt, N_pred) instead."""
    as_list = lambda boxes: list(boxes) if isinstance(boxes, (list, tuple, np.ndarray)) else []
    gt, pred = as_list(gt_boxes), as_list(pred_boxes)
    if not gt:
        return 1.0 if not pred else 0.0
    if not pred:
        return 0.0
    iou = np.array([[box_iou(p, g) for p in pred] for g in gt])
    rows, cols = linear_sum_assignment(iou, maximize=True)
    denom = max(len(gt), len(pred)) if penalize_extra else len(gt)
    return float(iou[rows, cols].sum() / denom)


# ---------------------------------------------------------------------- leak / format
_DIGIT_WORD = r"(?:zero|one|two|three|four|five|six|seven|eight|nine)"
_NUMBER_WORD = (r"(?:zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|"
                r"thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|"
                r"forty|fifty|sixty|seventy|eighty|ninety|hundred|a\s+hundred)")
_CLS_LEAKS = [
    re.compile(r"(?<![\w.])\d+(?:\.\d+)?\s*(?:%|percent\b|per\s*cent\b)", re.I),       # 30%
    re.compile(r"\b{w}(?:[\s-]+(?:{w}|and)){{0,5}}\s*(?:%|percent\b|per\s*cent\b)"  # thirty percent
               .format(w=_NUMBER_WORD), re.I),
    re.compile(r"\b(?:(?:zero|nought|oh|one)\s+)?point\s+{d}\b".format(d=_DIGIT_WORD), re.I),
]
_DECIMAL = re.compile(r"(?<![\w.])\d*\.\d+")                    # 0.3, .25, 1.0, 2.5
_FRACTION = re.compile(r"(?<![\w.])(\d{1,9})\s*/\s*(\d{1,9})(?![\w.])")  # 3/10
_DET_LEAKS = [
    re.compile(r"(?<![\w.]){n}(?:\s*[,;:]\s*|\s+|\s*[x×]\s*){n}".format(n=NUM)),  # 12, 40 / 120x80
    re.compile(r"\b[xy][12]?\s*[=:]\s*{n}".format(n=NUM), re.I),                     # x1 = 30
    re.compile(r"(?<![\w.]){n}\s*(?:px|pixels?)\b".format(n=NUM), re.I),              # 40 pixels
]


def leaks(cot, schema, class_names=None):
    """Does a RISE-CoT chain of thought leak the annotation? (arXiv 2508.13229, eq. 1's no-leak term)

    schema "cls": any number that could be a probability -- a decimal in [0, 1] ("0.3",
      ".25", "1.0"), any percentage ("30%", "30 percent"), a fraction a/b <= 1 ("3/10"),
      and the common spelled-out forms ("thirty percent", "zero point three", "point
      two five"). Plain integers ("two dogs") and word fractions ("half", "a third") are
      allowed: they are ordinary visual description. The paper's check is this numerical
      content alone; with class_names (rise_cot.py --class-names forbid), naming a class
      (class_name_pattern) also counts as a leak.
    schema "det": a coordinate-like group of two or more numbers ("12, 40", "[10 20 30 40]",
      "120x80"), "x1=30"-style coordinates, or a pixel measure ("40 px"). A lone integer
      ("3 cars") is allowed. Thousands separators ("1,000") are a known false positive."""
    if schema not in ("cls", "det"):
        raise ValueError("schema must be 'cls' or 'det', got %r" % (schema,))
    if not isinstance(cot, str):
        return False
    if schema == "det":
        return any(r.search(cot) for r in _DET_LEAKS)
    names = class_name_pattern(class_names)
    return (any(r.search(cot) for r in _CLS_LEAKS)
            or any(float(m) <= 1.0 for m in _DECIMAL.findall(cot))
            or any(0 < int(b) and int(a) <= int(b) for a, b in _FRACTION.findall(cot))
            or bool(names and names.search(cot)))


def class_name_pattern(class_names):
    """A regex that finds any of class_names used as a word in a text, or None for no names: any case,
    an optional plural s/es, the words of a multi-word name joined by any spaces, underscores or
    hyphens or none ("Band Aid": "band-aid", "bandaid"), the name not part of a longer word ("red" is
    not found in "reddish", "anger" not in "danger", "joy" not in "joyful"). It is a lexical rule: it
    finds the word in any sense ("neutral tones" names the Emotion6 class "neutral"), so forbidding
    class names costs a real dataset such descriptions; the paper's leak check has no class names."""
    alternatives = {r"[\s_\-]*".join(map(re.escape, words)) for words in
                    (re.findall(r"[^\s_\-]+", str(n)) for n in class_names or []) if words}
    if not alternatives:
        return None
    alternatives = sorted(alternatives, key=len, reverse=True)    # the longest name first
    return re.compile(r"(?<!\w)(?:%s)(?:s|es)?(?!\w)" % "|".join(alternatives), re.I)


_SENTENCE = re.compile(r"[^。！？.!?]*(?:[。！？.!?]+|$)")


def remove_class_sentences(text, class_names):
    """The CoT cleaning of the RISE authors' code (HSH55/RISE, remove_sentences_with_word_and_clean_newlines
    in RISE-R1/trainer/grpo_class_multithink_trainer_emo6.py), used before the reconstruction and kept as
    the CoT (rise_cot.py --class-names remove): newlines become spaces, every sentence (up to . ! ? or
    the CJK 。！？) that names a class (class_name_pattern) is deleted, runs of white space become one
    space. Theirs matches a name as a case-sensitive substring ("Joy" stays, "enjoy" and "danger" go)
    and keeps a last sentence without end punctuation; here a name is a word in any case and the last
    sentence goes too when it names a class. Returns "" when every sentence names a class."""
    text = str(text).replace("\n", " ")
    names = class_name_pattern(class_names)
    if names is not None:
        text = "".join(s for s in _SENTENCE.findall(text) if not names.search(s))
    return re.sub(r"\s+", " ", text).strip()


def is_narrative(cot):
    """A RISE-CoT CoT is format-ok if it is prose: at least MIN_NARRATIVE_WORDS words and
    no <think>/<answer> tags (the CoT must not smuggle in an answer block)."""
    if not isinstance(cot, str) or re.search(r"</?\s*(?:think|answer)\s*>", cot, re.I):
        return False
    return len(re.findall(r"[^\W\d_]+", cot)) >= MIN_NARRATIVE_WORDS


def parse_and_score(text, gt, schema):
    """(a_hat, Sim(a_hat, a)) for schema "cls" (class->prob dict) or "det" (list of boxes);
    a_hat is None and Sim 0 when text does not parse in the schema format."""
    if schema == "cls":
        pred = parse_class_probs(text)
        return pred, (cls_similarity(pred, gt) if pred is not None else 0.0)
    pred = parse_boxes(text)
    return pred, (det_similarity(pred, gt) if pred is not None else 0.0)


# ---------------------------------------------------------------------------- rewards
def rise_cot_reward(cot, reconstruction, gt, schema, forbid_class_names=False, terms=("leak", "format")):
    """RISE-CoT consistency reward (arXiv 2508.13229, section "RISE-CoT", eq. 1), in [0, 1]:

        R_CoT = 1[no leak(c)] * 1[format ok(c, a_hat)] * Sim(a_hat, a)

    cot: the chain of thought c; reconstruction: the text a_hat is parsed from; gt: {class:
    prob} ("cls") or a list of boxes ("det"). The leak is the paper's "numerical content
    (probabilities or coordinate values)"; forbid_class_names=True (cls; rise_cot.py --class-names
    forbid, the tiny demo's setting) also counts naming a GT class in c as a leak.
    terms: the indicator factors kept (the paper's Table 5 ablation drops "leak" and/or "format").
    Returns reward and components (leak and format are reported whether or not they count)."""
    names = list(gt) if schema == "cls" and forbid_class_names else None
    leak = leaks(cot, schema, class_names=names)
    pred, sim = parse_and_score(reconstruction, gt, schema)
    fmt = is_narrative(cot) and pred is not None
    reward = sim * (not leak or "leak" not in terms) * (fmt or "format" not in terms)
    return {"reward": float(reward), "leak": leak, "format": fmt, "similarity": sim}


def rise_r1_reward(text, gt, schema):
    """RISE-R1 GRPO reward (arXiv 2508.13229, section "RISE-R1", eq. 9), in [0, 2]:

        R = Sim(a_hat, a) + R_fmt

    a_hat is parsed from the single <answer> block. R_fmt = 1 if the whole output is
    exactly <think>c</think><answer>a</answer> with a non-empty c and a parsable a, else 0.
    The probability-sum penalty exp(-|sum q - 1|) is part of Sim_cls (eqs. 2-5), not of R_fmt:
    the paper's R_fmt is format compliance alone. (The authors' code puts the sum penalty in its
    format reward and leaves it out of its accuracy reward, so there too it counts once.)"""
    pred, sim = parse_and_score(answer_text(text), gt, schema)
    parts = parse_think_answer(text)
    fmt = 1.0 if parts is not None and parts[0] and pred is not None else 0.0
    return {"reward": sim + fmt, "similarity": sim, "format": fmt}


def think_reward(text):
    """Seg-RISE R_think (Seg-RISE paper, section 4, format rewards): 1 if the output is <think>...</think>\\s*<answer>...</answer>
    (one of each, non-empty, nothing else around them), else 0."""
    parts = parse_think_answer(text)
    return 1.0 if parts is not None and parts[0] and parts[1] else 0.0


def seg_format_reward(text, width, height, points_format=None):
    """Seg-RISE R_seg (Seg-RISE paper, section 4, format rewards: "a parsable bounding box and two
    points in the correct JSON format with valid coordinate values"): 1 if the answer is JSON with a
    4-number box, 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, and two 2-number points inside
    the image, 0 <= x <= width and 0 <= y <= height (width x height: the model's frame), else 0.
    Whether the points lie inside the object is not checked: point accuracy is never rewarded. The
    answer is the <answer> block, or the whole text when it has no <answer> tag (--no-cot).
    points_format: parse_seg_answer's ("seg_zero" for real data, "shapes" for the shapes world, None
    either)."""
    parsed = parse_seg_answer(seg_answer(text), points_format)
    if parsed is None:
        return 0.0
    (x1, y1, x2, y2), points = parsed
    inside = all(0 <= x <= width and 0 <= y <= height for x, y in points)
    return 1.0 if inside and 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height else 0.0


def seg_box_format_reward(text, width, height):
    """R_seg of Seg-RISE's --no-points ablation (box only): 1 if the answer holds JSON with a
    4-number box, 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, else 0
    (seg_format_reward without the two points)."""
    box = parse_seg_box(seg_answer(text))
    return 1.0 if box and 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height else 0.0


def crop_box(image, box):
    """PIL crop of a pixel box, rounded outwards to whole pixels and clipped to the image;
    None if the box is invalid or has no pixel inside the image."""
    box = valid_box(box)
    if box is None:
        return None
    w, h = image.size
    x1, y1 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x2, y2 = min(w, math.ceil(box[2])), min(h, math.ceil(box[3]))
    return image.crop((x1, y1, x2, y2)) if x1 < x2 and y1 < y2 else None


def clip_semantic_reward(model, preprocess, tokenizer, image, boxes, instruction, text_cache=None):
    """Seg-RISE R_sem (Seg-RISE paper, section 4, eqs. 4-5): for each box, max(0, cos(CLIP_img(crop), CLIP_txt(instr))).

    model/preprocess/tokenizer: an open_clip model, its image transform and tokenizer.
    boxes: one box (original-image pixels) or None per completion of the group. All valid
    crops are embedded in ONE batch; invalid/None boxes get 0 without being embedded. The
    text embedding is computed once per instruction and stored in text_cache (a dict
    keyed by instruction) when one is given.
    Why max(0, .): an invalid box scores 0, so a valid box must never score below it,
    otherwise breaking the format would be the better move for a poorly matching crop."""
    rewards = [0.0] * len(boxes)
    crops = [(i, crop_box(image, b)) for i, b in enumerate(boxes)]
    crops = [(i, c) for i, c in crops if c is not None]
    if not crops:
        return rewards
    param = next(model.parameters())
    with torch.no_grad():
        cache = text_cache if text_cache is not None else {}
        if instruction not in cache:
            txt = model.encode_text(tokenizer([instruction]).to(param.device)).float()
            cache[instruction] = txt / txt.norm(dim=-1, keepdim=True)
        txt = cache[instruction]
        batch = torch.stack([preprocess(c) for _, c in crops]).to(param.device, param.dtype)
        img = model.encode_image(batch).float()
        cos = (img / img.norm(dim=-1, keepdim=True)) @ txt[0]
    for (i, _), c in zip(crops, cos.tolist()):
        rewards[i] = max(0.0, min(1.0, c)) if math.isfinite(c) else 0.0
    return rewards


# ---------------------------------------------------------------------------- metrics
def jsd(p, q):
    """Jensen-Shannon divergence, natural log, in [0, ln 2] (arXiv 2508.13229, eq. 11):

        JSD = 0.5 KL(p || m) + 0.5 KL(q || m),  m = (p + q) / 2

    p and q are renormalised to sum 1 first (as scipy's jensenshannon does; equals its
    square). Empty, negative, non-finite or all-zero input is the worst case, ln 2."""
    p, q = np.asarray(p, dtype=float).ravel(), np.asarray(q, dtype=float).ravel()
    if p.shape != q.shape:
        raise ValueError("jsd: p and q have different lengths")
    if p.size == 0 or not (np.isfinite(p).all() and np.isfinite(q).all()):
        return LN2
    if (p < 0).any() or (q < 0).any() or p.max() <= 0 or q.max() <= 0:
        return LN2
    p, q = p / p.max(), q / q.max()  # first scale by the max: summing 1e308s would overflow
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)
    d = 0.5 * rel_entr(p, m).sum() + 0.5 * rel_entr(q, m).sum()
    return float(min(max(d, 0.0), LN2))


def class_key(name):
    """A class name as matched between a prediction and the ground truth: lower case, without spaces,
    underscores and hyphens, so "Analog Clock", "analog_clock" and "analogclock" are one class. The
    RISE authors' reward lower-cases and strips spaces and underscores from both answers but not from
    its class list (HSH55/RISE, RISE-R1/grpo_IMD.py), so a multi-word or capitalised ImageNet-Sub
    class ("analog clock", "Band Aid") never matched there; here every name gets the same key."""
    return re.sub(r"[\s_\-]+", "", str(name)).lower()


def probs_vector(pred, classes):
    """{class: prob} -> list aligned with classes. Names match by class_key (case, spaces,
    underscores and hyphens ignored; duplicates after that are summed); missing classes are 0."""
    merged = defaultdict(float)
    for k, v in (pred or {}).items():
        merged[class_key(k)] += v
    return [merged.get(class_key(c), 0.0) for c in classes]


def win_rate(baseline_jsds, our_jsds):
    """WR (RISE eval): fraction of samples where the baseline's JSD is strictly lower than
    ours (ties are not baseline wins). Lower is better for us. Empty -> 0.0."""
    if len(baseline_jsds) != len(our_jsds):
        raise ValueError("win_rate: lists differ in length")
    wins = sum(b < o for b, o in zip(baseline_jsds, our_jsds))
    return wins / len(our_jsds) if our_jsds else 0.0


def accuracy(pred_labels, gt_labels):
    """Fraction of exact matches; a None (unparsable) prediction is wrong. Empty -> 0.0."""
    if len(pred_labels) != len(gt_labels):
        raise ValueError("accuracy: lists differ in length")
    hits = sum(p is not None and p == g for p, g in zip(pred_labels, gt_labels))
    return hits / len(gt_labels) if gt_labels else 0.0


def normalise_answer(text):
    """Lower case, no punctuation, no articles, single spaces (SQuAD-style)."""
    text = "".join(ch for ch in str(text).lower() if ch not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def is_long(answer, words=3):
    """More than `words` words after normalise_answer (VisRL: such answers are judged by the critic)."""
    return len(normalise_answer(answer).split()) > words


def _average_precision(dets, gts_by_img, iou_thresh):
    """COCO AP of one class: dets = [(score, image, box)] in output order."""
    n_gt = sum(len(b) for b in gts_by_img.values())
    used = {img: [False] * len(b) for img, b in gts_by_img.items()}
    tp = []
    for score, img, box in sorted(dets, key=lambda d: -d[0]):  # stable: ties keep order
        best, best_iou = -1, min(iou_thresh, 1 - 1e-10)
        for j, g in enumerate(gts_by_img.get(img, [])):
            iou = box_iou(box, g)
            if not used[img][j] and iou >= best_iou:  # >=: ties go to the later GT (pycocotools)
                best, best_iou = j, iou
        if best >= 0:
            used[img][best] = True
        tp.append(best >= 0)
    tp = np.array(tp, dtype=bool)
    tp_sum, fp_sum = np.cumsum(tp).astype(float), np.cumsum(~tp).astype(float)
    recall = tp_sum / n_gt
    precision = tp_sum / (tp_sum + fp_sum + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # precision envelope
    idx = np.searchsorted(recall, np.linspace(0.0, 1.0, 101), side="left")
    return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in idx]))


def map50(predictions, ground_truths, iou_thresh=0.5):
    """mAP@0.5, COCO style (arXiv 2508.13229, "Evaluation Metrics"), agreeing with pycocotools COCOeval:
    per class, detections of all images sorted by score (stable), greedily matched to the
    best unmatched GT of their image with IoU >= 0.5; AP = mean of the interpolated
    precision at the 101 recall points 0, 0.01, ..., 1; mAP = mean over classes present
    in the ground truth (classes only predicted are ignored, as in COCO).

    One dict per image: {"boxes": [[x1,y1,x2,y2], ...], "labels": [...], "scores": [...]}.
    Predictions may omit "scores" (1.0 each, so output order decides) or be None."""
    if len(predictions) != len(ground_truths):
        raise ValueError("map50: one prediction dict per ground-truth image")
    gts = defaultdict(lambda: defaultdict(list))
    for i, g in enumerate(ground_truths):
        for box, label in zip(g["boxes"], g["labels"]):
            gts[label][i].append(box)
    dets = defaultdict(list)
    for i, p in enumerate(predictions):
        p = p if isinstance(p, dict) else {}
        boxes, labels = p.get("boxes") or [], p.get("labels") or []
        scores = p.get("scores") or [1.0] * len(boxes)
        if not len(boxes) == len(labels) == len(scores):
            raise ValueError("map50: image %d has %d boxes, %d labels, %d scores"
                             % (i, len(boxes), len(labels), len(scores)))
        for box, label, s in zip(boxes, labels, scores):
            s = _number(s)
            dets[label].append((-math.inf if s is None else s, i, box))
    aps = [_average_precision(dets.get(c, []), gts[c], iou_thresh) for c in gts]
    return float(np.mean(aps)) if aps else 0.0


def mask_counts(pred, gt, ignore=None):
    """(|P & G|, |P | G|) of two HxW masks, in pixels, leaving out the `ignore` pixels (an HxW mask,
    or None) from both: LISA's ReasonSeg protocol (utils.intersectionAndUnionGPU: the prediction is
    set to the ignore value wherever the ground truth holds it). A None prediction (an unparsable
    answer) is an empty mask. Raises ValueError when the shapes differ."""
    g = np.asarray(gt, dtype=bool)
    p = np.zeros_like(g) if pred is None else np.asarray(pred, dtype=bool)
    keep = np.ones_like(g) if ignore is None else ~np.asarray(ignore, dtype=bool)
    if p.shape != g.shape or keep.shape != g.shape:
        raise ValueError("mask shapes differ %s vs %s (ignore %s)" % (p.shape, g.shape, keep.shape))
    p, g = p & keep, g & keep
    return int(np.logical_and(p, g).sum()), int(np.logical_or(p, g).sum())


def iou_from_counts(counts, parsed):
    """gIoU and cIoU of Seg-RISE from per-sample mask_counts [(inter, union)], so that ranks
    can merge counts: gIoU = mean of inter / union, cIoU = sum inter / sum union. A sample
    whose answer did not parse (parsed[i] False) scores IoU 0; an empty union (empty
    prediction and GT) is IoU 1.0 (cIoU 1.0 when every union is empty). No samples -> (0.0, 0.0)."""
    ious = [0.0 if not ok else inter / union if union else 1.0
            for (inter, union), ok in zip(counts, parsed)]
    if not ious:
        return 0.0, 0.0
    union_sum = sum(union for _, union in counts)
    return float(np.mean(ious)), (sum(inter for inter, _ in counts) / union_sum if union_sum else 1.0)


def mask_iou_stats(pred_masks, gt_masks):
    """Seg-RISE metrics: gIoU = mean over samples of |P & G| / |P | G|, cIoU =
    sum |P & G| / sum |P | G| (iou_from_counts). A None prediction (an unparsable answer)
    scores IoU 0 and counts as an empty mask in cIoU. An empty predicted mask vs an empty GT
    is IoU 1.0 (cIoU 1.0 when every union is empty). No samples -> (0.0, 0.0)."""
    if len(pred_masks) != len(gt_masks):
        raise ValueError("mask_iou_stats: lists differ in length")
    counts = [mask_counts(pred, g) for pred, g in zip(pred_masks, gt_masks)]
    return iou_from_counts(counts, [pred is not None for pred in pred_masks])
