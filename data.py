"""data.py -- the prompts, the manifests and the default data of the pipelines.

  1. prompts       the prompt templates, prompt() that picks one for a record, answer formats
  2. manifests     read_manifest() validates a JSONL manifest, manifest_task() tells its task,
                   write_jsonl() writes one; open_image() opens an image as the model sees it
                   (EXIF turned, alpha on white, 16-bit grey scaled to 8 bits)
  3. shapes world  a deterministic synthetic data set of coloured shapes (the default data),
                   and its scene descriptions (the "CoTs" the tiny model learns)
  4. command line  python data.py shapes --out DIR [--n-train N] [--n-test M] [--seed S]
The converters from the public datasets' own layouts are in convert.py. Only the standard
library, numpy and Pillow are used, so any function can be copied alone.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps


# ============================================================================ 1. prompts
# Two sets of prompts, chosen by the data (is_shapes: a shapes-world record carries its "scene"), never by
# the model. Real datasets get the papers' prompts, word for word (RISE: the block after format_annotation;
# Seg-RISE: Seg-Zero's; VisRL: its authors'). The shapes world gets its own, the exact texts the tiny base
# is trained on (change them only together with a rebuild): each ENDS with what to look for (target,
# instruction, question, class list), box prompts in the words of the tiny base's look question (": the box
# of the green square."), because the tiny chat template puts the image right after the text and the tiny
# base finds a named shape only when its name is the last thing before the image (tiny-base/README.md).
COT_MAX_WORDS = 60
COT_PROMPT_CLS = ("The answer is {annotation}. Describe the image so that someone could infer "
                  "this answer from your description alone, in at most {max_words} words. "
                  "Do not write any numbers{no_names}.")
NO_NAMES = " or class names"
COT_PROMPT_DET = ("The {target} is at {annotation}. Describe where it is and what is around it "
                  "so that someone could find it from your description alone, in at most {max_words} words. "
                  "Do not write any numbers or coordinates.")
COT_PROMPT_MULTI_DET = ("The {target} are at {annotation}. Describe where they are and what is "
                        "around them so that someone could find them from your description "
                        "alone, in at most {max_words} words. Do not write any numbers or coordinates.")
REC_PROMPT_CLS = ("Description: {cot}\nUsing the image and the description, give as JSON the probability "
                  "of each class in {class_list}.")
REC_PROMPT_DET = ("Description: {cot}\nUsing the image and the description, answer with [x1,y1,x2,y2]: "
                  "the box of {target}.")
REC_PROMPT_MULTI_DET = ("Description: {cot}\nUsing the image and the description, answer with "
                        "[[x1,y1,x2,y2], ...]: the boxes of all {target}.")
R1_PROMPT_CLS = ("Think in <think></think>, then answer in <answer></answer> with JSON: the probability "
                 "of each class in {class_list}.")
R1_PROMPT_DET = ("Think in <think></think>, then answer in <answer></answer> with [x1,y1,x2,y2]: "
                 "the box of {target}.")
R1_PROMPT_MULTI_DET = ("Think in <think></think>, then answer in <answer></answer> with "
                       "[[x1,y1,x2,y2], ...]: the boxes of all {target}.")
PLAIN_PROMPT_CLS = "Give as JSON the probability of each class in {class_list}."
PLAIN_PROMPT_DET = "Answer with [x1,y1,x2,y2]: the box of {target}."
PLAIN_PROMPT_MULTI_DET = "Answer with [[x1,y1,x2,y2], ...]: the boxes of all {target}."
SEG_PROMPT = ('Think in <think></think>, then answer in <answer></answer> with JSON {{"bbox": '
              '[x1,y1,x2,y2], "points": [[x,y],[x,y]]}} (two points inside the object): the box of {instruction}.')
SEG_PROMPT_NO_COT = ('Answer in <answer></answer> with JSON {{"bbox": [x1,y1,x2,y2], "points": '
                     '[[x,y],[x,y]]}} (two points inside the object): the box of {instruction}.')
# Qwen2.5-VL's own grounding prompt, the sentence of its spatial-understanding cookbook ("Locate the top right
# brown cake, output its bbox coordinates using JSON format.") with the expression in place of "the top right
# brown cake": the Seg-RISE paper tests RefCOCO/+/g with "the official prompt consistent with that of
# Qwen2.5VL" (sec. 5). No article is added: RefCOCO(g) expressions carry their own ("the man in red").
GROUNDING_PROMPT = "Locate {instruction}, output its bbox coordinates using JSON format."
BOX_FRAME_NOTE = "The image is of resolution {width}x{height}. "
# Shapes world (the tiny base is trained on these): VisRL's two turns (the paper's CoT sentence, then the shapes
# world's box format and question) and its critic's two questions
VISRL_BOX_PROMPT = ("Please first provide the bounding box coordinate of the region, then refer to the "
                    "corresponding sub-image to answer the question better. Box: [x1,y1,x2,y2] in 0..1. "
                    "{question}")
VISRL_ANSWER_PROMPT = ("This is the region you chose. Now answer the question in one word: "
                       "{question}")
CRITIC_BOX_PROMPT = ('Question: {question} Reference answer: {answer}. Does this image show what '
                     'is needed to give the reference answer? Reply with JSON {{"score": x}}, '
                     'x between 0 and 1.')
CRITIC_ANSWER_PROMPT = ('Question: {question} Reference answer: {reference} Candidate answer: '
                        '{answer}. How close is the candidate to the reference? Reply with JSON '
                        '{{"score": x}}, x between 0 and 1.')
# Shapes world, Seg-RISE's --no-points ablation (not in the tiny base's training)
SEG_PROMPT_NO_POINTS = ('Think in <think></think>, then answer in <answer></answer> with JSON '
                        '{{"bbox": [x1,y1,x2,y2]}}: the box of {instruction}.')
SEG_PROMPT_NO_POINTS_NO_COT = 'Answer in <answer></answer> with JSON {{"bbox": [x1,y1,x2,y2]}}: the box of {instruction}.'

# Seg-RISE, real data: the paper keeps "consistency with the Seg-Zero configuration" (sec. 5, implementation
# details), so a real model gets Seg-Zero's single-object prompt word for word (dvlab-research/Seg-Zero,
# verl/utils/rl_dataset.py and inference_scripts/infer.py of its first release): the sentences joined with
# no space, as Seg-Zero's adjacent string literals are; '{question}' the instruction lower-cased with its
# dots stripped (Seg-Zero: problem.lower().strip(".")); its example answer in single quotes as Seg-Zero
# writes it (the answer itself must be JSON: Seg-Zero's reward reads it with json.loads). No frame note:
# Qwen2.5-VL writes pixels of the image it is shown, here 840 x 840 (seg_rise.py --image-side).
SEG_ZERO_FIND = "Please find '{question}' with bbox and points."
SEG_ZERO_COMPARE = "Compare the difference between objects and find the most closely matched one."
SEG_ZERO_TAGS = "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
SEG_ZERO_JSON = ("Output the one bbox and points of two largest inscribed circles inside the interested object "
                 "in JSON format.")
SEG_ZERO_EXAMPLE = "i.e., <think> thinking process here </think><answer>{answer}</answer>"
SEG_ZERO_ANSWER = "{'bbox': [10,100,200,210], 'points_1': [30,110], 'points_2': [35,180]}"
SEG_ZERO_PROMPT = SEG_ZERO_FIND + SEG_ZERO_COMPARE + SEG_ZERO_TAGS + SEG_ZERO_JSON + SEG_ZERO_EXAMPLE
# The paper's ablations have no published prompt (Tab. 5 "w/o CoT": "not prompted to produce a
# <think>...</think> block"; Tab. 6 "w/o Points"). Ours are Seg-Zero's with words deleted, nothing added:
# w/o CoT drops "the thinking process in <think> </think> and" and the example's think; w/o points drops
# " and points", " and points of two largest inscribed circles" and the example's two points.
SEG_ZERO_NO_POINTS = {"find": ("with bbox and points.", "with bbox."),
                      "json": ("bbox and points of two largest inscribed circles inside", "bbox inside"),
                      "answer": (", 'points_1': [30,110], 'points_2': [35,180]", "")}
SEG_ZERO_NO_COT = {"tags": ("Output the thinking process in <think> </think> and final answer",
                            "Output the final answer"),
                   "example": ("<think> thinking process here </think>", "")}

# VisRL, real data (arXiv 2503.07523 sec. 4, Settings): "we add a CoT prompt (...) to the question", word for
# word; the released code (zhangquanchen/VisRL data_gen/generate.py) puts it where VisCoT's own sentence was:
# "{question} Please first provide ... better." Its answer step is a NEW user turn with the same text and the
# crop after it (visrl.answer_turns): no second instruction, no box in context.
VISRL_COT_PROMPT = ("Please first provide the bounding box coordinate of the region, then refer to the "
                    "corresponding sub-image to answer the question better.")
VISRL_QUESTION = "{question} " + VISRL_COT_PROMPT
# The critic's prompts of the released code (data_gen/generate.py, judge_score_prompt and judge_bbox_prompt),
# word for word with the indentation its f-strings keep and their last line of four spaces. "Question: " is
# followed by the question and one space: the code removes the CoT sentence from "{question} Please first ...".
VISRL_JUDGE_ANSWER_PROMPT = (
    "You are responsible for proofreading the answers, you need to give the score to the model's answer by "
    "referring to the standard answer, based on the given question and image.\n"
    "    The full score is 1 point and the minimum score is 0 points. Please directly provide the score in JSON "
    "format, for example, {{\"score\": 0.8}}, without showing the intermediate process.\n"
    "    The evaluation criteria require that the closer the model's answer is to the standard answer, the "
    "higher the score.\n"
    "\n"
    "    Question: {question} \n"
    "    Standard answer: {reference}\n"
    "    Model's answer: {answer}\n"
    "    ")
VISRL_JUDGE_BOX_PROMPT = (
    "You are responsible for verifying the relevance of the image based on the provided question and standard "
    "answer, you need to assess whether the image aligns with the standard answer.\n"
    "    The full score is 1 point and the minimum score is 0 points. Please directly provide the score in JSON "
    "format, for example, {{\"score\": 0.8}}, without showing the intermediate process.\n"
    "    The evaluation criteria is that, the higher score will be if the image effectively encompasses the "
    "information provided in the standard answer based on question.\n"
    "\n"
    "    Question: {question} \n"
    "    Standard answer: {answer}\n"
    "    ")
VISCOT_BOX = "[{:.3f}, {:.3f}, {:.3f}, {:.3f}]"   # VisCoT's and VisRL's box text: '[%0.3f, %0.3f, %0.3f, %0.3f]'


def seg_prompt(instruction, cot=True, points=True, shapes=False):
    """Seg-RISE's prompt for one instruction: the shapes world's (SEG_PROMPT ...), or for real data
    Seg-Zero's (SEG_ZERO_PROMPT; --no-cot / --no-points: its words deleted, SEG_ZERO_NO_COT / _NO_POINTS)."""
    if shapes:
        return [[SEG_PROMPT_NO_POINTS_NO_COT, SEG_PROMPT_NO_POINTS], [SEG_PROMPT_NO_COT, SEG_PROMPT]][points][cot] \
            .format(instruction=instruction)
    parts = {"find": SEG_ZERO_FIND, "compare": SEG_ZERO_COMPARE, "tags": SEG_ZERO_TAGS, "json": SEG_ZERO_JSON,
             "example": SEG_ZERO_EXAMPLE, "answer": SEG_ZERO_ANSWER}
    for deletions, on in ((SEG_ZERO_NO_POINTS, not points), (SEG_ZERO_NO_COT, not cot)):
        for key, (old, new) in deletions.items() if on else ():
            parts[key] = parts[key].replace(old, new)
    template = "".join(parts[k] for k in ("find", "compare", "tags", "json", "example"))
    return template.format(question=instruction.lower().strip("."), answer=parts["answer"])


def format_viscot_box(box):
    """A box normalised to 0..1 as VisCoT and VisRL write it: '[0.123, 0.456, 0.789, 0.901]' (3 decimals)."""
    return VISCOT_BOX.format(*(min(max(float(v), 0.0), 1.0) + 0.0 for v in box))


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
    return COT_PROMPT_CLS.format(annotation=format_probs(classes, probs), max_words=COT_MAX_WORDS,
                                 no_names=NO_NAMES if mask_names else "")


def cot_prompt_det(target, boxes, multi=False):
    """COT_PROMPT_DET starts with "The {target}", so a leading "the " is dropped from target."""
    if target.lower().startswith("the "):
        target = target[4:]
    if multi:
        return COT_PROMPT_MULTI_DET.format(target=target, annotation=format_boxes(boxes), max_words=COT_MAX_WORDS)
    return COT_PROMPT_DET.format(target=target, annotation=format_box(boxes[0]), max_words=COT_MAX_WORDS)


def prompt(style, record, cot=None, boxes=None, mask_names=True, frame=None):
    """The user prompt for one manifest record: the one place that picks a prompt template.

    style: "cot" (RISE step 1: the annotation -> a description; for detection `boxes` are the
    record's boxes in the model's frame), "rec" (RISE step 2: the description `cot` -> the
    answer), "r1" (think, then answer), "plain" (the answer only), "seg" / "seg_no_cot" /
    "seg_no_points" / "seg_no_points_no_cot" (Seg-RISE and its ablations: seg_prompt), "grounding"
    (Qwen2.5-VL's own grounding prompt, for testing a real checkpoint), "visrl" (VisRL's first turn:
    the question and the helpful region's box). Seg-RISE and VisRL: a shapes-world record (is_shapes)
    gets the shapes world's wording, any other the papers' (Seg-Zero's; VisRL's), which states no
    frame. The record's fields pick its schema:
    "probs" classification, "boxes" detection, "instruction" segmentation, "question" VQA.
    Classification and detection: a shapes-world record (it has a "scene") gets the templates the
    tiny base is trained on; every other record gets the RISE authors' prompts (rise_prompt), whatever
    the model. mask_names (shapes world only): the CoT prompt also forbids class names.
    Single-box or box-list template: from the dataset's "multi" flag (COCO-Sub, shapes
    multi_det), never from the record's number of boxes, which would tell the model the label
    (RISE arXiv 2508.13229 evaluates COCO-Sub with one prompt for every image).
    frame: (width, height) of the frame the model writes boxes in (vlm.box_frame: 1000x1000
    for Qwen2-VL, the resized input's pixels for Qwen2.5-VL); box prompts then start by saying
    it. Raises KeyError for a style the record's schema has no prompt in."""
    note = frame_note(frame)
    if style in ("seg", "seg_no_cot", "seg_no_points", "seg_no_points_no_cot"):
        shapes = is_shapes([record])
        return (note if shapes else "") + seg_prompt(record["instruction"], cot="no_cot" not in style,
                                                     points="no_points" not in style, shapes=shapes)
    if style == "grounding":
        return GROUNDING_PROMPT.format(instruction=record["instruction"])
    if style == "visrl":
        return (VISRL_BOX_PROMPT if is_shapes([record]) else VISRL_QUESTION).format(question=record["question"])
    if "scene" not in record:                   # a real dataset: the RISE authors' prompts
        return rise_prompt(style, record, cot=cot, boxes=boxes, frame=frame)
    if "probs" in record:
        if style == "cot":
            return cot_prompt_cls(record["classes"], record["probs"], mask_names=mask_names)
        template = {"rec": REC_PROMPT_CLS, "r1": R1_PROMPT_CLS, "plain": PLAIN_PROMPT_CLS}[style]
        return template.format(cot=cot, class_list=class_list(record["classes"]))
    multi = bool(record.get("multi"))
    if style == "cot":
        return note + cot_prompt_det(record["target"], boxes, multi=multi)
    template = {"rec": (REC_PROMPT_DET, REC_PROMPT_MULTI_DET),
                "r1": (R1_PROMPT_DET, R1_PROMPT_MULTI_DET),
                "plain": (PLAIN_PROMPT_DET, PLAIN_PROMPT_MULTI_DET)}[style][multi]
    return note + template.format(cot=cot, target=record["target"])


def frame_note(frame):
    """The sentence that tells a model its box frame, (width, height), or "" for frame=None."""
    return BOX_FRAME_NOTE.format(width=frame[0], height=frame[1]) if frame else ""


def format_annotation(record, boxes):
    """The answer text of a detection record: one box, or a list for a multi-object dataset
    (even when this image has one object: the format must not depend on the label)."""
    return format_boxes(boxes) if record.get("multi") else format_box(boxes[0])


# ------------------------------------------------------------------ RISE prompts for real datasets
# Records without a "scene" (every dataset convert.py makes) get the RISE annotation paper's prompts. The
# paper's Appendix A (its templates) is not in the text; its authors' code is (HSH55/RISE at 4ff62cc, the
# file of each template named above it), and where it holds no template the one used is built from its
# nearest released text and says so. Numbers and names are filled in as the authors' code fills them.
EMOTION6_CLASSES = ["anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral"]
# The authors' box-frame sentence (their reconstruction prompts, below), with the model's own frame filled in:
# Qwen2-VL writes boxes in 0..1000 of each side (1000×1000, the authors' words exactly), Qwen2.5-VL in pixels
# of its resized input (vlm.box_frame). × is U+00D7, as theirs.
RISE_FRAME = "The image is of resolution {width}×{height}."
# RISE-CoT reasoning generation, object classes (ImageNet-Sub): dataset_generate.py, `question`, word for word.
RISE_COT_OBJECTS = (
    "Analyze the image to explain how the visual elements support the object classification probability "
    "distribution {answer_str}, concisely in under 100 words. Describe key objects, shapes, textures, and "
    "contextual details that contribute to the inferred object category, highlighting their connection to the "
    "classification probabilities. Avoid directly stating the object names or probabilities; instead, focus on "
    "the visual cues and their implications.")
# RISE-CoT reasoning generation, Emotion6: ADAPTED, not the authors' text. Their Emotion6 prompts were built
# offline and are not released; their trainer (RISE-R1/trainer/grpo_class_multithink_trainer_emo6.py L440,
# _generate_responses) shows only that the prompt held "...this distribution.", which it turned into "...this
# distribution concisely in under 100 words." at run time. This is RISE_COT_OBJECTS with the objects' words
# turned into emotions'.
RISE_COT_EMOTIONS = (
    "Analyze the image to explain how the visual elements support the emotion probability distribution "
    "{answer_str}, concisely in under 100 words. Describe key objects, facial expressions, colors, scene "
    "settings, and contextual details that contribute to the evoked emotions, highlighting their connection to "
    "the emotion probabilities. Avoid directly stating the emotion names or probabilities; instead, focus on "
    "the visual cues and their implications.")
# RISE-CoT reasoning generation, detection (LISA, COCO-Sub): newprompt_build() of RISE-COT/trainer/
# grpo_lisa_trainer.py (the same in grpo_coco_trainer.py), word for word. It states the GT box; the
# no-coordinates rule is the reward's leak check. The frame sentence is put before it (rise_prompt).
RISE_COT_DET = (
    "Describe why the region is identified as the target object. The region's coordinates are {bounding_box}, "
    "and it contains {contains_content} Analyze its shape, color, texture, and contextual clues. Using these "
    "visual and contextual features, explain why this region is recognized as {object_name}. Provide a clear "
    "Chain-of-Thought (CoT) to justify the conclusion.")
# RISE-CoT annotation reconstruction, classification: RISE-R1/trainer/grpo_class_multithink_trainer_emo6.py
# L505-509, word for word for Emotion6 (its example outputs are EMOTION6_EXAMPLE / _INCORRECT). Other class
# lists (ImageNet-Sub; the authors' trainer for it is not released) get the same text with "object categories"
# and examples over their own classes: uniform probabilities, and all-integer zeros as the incorrect one.
RISE_REC_CLS = (
    "Please analyze the provided image description and generate a probability distribution across the "
    "following {kind} categories: {categories}. Description: {description}. Do not provide any additional "
    "explanations or reasoning. Only return the result in the specified format. Each probability must be a "
    "floating-point number between 0 and 1, rounded to 6 decimal places. The sum of all probabilities must be "
    "exactly 1.000000 (allowing for minor floating-point errors). Example output: {example}. Incorrect output: "
    "{incorrect}.")
EMOTION6_EXAMPLE = ("{'anger': 0.0, 'disgust': 0.1666667, 'fear': 0.1, 'joy': 0.466667, 'sadness': 0.1, "
                    "'surprise': 0.166667, 'neutral': 0.0}")
EMOTION6_INCORRECT = ("{'anger': 0, 'disgust': 0, 'fear': 0, 'joy': 1.0, 'sadness': 0, 'surprise': 0, "
                      "'neutral': 0}")
# RISE-CoT annotation reconstruction, detection: LISA RISE-COT/trainer/grpo_lisa_trainer.py L583 (one box),
# COCO-Sub grpo_coco_trainer.py L631 (a box list), word for word but the frame ("1000×1000" for Qwen2-VL).
# No space after "region." is theirs.
RISE_REC_DET = (
    '{frame} Based on the following reasoning, which describes the region corresponding to the target category '
    '"{target}": {description}, please extract and output the exact bounding box coordinates of that region.'
    'Only return the result in the following format:{box_format}.')
RISE_BOX_FORMAT, RISE_BOXES_FORMAT = "[x1, y1, x2, y2]", "[[x1,y1,x2,y2],...,[x1,y1,x2,y2]]"
# RISE-R1 (think, then answer) and the SFT baseline (the answer only): not released by the authors. The paper
# says only that every method but SFT gets the same think-answer prompt. So: the task in the authors' words
# (their reconstruction prompts; COCO-Sub: Visual-RFT's COCO prompt, coco_evaluation/Qwen2_VL_coco_infere.py,
# Liuziyu77/Visual-RFT at 9486633, the baseline RISE compares with), then Visual-RFT's think-answer block
# (same file; its answer format replaced by the RISE answer format) or, for the SFT baseline, the authors'
# "Only return the result in the following format" sentence.
RISE_TASK_CLS = ("Please analyze the image and generate a probability distribution across the following "
                 "{kind} categories: {categories}.")
RISE_TASK_DET = 'Detect the region corresponding to the target category "{target}" and provide its bounding box.'
RISE_TASK_MULTI_DET = ("Detect all objects belonging to the category '{target}' in the image, and provide the "
                       "bounding boxes.")
RISE_R1 = ("{task}\nOutput the thinking process in <think> </think> and final answer in <answer> </answer> "
           "tags.The output answer format should be as follows:\n<think> ... </think> <answer>{answer_format}"
           "</answer>\nPlease strictly follow the format.")
RISE_PLAIN = "{task} Only return the result in the following format: {answer_format}."


def rise_prompt(style, record, cot=None, boxes=None, frame=None):
    """The RISE prompt of a real classification or detection record (data.prompt picks it for records
    without a "scene"): style "cot" (the annotation -> a CoT; detection: `boxes` in the model's frame),
    "rec" (the CoT `cot` -> the annotation), "r1" (think, then answer), "plain" (the answer only).
    Classification: Emotion6's wording for a record over the Emotion6 classes, the object wording otherwise.
    Detection: one box, or a box list for a multi-object dataset (record "multi": COCO-Sub), never from the
    number of boxes. frame: (width, height) of the model's box frame (vlm.box_frame), required for
    detection: RISE_FRAME states it. Raises KeyError for another style, ValueError for a detection record
    without frame."""
    if "probs" in record:
        classes = record["classes"]
        emotions = set(classes) == set(EMOTION6_CLASSES)
        kind, categories = ("emotion" if emotions else "object"), ", ".join(map(repr, map(str, classes)))
        if style == "cot":
            template = RISE_COT_EMOTIONS if emotions else RISE_COT_OBJECTS
            return template.format(answer_str=rise_probs(classes, record["probs"], sep=":"))
        if style == "rec":
            example = EMOTION6_EXAMPLE if emotions else rise_probs(classes, [1 / len(classes)] * len(classes))
            incorrect = EMOTION6_INCORRECT if emotions else "{" + ", ".join(f"{c!r}: 0" for c in classes) + "}"
            return RISE_REC_CLS.format(kind=kind, categories=categories, description=cot, example=example,
                                       incorrect=incorrect)
        task = RISE_TASK_CLS.format(kind=kind, categories=categories)
        answer_format = "{" + ", ".join(f"{c!r}: probability" for c in map(str, classes)) + "}"
        return {"r1": RISE_R1, "plain": RISE_PLAIN}[style].format(task=task, answer_format=answer_format)
    if style not in ("cot", "rec", "r1", "plain"):
        raise KeyError(style)
    if frame is None:
        raise ValueError("a RISE detection prompt states the model's box frame: pass frame=vlm.box_frame(...)")
    multi, target = bool(record.get("multi")), record["target"].strip()
    note = RISE_FRAME.format(width=frame[0], height=frame[1])
    if style == "cot":
        name = target.rstrip(".?!")
        return note + " " + RISE_COT_DET.format(bounding_box=rise_boxes(boxes, multi), object_name=name,
                                                 contains_content=name + ".")
    box_format = RISE_BOXES_FORMAT if multi else RISE_BOX_FORMAT
    if style == "rec":
        return RISE_REC_DET.format(frame=note, target=target, description=cot, box_format=box_format)
    task = (RISE_TASK_MULTI_DET if multi else RISE_TASK_DET).format(target=target)
    return note + " " + {"r1": RISE_R1, "plain": RISE_PLAIN}[style].format(task=task, answer_format=box_format)


def rise_number(p):
    """A probability as the authors write it: at most 6 decimals, at least one ("1.0", "0.0", "0.166667")."""
    text = f"{round(float(p), 6) + 0.0:.6f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def rise_probs(classes, probs, sep=": "):
    """{class: prob} as the authors' Python-dict text: "{'anger': 0.0, 'joy': 0.466667}" (their answers and
    reconstruction examples); sep=":" gives their CoT prompt's "{'analog clock':1.0, 'backpack':0.0}".
    Names are quoted as Python does (repr), so "lady's slipper" stays a valid literal."""
    return "{" + ", ".join(f"{str(c)!r}{sep}{rise_number(p)}" for c, p in zip(classes, probs)) + "}"


def rise_boxes(boxes, multi):
    """Boxes (model frame) in the format the RISE prompt asks for: "[x1, y1, x2, y2]" (one box) or
    "[[x1,y1,x2,y2],[x1,y1,x2,y2]]" (a multi-object dataset), integers."""
    if multi:
        return format_boxes(boxes)
    return "[" + ", ".join(str(int(round(v))) for v in boxes[0]) + "]"


def format_answer(record, boxes=None):
    """The answer text of a record, as its prompts ask for it (SFT targets): the class distribution, or
    `boxes` (model frame) as one box or a list. Shapes-world records keep the tiny base's formats
    (format_probs, format_annotation), real records the RISE authors' (rise_probs, rise_boxes)."""
    shapes = "scene" in record
    if "probs" in record:
        return (format_probs if shapes else rise_probs)(record["classes"], record["probs"])
    return format_annotation(record, boxes) if shapes else rise_boxes(boxes, bool(record.get("multi")))


# =================================================================== 2. manifests and images
# A manifest is a JSONL file, one record per line; image paths are relative to its folder.
# Extra fields are allowed and kept. "cls" covers soft and one-hot classification.
REQUIRED = {
    "cls": ("id", "image", "classes", "probs"),
    "det": ("id", "image", "target", "boxes"),
    "seg": ("id", "image", "instruction"),            # optional: "mask", "ignore_mask", "box"
    "vqa": ("id", "image", "question", "answer"),     # optional: "box"
}


class ManifestError(ValueError):
    """A bad manifest record; the message starts with "<path>:<line>: "."""

    def __init__(self, path, line, reason):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = str(path), line, reason


class NoRecordsError(ManifestError):
    """A manifest with no usable record (empty, blank lines only, or every record skipped as bad):
    "no usable records in <path>: <why>". Raised where it is read, not as a division by zero later."""

    def __init__(self, path, reason):
        ValueError.__init__(self, f"no usable records in {path}: {reason}")
        self.path, self.line, self.reason = str(path), None, reason


class UnreadableImage(OSError):
    """An image file PIL cannot open or decode, or a decompression bomb (more pixels than PIL's
    Image.MAX_IMAGE_PIXELS): "unreadable image <path>: <PIL's exception>: <its message>"."""

    def __init__(self, path, cause):
        hint = (f" (PIL's decompression-bomb check: over Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels)"
                if isinstance(cause, (Image.DecompressionBombError, Image.DecompressionBombWarning)) else "")
        super().__init__(f"unreadable image {path}: {type(cause).__name__}: {cause}{hint}")


@contextlib.contextmanager
def _pil_errors(path):
    """Any failure of PIL on `path` -> UnreadableImage; a DecompressionBombWarning (over
    Image.MAX_IMAGE_PIXELS, under twice that) fails too, as its DecompressionBombError does above."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except Exception as e:     # PIL raises many types for broken files (OSError, SyntaxError, ValueError...)
        raise UnreadableImage(path, e) from e


def check_image(path):
    """The manifest's image check: PIL identifies the file and reads its header and chunks
    (verify(): no decode, so a file truncated inside its pixel data passes here and is a sample that
    cannot be processed later: open_image raises, run.usable skips and counts it).
    Raises UnreadableImage (decompression bombs included)."""
    with _pil_errors(path), Image.open(path) as im:
        im.verify()


def displayed_size(path):
    """(width, height) of an image file as open_image() shows it: the header's size, sides swapped
    for the EXIF orientations 5-8 (turned by 90 degrees). Read from the header, no decode.
    Raises UnreadableImage."""
    with _pil_errors(path), Image.open(path) as im:
        if im.format == "PNG" and not {"exif", "Raw profile type exif"} & set(im.info):
            exif = _png_exif(im.fp)     # PIL's getexif() would decode the pixels to reach a later eXIf chunk
        else:
            exif = im.getexif()
        return im.size[::-1] if exif.get(0x0112) in (5, 6, 7, 8) else im.size


def _png_exif(fp):
    """The EXIF of a PNG's eXIf chunk, wherever it lies (the PNG extensions allow it after the pixel
    data), found by seeking from chunk to chunk; an empty Exif if there is none."""
    exif = Image.Exif()
    fp.seek(8)                                   # after the PNG signature
    while len(head := fp.read(8)) == 8:          # chunk: length, type, data, CRC
        length, kind = int.from_bytes(head[:4], "big"), head[4:]
        if kind == b"eXIf":
            exif.load(fp.read(length))
            break
        if kind == b"IEND":
            break
        fp.seek(length + 4, 1)
    return exif


# Where a record's task shows: each task has one field no other task's records need.
TASK_FIELDS = {"probs": "cls", "boxes": "det", "instruction": "seg", "question": "vqa"}
BOX_SLACK = 1.0   # pixels a ground-truth box may reach past the image (COCO has x + w = 640.01 in 640 px)


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


def _record_problem(rec, schema, base, seen_ids):
    """What is wrong with one parsed record, or None. Cheap checks first, the image last."""
    if not isinstance(rec, dict):
        return "record is not a JSON object"
    missing = [k for k in REQUIRED[schema] if k not in rec]
    if missing:
        return "missing field(s): " + ", ".join(missing)
    if not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool):
        return f"id {rec['id']!r} is not a string or an integer"
    if rec["id"] in seen_ids:
        return f"duplicate id {rec['id']!r} (first on line {seen_ids[rec['id']]})"
    if not _nonempty_str(rec["image"]):
        return "image is not a non-empty path"
    if schema == "cls":
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
    elif schema == "det":
        if not _nonempty_str(rec["target"]):
            return "target is not a non-empty string"
        if not isinstance(rec["boxes"], list) or not rec["boxes"]:
            return "boxes is not a non-empty list of boxes"
        if len(rec["boxes"]) > 1 and not rec.get("multi"):
            return (f'{len(rec["boxes"])} boxes in a single-object record: a multi-object dataset marks '
                    'every record "multi": true (its prompt asks for a list whatever the number of boxes)')
        problems = [box_problem(b) for b in rec["boxes"] if box_problem(b)]
        if problems:
            return problems[0]
    else:
        for key in REQUIRED[schema][2:]:
            if not _nonempty_str(rec[key]):
                return f"{key} is not a non-empty string"
        if rec.get("box") is not None and box_problem(rec["box"]):
            return box_problem(rec["box"])
        if schema == "seg" and rec.get("mask") is not None:
            if not _nonempty_str(rec["mask"]):
                return "mask is not a path"
            if not (base / rec["mask"]).is_file():
                return f"mask file not found: {base / rec['mask']}"
        if schema == "seg" and rec.get("ignore_mask") is not None:     # pixels no score counts (ReasonSeg)
            if rec.get("mask") is None or not _nonempty_str(rec["ignore_mask"]):
                return "ignore_mask is not a path, or comes without a mask"
            if not (base / rec["ignore_mask"]).is_file():
                return f"ignore_mask file not found: {base / rec['ignore_mask']}"
    image = base / rec["image"]
    if not image.is_file():
        return f"image file not found: {image}"
    boxes = rec["boxes"] if schema == "det" else [rec["box"]] if rec.get("box") is not None else []
    try:
        check_image(image)
        size = displayed_size(image) if boxes or rec.get("mask") is not None else None
    except UnreadableImage as e:
        return str(e)
    outside = [b for b in boxes if b[2] > size[0] + BOX_SLACK or b[3] > size[1] + BOX_SLACK]
    if outside:      # evaluation would score every answer 0 on it
        return (f"box {outside[0]!r} reaches past the {size[0]}x{size[1]} image {image} (its size as "
                "displayed, EXIF orientation applied)")
    if schema == "seg" and rec.get("mask") is not None:
        return _mask_problem(base / rec["mask"], size) or (
            _mask_problem(base / rec["ignore_mask"], size, empty_ok=True) if rec.get("ignore_mask") else None)
    return None


def _mask_problem(mask_path, size, empty_ok=False):
    """An unreadable or (unless empty_ok) empty mask, or one whose size is not `size`, the image's
    (width, height) as displayed; else None."""
    try:
        mask = read_mask(mask_path)
    except Exception as e:     # PIL raises many types for broken files
        return f"unreadable mask {mask_path}: {type(e).__name__}: {e}"
    if not mask.any() and not empty_ok:
        return f"mask {mask_path} is empty (no non-zero pixel): there is no object to segment"
    if mask.shape[::-1] != tuple(size):
        return f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but the image is {size[0]}x{size[1]}"
    return None


def read_manifest(path, schema, skip_bad=False):
    """Read and validate a manifest. Returns (records, n_skipped).

    schema: "cls" | "det" | "seg" | "vqa" (manifest_task() tells it from the records). Each record
    comes back with its original fields plus "image_path" (absolute) and, for a segmentation record
    with a mask, "mask_path" (and "ignore_mask_path" with an ignore mask). A bad record raises
    ManifestError naming file:line, or, with
    skip_bad=True, is skipped with a warning on stderr and counted. Bad: a missing or malformed
    field, a box past the image (its size as displayed, BOX_SLACK pixels allowed), an image PIL
    cannot identify or whose header is broken, a decompression bomb (check_image). An image that
    fails only when decoded is a sample that cannot be processed: open_image raises UnreadableImage
    and the pipelines' pre-scan (run.usable) skips and counts it. Blank lines are not records.
    Raises NoRecordsError when no record is left (an empty manifest, or every record skipped).
    """
    if schema not in REQUIRED:
        raise ValueError(f"schema must be one of {sorted(REQUIRED)}, not {schema!r}")
    path = Path(path)
    base = path.parent.resolve()
    records, seen_ids, n_skipped, first_bad = [], {}, 0, None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                why = _record_problem(rec, schema, base, seen_ids)
            except json.JSONDecodeError as e:
                why = f"invalid JSON ({e.msg}, column {e.colno})"
            if why is not None:
                if not skip_bad:
                    raise ManifestError(path, lineno, why)
                print(f"warning: skipped {path}:{lineno}: {why}", file=sys.stderr)
                n_skipped += 1
                first_bad = first_bad or f"{path}:{lineno}: {why}"
                continue
            seen_ids[rec["id"]] = lineno
            rec = dict(rec, image_path=str(base / rec["image"]))
            if schema == "seg" and rec.get("mask") is not None:
                rec["mask_path"] = str(base / rec["mask"])
            if schema == "seg" and rec.get("ignore_mask") is not None:
                rec["ignore_mask_path"] = str(base / rec["ignore_mask"])
            records.append(rec)
    if not records:
        raise NoRecordsError(path, f"all {n_skipped} record(s) are bad (the first: {first_bad})" if n_skipped
                             else "the file holds no record (it is empty or has blank lines only)")
    if n_skipped:
        print(f"warning: {path}: skipped {n_skipped} bad record(s), kept {len(records)}",
              file=sys.stderr)
    return records, n_skipped


def manifest_task(path, allowed=tuple(REQUIRED)):
    """The task of a manifest, its read_manifest schema: "cls", "det", "seg" or "vqa".

    Told by the records' fields (TASK_FIELDS: "probs", "boxes", "instruction", "question"), never by
    the first line alone. Blank lines, lines that are not JSON objects and records with none or
    several of these fields decide nothing (read_manifest says what is wrong with them). Raises
    ManifestError naming file:line for a record of another task than the first record that decides,
    or for a task not in `allowed` (the tasks the calling script takes); NoRecordsError when no
    record tells the task."""
    path, task, first, n_records = Path(path), None, None, 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            n_records += 1
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            fields = [k for k in TASK_FIELDS if isinstance(rec, dict) and k in rec]
            if len(fields) != 1:
                continue
            if task is None:
                task, first = TASK_FIELDS[fields[0]], lineno
            elif TASK_FIELDS[fields[0]] != task:
                raise ManifestError(path, lineno, f'a {TASK_FIELDS[fields[0]]} record (field "{fields[0]}") in a '
                                                  f"{task} manifest (line {first}): a manifest holds one task")
    if task is None:
        raise NoRecordsError(path, "no record has one of the fields that tell the task ("
                             + ", ".join(f'"{k}": {t}' for k, t in TASK_FIELDS.items()) + ")" if n_records
                             else "the file holds no record (it is empty or has blank lines only)")
    if task not in allowed:
        raise ManifestError(path, first, f"a {task} manifest, but this takes {' or '.join(allowed)} manifests")
    return task


def write_jsonl(path, records):
    """Write records one per line, fields in their given order, UTF-8 kept as is. Atomic: written to
    a temporary file that then replaces `path`, so a kill leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def is_shapes(records):
    """True for shapes-world records (make_shapes_world writes each scene into its record): the data that
    picks the demo's own prompt wording and scorer, never the model."""
    return bool(records) and all("scene" in r for r in records)


def open_image(path_or_image):
    """An image as the model should see it: an RGB PIL image in its displayed orientation.

    The EXIF Orientation tag is applied (cameras store a portrait photo as a landscape pixel
    array plus that tag, and annotation tools show and annotate the rotated image), and any
    transparency (an alpha band, or a palette / grey / RGB transparency key) is composited on
    white, as the Qwen2-VL processor does (transformers' convert_to_rgb); a plain
    convert("RGB") would drop alpha and with it a drawing on a transparent background.
    Grey images of more than 8 bits are scaled to 8 bits (eight_bit_grey; convert("RGB") clips
    them to 255: a 16-bit scan would be almost all white).
    Accepts a path or a PIL image (not modified). Raises UnreadableImage (an OSError) for a
    missing, unreadable or truncated file and a decompression bomb (check_image's rule)."""
    if isinstance(path_or_image, Image.Image):
        with _pil_errors(getattr(path_or_image, "filename", "") or "(PIL image)"):
            image, png = ImageOps.exif_transpose(path_or_image), path_or_image.format == "PNG"   # a copy
    else:
        with _pil_errors(path_or_image), Image.open(path_or_image) as im:
            image, png = ImageOps.exif_transpose(im), im.format == "PNG"     # loads, then copies
    image = eight_bit_grey(image, sixteen_bit=png)        # a PNG holds at most 16 bits per sample
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def eight_bit_grey(image, sixteen_bit=False):
    """A grey image of more than 8 bits as the 8-bit "L" image it shows; any other image unchanged.

    Unsigned 16-bit ("I;16", "I;16B", ...: 16-bit PNG and TIFF; "I" with sixteen_bit=True: Pillow
    before 10.3 opens 16-bit PNGs as "I"): round(v / 257), the full range 0..65535 onto 0..255
    (65535 -> 255, 257 k -> k). Other 32-bit integer "I" and float "F" images (TIFF) have no
    fixed full range: the image's own finite minimum..maximum maps linearly onto 0..255,
    round((v - min) * 255 / (max - min)), non-finite values count as the minimum, and a constant
    image keeps its value, clipped to 0..255. A grey transparency key (PNG tRNS) becomes the alpha
    band of an "LA" image. Rounding: numpy's (half to even)."""
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (sixteen_bit and image.mode == "I"):
        grey = np.round(values / 257)
    else:
        finite = np.isfinite(values)
        lo, hi = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 0.0)
        values = np.where(finite, values, lo)
        grey = np.round((values - lo) * 255 / (hi - lo)) if hi > lo else np.clip(np.round(values), 0, 255)
    out = Image.fromarray(grey.astype(np.uint8))
    key = image.info.get("transparency")
    if isinstance(key, (int, float)):
        out = Image.merge("LA", (out, Image.fromarray((np.asarray(image) != key).astype(np.uint8) * 255)))
    return out


MAX_ASPECT = 100       # Qwen2-VL's smart_resize refuses an aspect ratio above 200; stay well inside


def fit_image(image, max_aspect=MAX_ASPECT):
    """A crop the Qwen2-VL / Qwen2.5-VL processor can always take, showing the same pixels.

    A side shorter than long side / max_aspect is padded with white, the crop centred (a 4x1600
    crop becomes 16x1600, which the processor takes; at 4x1600 it raises "absolute aspect ratio
    must be smaller than 200"). A crop that already fits is returned unchanged; small crops need
    nothing (smart_resize enlarges them to min_pixels). For crops only: padding a full image
    would move the coordinate frame its boxes are written in."""
    w, h = image.size
    W, H = max(w, math.ceil(h / max_aspect)), max(h, math.ceil(w / max_aspect))
    if (W, H) == (w, h):
        return image
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    canvas.paste(image.convert("RGB"), ((W - w) // 2, (H - h) // 2))
    return canvas


def read_mask(path):
    """A ground-truth mask file -> HxW bool array: every non-zero pixel is the object.

    Public datasets save masks in many encodings; all read the same: 0/1 or 0/255 grayscale
    ("L", "1", 16-bit "I;16"/"I"), palette ("P": a non-zero palette index, i.e. any label but the
    background index 0), RGB (any non-zero channel), and with an alpha band (a non-zero colour that
    is not fully transparent). A threshold such as `> 127` would read a 0/1 mask as empty.
    Raises what PIL raises for a missing or unreadable file."""
    with Image.open(path) as im:
        im.load()
        if im.mode == "P":
            return np.asarray(im) != 0
        bands = np.asarray(im)
        if bands.ndim == 2:                                     # one band: 1, L, I;16, I, F
            return bands != 0
        colour, alpha = (bands[..., :-1], bands[..., -1]) if "A" in im.getbands() else (bands, None)
        mask = (colour != 0).any(axis=-1)
        return mask & (alpha != 0) if alpha is not None else mask


def mask_box(mask):
    """Tight half-open box [x1, y1, x2, y2] of a boolean mask (columns x1..x2-1, rows
    y1..y2-1, as shapes-world boxes), or None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


# ============================================================================ 3. shapes world
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


# Each generator returns (scene, its schema's fields in record order, mask array or None).
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
    return scene, {"target": PLURAL[kind], "boxes": boxes, "multi": True}, None


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
MANIFEST_SCHEMA = {"soft_cls": "cls", "onehot_cls": "cls", "det": "det", "multi_det": "det",
                   "seg": "seg", "vqa": "vqa"}   # the read_manifest schema of each shapes task


def make_shapes_world(out, n_train=64, n_test=32, seed=0, n_val=None):
    """Write OUT/<task>/{train,val,test}.jsonl, images/ (and masks/ for seg) for every task; n_val
    (default n_test) validation scenes to choose recipes on, so that the test split is only reported.

    Deterministic: the same arguments give byte-identical files, each split from its own random
    stream (the train and test files do not depend on n_val). Returns {task: {split: manifest path}}.
    """
    out, paths = Path(out), {}
    for task in SHAPE_TASKS:
        folder = out / task
        (folder / "images").mkdir(parents=True, exist_ok=True)
        if task == "seg":
            (folder / "masks").mkdir(exist_ok=True)
        paths[task] = {}
        for split, n in (("train", n_train), ("val", n_test if n_val is None else n_val), ("test", n_test)):
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


# ---------------------------------------------------------------- scene descriptions (the CoTs)
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


def where_phrase(box):
    """position_word() as a phrase: "at the top-left", "in the centre", "on the left"."""
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
        parts = [f"a {_noun(s, with_names)} {where_phrase(s['box'])}" for s in shapes]
        listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        opener = _pick(rng, ["The image shows {}.", "There is {}.", "I can see {}.",
                             "On a grey background there is {}."])
        return opener.format(listing)
    others = [s for s in scene if s != target]
    name = _noun(target, with_names)
    sentences = [_pick(rng, ["The {n} is {w} of the image.", "The {n} sits {w}.",
                             "You can find the {n} {w}."]).format(n=name, w=where_phrase(target["box"]))]
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
                f"a {_noun(s, with_names)} {where_phrase(s['box'])}" for s in rest) + ".")
    return " ".join(sentences)


# ============================================================================ 4. command line
def main(argv=None):
    parser = argparse.ArgumentParser(description="Data sets for the RISE / VisRL pipelines.")
    sub = parser.add_subparsers(dest="command", required=True)   # converters: convert.py
    shapes = sub.add_parser("shapes", help="write the synthetic shapes world")
    shapes.add_argument("--out", required=True, help="output folder")
    shapes.add_argument("--n-train", type=int, default=64, help="training images per task")
    shapes.add_argument("--n-test", type=int, default=32, help="test images per task")
    shapes.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "shapes":
        if min(args.n_train, args.n_test, args.seed) < 0:
            parser.error("--n-train, --n-test and --seed must be >= 0")
        paths = make_shapes_world(args.out, args.n_train, args.n_test, args.seed)
        for task, splits in paths.items():
            print(f"{task:>10}: {splits['train']}, {splits['test']}")


if __name__ == "__main__":
    main()
