"""The test suite: every test runs offline on CPU, on models the tests build themselves (or the shipped tiny base).

    python -m pytest -q test_all.py                    # everything
    python -m pytest -q -m "not slow" test_all.py      # the fast loop

Expected values are independent of the code under test: worked out by hand in the comments, computed by
scipy / pycocotools / transformers / TRL on the same inputs, or a sample run alone vs in a batch.

The file reads top to bottom: the shared helpers and the fixtures, then one section per part of the project,
fast to slow. Tests marked slow launch the scripts, train a model or run the full-width architectures:
  the losses (grpo.py, dpo.py); rewards and metrics (rewards.py); data.py; convert.py; the papers' prompts on
  real data; vlm.py on the tiny model; the pipelines' pieces in-process; the shipped tiny base; the losses
  driving the tiny VLM; runs of the scripts on one and two CPU ranks (kill, resume, faults).
"""
import argparse
import ast
import contextlib
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image, PngImagePlugin
from pytest import approx
from pycocotools import mask as coco_api
from safetensors.torch import load_file as safetensors_load
import bench
import convert
import data
import dpo
import rewards
import rewards as R
import rise_cot
import rise_r1
import run
import seg_rise as S
import tables
import tiny as tiny_py     # the fixture `tiny` is the loaded tiny model
import visrl
import vlm
from dpo import dpo_loss, sequence_logp, step_dpo_loss
from grpo import group_advantages, grpo_loss, zero_std_fraction


# ====================================================================================================
# shared helpers and constants
# ====================================================================================================

ROOT = Path(__file__).resolve().parent


LN2 = math.log(2.0)
# pycocotools' C extension warns under numpy 2 (its __array__ has no copy keyword): ignored where it runs
PYCOCOTOOLS_NUMPY2 = "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"


def solid(rgb, size=56):
    return Image.new("RGB", (size, size), rgb)


SHIPPED_BASE = ROOT / vlm.TINY_BASE


def t(x, grad=False):
    return torch.tensor(x, dtype=torch.float32, requires_grad=grad)


GT_CLS = {"red": 0.5, "blue": 0.5}


def to_tensor(img):
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


floats = st.floats(allow_nan=True, allow_infinity=True) | st.floats(-1e6, 1e6)


N_TRAIN, N_TEST = 10, 5


def _hashes(root):
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _records(world, task, split="train"):
    recs, skipped = data.read_manifest(world / task / f"{split}.jsonl", data.MANIFEST_SCHEMA[task])
    assert skipped == 0
    return recs


def _write(folder, lines, name="m.jsonl"):
    path = folder / name
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


MASK_ENCODINGS = {   # the same object (a 4x6 block and one pixel) saved as public datasets save masks
    "L 0/1": lambda m: Image.fromarray(m.astype(np.uint8)),
    "L 0/255": lambda m: Image.fromarray(m.astype(np.uint8) * 255),
    "1 bit": lambda m: Image.fromarray(m.astype(np.uint8) * 255).convert("1"),
    "I;16 0/1": lambda m: Image.fromarray(m.astype(np.uint16)),
    "palette index 1 (VOC style)": lambda m: _palette(m.astype(np.uint8)),
    "RGB dark blue": lambda m: Image.fromarray(np.stack([np.zeros_like(m), np.zeros_like(m), m * 7], -1).astype(np.uint8)),
    "RGBA white on transparent": lambda m: Image.fromarray(np.dstack([m * 255] * 4).astype(np.uint8), "RGBA"),
}


def _palette(index):
    im = Image.fromarray(index, "P")
    im.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)     # VOC: 0 background (black), 1 dark red
    return im


def _image(path, size=(8, 8), value=128):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)   # format from the suffix
    return path


def _ids(path):
    return [json.loads(line)["id"] for line in Path(path).read_text().splitlines()]


EMO_HEADER = ("[image_filename]\t[valence]\t[arousal]\t[prob. anger]\t[prob. disgust]\t"
              "[prob. fear]\t[prob. joy]\t[prob. sadness]\t[prob. surprise]\t[prob. neutral]")


ODD = [0.4, 0.1, 0.1, 0.2, 0.095, 0.05, 0.05]          # sums to 0.995: renormalised


def _emotion6(root, extra_lines=()):
    lines = [EMO_HEADER]
    for k, emotion in enumerate(convert.EMOTION6_CLASSES):
        for n in range(1, 11):
            _image(root / "images" / emotion / f"{n}.jpg")
            probs = ODD if (emotion, n) == ("joy", 3) else [float(i == k) for i in range(7)]
            lines.append("\t".join([f"{emotion}/{n}.jpg", "5.5", "4.25", *map(str, probs)]))
    (root / "ground_truth.txt").write_text("\n".join([*lines, *extra_lines]) + "\n")
    return root


def _rect(x1, y1, x2, y2, label="target"):
    return {"label": label, "points": [[x1, y1], [x2, y1], [x2, y2], [x1, y2]],
            "shape_type": "polygon"}


def _reasonseg(src):
    _image(src / "a.jpg", (64, 48))
    # target: columns 10..30, rows 10..20 (points truncated, boundary included); a smaller
    # "ignore" shape drawn after it carves out columns 26..30.
    a = {"text": ["what holds the soup?", "the bowl"], "is_sentence": True,
         "shapes": [_rect(10.7, 10.2, 30.9, 20.5), _rect(26, 8, 35, 22, "ignore")]}
    _image(src / "b.jpg", (64, 48))
    # two targets -> one box around both; a larger ignore shape is drawn first, so the targets
    # win over it; a "flag" shape is dropped.
    b = {"text": ["the two cups"], "is_sentence": False,
         "shapes": [_rect(0, 0, 20, 20, "ignore"), _rect(5, 5, 9, 9), _rect(40, 30, 50, 40),
                    _rect(0, 0, 63, 47, "flag")]}
    for name, ann in (("a", a), ("b", b)):
        (src / f"{name}.json").write_text(json.dumps(ann))
    expected = {"a": np.zeros((48, 64), bool), "b": np.zeros((48, 64), bool)}
    expected["a"][10:21, 10:26] = True
    expected["b"][5:10, 5:10] = True
    expected["b"][30:41, 40:51] = True
    return expected


CATS = {1: "cat", 2: "dog", 3: "traffic light"}


def _coco(root, bad_annotation=False):
    """20 images; cat in images 1-16 (two boxes in image 1), dog in 5-20 plus a crowd region
    in image 1, traffic light in 1-10. Returns the JSON path and {(image, cat): boxes}."""
    images, anns, expected = [], [], {}

    def add(image_id, cat, bbox, crowd=0):
        anns.append({"id": 100 + len(anns), "image_id": image_id, "category_id": cat,
                     "bbox": bbox, "iscrowd": crowd, "area": 1.0})
        if not crowd:
            x, y, w, h = bbox
            expected.setdefault((image_id, cat), []).append([x, y, x + w, y + h])

    for i in range(1, 21):
        name = f"{i:012d}.jpg"
        _image(root / "images" / name, (40, 30))
        images.append({"id": i, "file_name": name, "width": 40, "height": 30})
        if i <= 16:
            add(i, 1, [1.5, 2.25, 10, 5])
        if i >= 5:
            add(i, 2, [i, 1, 20, 20.5])
        if i <= 10:
            add(i, 3, [30, 20, 4, 6])
    add(1, 1, [20, 10, 3, 3])
    add(1, 2, [0, 0, 40, 30], crowd=1)
    if bad_annotation:
        anns.append({"id": 999, "image_id": 2, "category_id": 1, "bbox": [5, 5, 0, 4],
                     "iscrowd": 0})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": k, "name": v, "supercategory": "x"} for k, v in CATS.items()]}))
    return path, expected


def _blob_mask(h, w, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    m = np.zeros((h, w), bool)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, max(2, min(h, w) / 3))
        m ^= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    return m


def _runs(mask):
    """Uncompressed COCO RLE counts, computed directly: column-major runs, zeros first."""
    flat = mask.T.ravel().astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0] + runs if flat[0] else runs


def _refcoco(root, refs=None):
    img_dir = root / "train2014"
    _image(img_dir / "COCO_train2014_000000000001.jpg", (50, 40))
    _image(img_dir / "COCO_train2014_000000000002.jpg", (60, 45))
    poly = [[5.5, 4.0, 30.2, 6.0, 25.0, 30.7, 8.0, 25.0], [40, 30, 48, 30, 44, 38]]
    blob = _blob_mask(45, 60, 7)
    rle = coco_api.encode(np.asfortranarray(blob.astype(np.uint8)))
    anns = [{"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [5.5, 4, 42.5, 34],
             "segmentation": poly},
            {"id": 11, "image_id": 2, "category_id": 1, "iscrowd": 0, "bbox": [1, 2, 50, 40],
             "segmentation": {"size": [45, 60], "counts": rle["counts"].decode()}},
            {"id": 12, "image_id": 2, "category_id": 1, "iscrowd": 1, "bbox": [3, 3, 9, 9],
             "segmentation": {"size": [45, 60], "counts": _runs(~blob)}}]
    images = [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 50, "height": 40},
              {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 60, "height": 45}]
    inst = root / "refcoco" / "instances.json"
    inst.parent.mkdir(parents=True)
    inst.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "person"}]}))
    sents = lambda *s: [{"sent": x, "raw": x, "tokens": x.split(), "sent_id": i}   # noqa: E731
                        for i, x in enumerate(s)]
    refs = refs if refs is not None else [
        {"ref_id": 100, "ann_id": 10, "image_id": 1, "split": "val", "category_id": 1,
         "file_name": "COCO_train2014_000000000001_10.jpg", "sent_ids": [0, 1],
         "sentences": sents("man on the left", "left guy")},
        {"ref_id": 101, "ann_id": 11, "image_id": 2, "split": "val", "category_id": 1,
         "file_name": "x", "sentences": sents("blobs")},
        {"ref_id": 102, "ann_id": 12, "image_id": 2, "split": "val", "category_id": 1,
         "file_name": "x", "sentences": sents("the background")},
        {"ref_id": 103, "ann_id": 10, "image_id": 1, "split": "train", "category_id": 1,
         "file_name": "x", "sentences": sents("a man")}]
    refs_path = root / "refcoco" / "refs(unc).p"
    with open(refs_path, "wb") as f:
        pickle.dump(refs, f, protocol=2)                  # as the Python 2 originals
    polys = coco_api.decode(coco_api.merge(coco_api.frPyObjects(poly, 40, 50))).astype(bool)
    return refs_path, inst, img_dir, {10: polys, 11: blob, 12: ~blob}


PROMPT = (" Please provide the bounding box coordinate of the region that can help you answer "
          "the question better.")


def _turns(question, box, answer):
    return [{"from": "human", "value": "<image>\n" + question + PROMPT},
            {"from": "gpt", "value": box}, {"from": "human", "value": "<image>"},
            {"from": "gpt", "value": answer}]


def _viscot(root):
    _image(root / "cot" / "gqa" / "wide.jpg", (200, 100))
    _image(root / "cot" / "gqa" / "tall.jpg", (100, 200))
    _image(root / "flat" / "c.png", (64, 64))
    items = [
        {"question_id": 0, "dataset": "gqa", "image": [
            "cot/gqa/wide.jpg", "cot/gqa/wide.jpg###[21, 31, 99, 69]"],
         "conversations": _turns("What is on the table?", "[0.100, 0.400, 0.500, 0.600]", "A cup")},
        {"question_id": 1, "image": "cot/gqa/wide.jpg",
         "conversations": _turns("Which colour is the car?", "[0.100, 0.400, 0.500, 0.600]",
                                 "red")},
        {"question_id": 2, "image": ["cot/gqa/tall.jpg"],
         "conversations": _turns("Who is there?", "[0.35, 0.1, 0.6, 0.5]", "a man")},
        {"id": "flat-3", "image": "flat/c.png", "question": "What shape?", "answer": "round",
         "bbox": [1, 2, 30, 40]},
        {"id": "flat-4", "image": "flat/c.png", "question": "What colour?", "answer": "grey"},
    ]
    path = root / "viscot_363k.json"
    path.write_text(json.dumps(items))
    return path, items


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def lines(path):
    """Complete lines of a file another process is appending to (read only: never truncates it)."""
    return path.read_text().count("\n") if path.exists() else 0


class StubClip(torch.nn.Module):
    """encode_image: the mean (red, green) of the crop; encode_text: a fixed direction. Counts calls."""

    def __init__(self, direction):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.direction = torch.tensor(direction, dtype=torch.float32)
        self.image_calls = self.text_calls = 0
        self.batch_sizes = []

    def encode_image(self, x):
        self.image_calls += 1
        self.batch_sizes.append(len(x))
        return x[:, :2].mean((2, 3))

    def encode_text(self, tokens):
        self.text_calls += 1
        return self.direction.expand(len(tokens), -1).clone()


def seg_stub_preprocess(im):   # nearest-neighbour: a half/half crop stays exactly half/half
    a = np.asarray(im.convert("RGB").resize((10, 10), Image.NEAREST), dtype=np.float32) / 255
    return torch.from_numpy(a).permute(2, 0, 1)


def red_green(w=200, h=100):
    a = np.zeros((h, w, 3), np.uint8)
    a[:, :w // 2, 0] = 255     # left half red
    a[:, w // 2:, 1] = 255     # right half green
    return Image.fromarray(a)


def square(h, w, y1, x1, y2, x2):
    m = np.zeros((h, w), bool)
    m[y1:y2, x1:x2] = True
    return m


def make_pair(image_path, chosen_box, rejected_box):
    return {"id": "p", "question": "What colour is the shape in the top-left?", "answer": "red", "image": image_path,
            "size": [112, 112], "shapes": True, "chosen": {"box": chosen_box, "answer": "red", "s_b": 1.0, "s_r": 1.0},
            "rejected": {"box": rejected_box, "answer": "blue", "s_b": 0.0, "s_r": 0.0}}


# ====================================================================================================
# fixtures
# ====================================================================================================

@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A private cache (RISE_CACHE) so nothing is read from or written to the user's."""
    path = tmp_path_factory.mktemp("cache")
    vlm.CACHE = path
    return path


@pytest.fixture(scope="session")
def tiny_dir(cache, tmp_path_factory):
    """A random (not pretrained) tiny model, built by the tests themselves: nothing downloaded."""
    return tiny_py.build_tiny(tmp_path_factory.mktemp("models") / "tiny", seed=0, plan=(), pixels=None)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    model, processor = vlm.load_model(tiny_dir)
    return model, processor


@pytest.fixture(scope="session")
def clip_dir(cache, tmp_path_factory):
    """A shapes CLIP trained for 2 steps: the real build path, in seconds (its scores mean nothing)."""
    return tiny_py.build_shapes_clip(tmp_path_factory.mktemp("clip") / "shapes-clip", seed=0, steps=2,
                                     batch_size=16, n_scenes=12, log=lambda *a: None)


def small_world(tmp_path_factory, name, n_train, seed):
    """A shapes world of n_train training and 4 test scenes per dataset, in a folder of its own."""
    root = tmp_path_factory.mktemp(name)
    data.make_shapes_world(root, n_train=n_train, n_test=4, seed=seed)
    return root


@pytest.fixture(scope="session")
def seg_world(tmp_path_factory):
    return small_world(tmp_path_factory, "seg_world", 4, 0)


@pytest.fixture(scope="session")
def real_arch(tiny_dir, tmp_path_factory):
    """Random-weight Qwen2-VL-2B / Qwen2.5-VL-3B architectures (published configs, 2 blocks, widths and
    head counts / 2 for CPU speed, head_dim and query heads per KV head kept), with the tiny tokenizer:
    nothing downloaded."""
    root = tmp_path_factory.mktemp("real_arch")
    return {family: tiny_py.build_real_arch(root / family, family, tiny_dir, layers=2, narrow=2)
            for family in ("qwen2_vl", "qwen2_5_vl")}


@pytest.fixture(scope="module")
def tiny_clip():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32, vision_cfg=dict(image_size=32, layers=1, width=64, patch_size=8, head_width=32),
        text_cfg=dict(context_length=16, vocab_size=64, width=32, heads=2, layers=1)).eval()

    def tokenizer(texts):  # char-level: ids 1..62, padded with 0; 63 = end of text (argmax pool)
        rows = [[1 + ord(c) % 62 for c in t[:15]] + [63] for t in texts]
        return torch.tensor([r + [0] * (16 - len(r)) for r in rows])

    preprocess = lambda im: to_tensor(im.resize((32, 32)))
    return model, preprocess, tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    data.make_shapes_world(out, n_train=N_TRAIN, n_test=N_TEST, seed=0)
    return out


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (50, 50), (9, 9, 9)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_text("this is not a picture")
    Image.new("L", (50, 50), 0).save(tmp_path / "empty_mask.png")          # no object pixel at all
    small = np.zeros((10, 10), np.uint8)
    small[2:5, 2:5] = 1
    Image.fromarray(small).save(tmp_path / "small_mask.png")               # 10x10 mask for a 50x50 image
    return tmp_path


@pytest.fixture(scope="module")
def rise_world(tmp_path_factory):
    return small_world(tmp_path_factory, "rise_world", 6, 3)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return small_world(tmp_path_factory, "shapes", 6, 0)


@pytest.fixture(scope="module")
def visrl_tiny(tiny_dir):
    model, processor = vlm.load_model(tiny_dir)
    return tiny_dir, model.eval(), processor


# ====================================================================================================
# the losses: grpo.py and dpo.py (torch only, hand-computed values)
# ====================================================================================================

def close(a, b, tol=1e-5):
    a, b = (x.detach() if torch.is_tensor(x) else x for x in (a, b))
    return abs(float(a) - float(b)) < tol


def _two_by_three():
    """The 2x3 hand example. old_logp = 0, so logp = log(rho) and the ratios are explicit.
    row 0: A = +1, rho = [1.0, 1.5, 0.5], mask [1,1,1]
    row 1: A = -1, rho = [1.1, 0.5, pad], mask [1,1,0]   (pad holds NaN: must be ignored)
    """
    logp = t([[0.0, math.log(1.5), math.log(0.5)],
              [math.log(1.1), math.log(0.5), float("nan")]], grad=True)
    old = torch.zeros(2, 3)
    adv = t([1.0, -1.0])
    mask = t([[1, 1, 1], [1, 1, 0]])
    return logp, old, adv, mask


def _single_token_grad(rho, adv):
    logp = t([[math.log(rho)]], grad=True)
    loss, stats = grpo_loss(logp, torch.zeros(1, 1), None, t([adv]), torch.ones(1, 1), beta=0.0)
    loss.backward()
    return logp.grad.item(), stats


finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


def test_group_advantages_two_groups_of_four():
    # group 1 = [1,0,0,1]: mean 0.5, deviations +-0.5,
    #   unbiased var = (4 * 0.25) / (4 - 1) = 1/3, std = sqrt(1/3) = 0.57735
    #   A = +-0.5 / (0.57735 + 1e-4) = +-0.86588   (population std 0.5 would give +-0.9998)
    # group 2 = [2,2,2,2]: every deviation is 0 -> A = 0 / (0 + 1e-4) = 0
    a = group_advantages(t([1, 0, 0, 1, 2, 2, 2, 2]), group_size=4)
    g1 = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(a, t([g1, -g1, -g1, g1, 0, 0, 0, 0]), atol=1e-6)
    assert close(g1, 0.86588, 1e-5)


def test_group_advantages_pairs_and_triples():
    # G=2, [0,1 | 3,1]: group [0,1]: mean .5, unbiased std = sqrt((.25+.25)/1) = 0.70711
    #   A = -+0.5/(0.70711+1e-4) = -+0.70701 ; group [3,1]: mean 2, std = sqrt((1+1)/1) = 1.41421
    #   A = +-1/(1.41421+1e-4) = +-0.70706
    a = group_advantages(t([0, 1, 3, 1]), group_size=2)
    p, q = 0.5 / (math.sqrt(0.5) + 1e-4), 1 / (math.sqrt(2) + 1e-4)
    assert torch.allclose(a, t([-p, p, q, -q]), atol=1e-6)
    # G=3, [0,1,2]: mean 1, unbiased var = (1+0+1)/2 = 1 -> A = [-1, 0, 1] / 1.0001
    a = group_advantages(t([0, 1, 2]), group_size=3)
    assert torch.allclose(a, t([-1 / 1.0001, 0, 1 / 1.0001]), atol=1e-6)


def test_group_advantages_unscaled():
    # scale=False: r - mean. [1,0,0,1] -> [.5,-.5,-.5,.5]; [2,2,2,2] -> 0; [0,4] -> [-2,2]
    a = group_advantages(t([1, 0, 0, 1, 2, 2, 2, 2]), group_size=4, scale=False)
    assert torch.allclose(a, t([.5, -.5, -.5, .5, 0, 0, 0, 0]))
    assert torch.allclose(group_advantages(t([0, 4]), 2, scale=False), t([-2, 2]))


def test_group_advantages_bad_input_and_dtype():
    with pytest.raises(ValueError):
        group_advantages(t([1, 2, 3]), group_size=2)
    with pytest.raises(ValueError):
        group_advantages(t([1, 2]), group_size=1)
    a = group_advantages(torch.tensor([0, 1], dtype=torch.bfloat16), 2)
    assert a.dtype == torch.float32


def test_zero_std_fraction():
    # groups [1,0,0,1] (varies) and [2,2,2,2] (constant) -> 1 of 2 = 0.5
    assert zero_std_fraction(t([1, 0, 0, 1, 2, 2, 2, 2]), 4) == 0.5
    # [.3,.3,.3] constant, [0,0,1] varies, [1,1,1] constant -> 2 of 3
    assert close(zero_std_fraction(t([.3, .3, .3, 0, 0, 1, 1, 1, 1]), 3), 2 / 3)
    assert zero_std_fraction(t([0, 1, 2, 3]), 2) == 0.0


def test_grpo_loss_hand_example_all_norms():
    # eps = 0.2 -> clip range [0.8, 1.2]; beta = 0 (no KL).
    # row 0 (A=+1): min(1*1, 1*1) = 1 ; min(1.5, 1.2) = 1.2 (high clip) ; min(0.5, 0.8) = 0.5
    #               sum 2.7 over 3 tokens
    # row 1 (A=-1): min(-1.1, -1.1) = -1.1 ; min(-0.5, -0.8) = -0.8 (low clip) ; pad ignored
    #               sum -1.9 over 2 tokens
    # seq   : (2.7/3 + -1.9/2)/2 = (0.9 - 0.95)/2 = -0.025  -> loss  0.025
    # token : (2.7 - 1.9)/5 = 0.16                          -> loss -0.16
    # fixed : 0.8/(2*3) = 0.13333 -> loss -0.13333 ; max_len=4: 0.8/(2*4) = 0.1 -> loss -0.1
    expected = {"seq": 0.025, "token": -0.16, "fixed": -0.8 / 6}
    for norm, want in expected.items():
        logp, old, adv, mask = _two_by_three()
        loss, stats = grpo_loss(logp, old, None, adv, mask, beta=0.0, norm=norm)
        assert close(loss, want), (norm, loss.item(), want)
        loss.backward()
        assert torch.isfinite(logp.grad).all() and logp.grad[1, 2] == 0
    logp, old, adv, mask = _two_by_three()
    loss, stats = grpo_loss(logp, old, None, adv, mask, beta=0.0, norm="fixed", max_len=4)
    assert close(loss, -0.1)
    # stats: clipped tokens = row0 t1 (high) and row1 t1 (low) -> 2/5 valid tokens = 0.4
    # ratio_mean = (1 + 1.5 + 0.5 + 1.1 + 0.5)/5 = 4.6/5 = 0.92 ; kl = 0 (beta = 0)
    assert close(stats["clip_fraction"], 0.4)
    assert close(stats["low_clip_fraction"], 0.2) and close(stats["high_clip_fraction"], 0.2)
    assert close(stats["ratio_mean"], 0.92)
    assert stats["kl"] == 0.0 and stats["num_tokens"] == 5
    assert all(isinstance(v, float) for v in stats.values())


def test_grpo_loss_with_kl_by_hand():
    # One row, 3 tokens, rho = 1 everywhere, A = 0.5 -> surrogate 0.5 per token.
    # x = ref - logp = [0, ln2, -ln2]; k3 = e^x - x - 1:
    #   x=0: 1-0-1 = 0 ; x=ln2: 2 - 0.693147 - 1 = 0.306853 ; x=-ln2: 0.5 + 0.693147 - 1 = 0.193147
    #   sum = 0.5 exactly, mean = 1/6
    # beta = 0.1: objective = 0.5 - 0.1 * 1/6 = 0.483333 -> loss -0.483333 (one full row:
    # seq, token and fixed agree)
    logp = t([[-1.0, -2.0, -0.5]])
    ref = logp + t([[0.0, LN2, -LN2]])
    for norm in ("seq", "token", "fixed"):
        loss, stats = grpo_loss(logp, logp, ref, t([0.5]), torch.ones(1, 3), beta=0.1, norm=norm)
        assert close(loss, -(0.5 - 0.1 / 6)), norm
        assert close(stats["kl"], 1 / 6)
        assert stats["clip_fraction"] == 0.0 and close(stats["ratio_mean"], 1.0)


def test_grpo_loss_normalisations_length_bias():
    # row 0: A=+1, 1 valid token ; row 1: A=-1, 3 valid tokens ; T=4 ; rho=1 -> term = A per token
    # seq  : (1/1 + -3/3)/2 = 0          -> loss 0     ; dL/dlogp: row0 -1/(2*1) = -0.5,
    #        row1 +1/(2*3) = +0.1667 each: the long wrong answer's tokens are penalised less
    # token: (1 - 3)/4 = -0.5            -> loss 0.5   ; every token's grad magnitude 1/4
    # fixed: (1 - 3)/(2*4) = -0.25       -> loss 0.25  ; every token's grad magnitude 1/8
    mask = t([[1, 0, 0, 0], [1, 1, 1, 0]])
    adv = t([1.0, -1.0])
    cases = {"seq": (0.0, -0.5, 1 / 6), "token": (0.5, -0.25, 0.25), "fixed": (0.25, -0.125, 0.125)}
    for norm, (want, g0, g1) in cases.items():
        logp = torch.full((2, 4), -1.0, requires_grad=True)
        loss, _ = grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0, norm=norm)
        loss.backward()
        assert close(loss, want), norm
        assert close(logp.grad[0, 0], g0) and torch.allclose(logp.grad[1, :3], torch.full((3,), g1))
        assert (logp.grad[mask == 0] == 0).all()


def test_grpo_gradient_sign_follows_advantage():
    # rho = 1 (on-policy): loss = -rho*A -> dL/dlogp = -rho*A = -A.
    # Gradient descent moves logp by -grad = +A: up for A>0, down for A<0.
    g, _ = _single_token_grad(1.0, 2.0)
    assert close(g, -2.0) and g < 0
    g, _ = _single_token_grad(1.0, -0.5)
    assert close(g, 0.5) and g > 0
    # batched: the same sign per row
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), logp.detach(), t([1.0, -1.0]), torch.ones(2, 3))
    loss.backward()
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()


def test_grpo_clipping_stops_gradient_only_in_the_right_direction():
    # eps 0.2 -> [0.8, 1.2]; single token, loss = -min(rho A, clip(rho) A), dL/dlogp = -rho A if
    # the unclipped term is chosen, else 0.
    # A>0, rho=1.5 > 1.2: min(1.5, 1.2) -> clipped constant -> grad 0 (stop pushing up)
    g, s = _single_token_grad(1.5, 1.0)
    assert g == 0.0 and s["high_clip_fraction"] == 1.0 and s["clip_fraction"] == 1.0
    # A>0, rho=0.5 < 0.8: min(0.5, 0.8) -> unclipped -> grad = -0.5*1 = -0.5 (still pushed up)
    g, s = _single_token_grad(0.5, 1.0)
    assert close(g, -0.5) and s["clip_fraction"] == 0.0
    # A<0, rho=0.5 < 0.8: min(-0.5, -0.8) = -0.8 clipped -> grad 0 (stop pushing down)
    g, s = _single_token_grad(0.5, -1.0)
    assert g == 0.0 and s["low_clip_fraction"] == 1.0
    # A<0, rho=1.5 > 1.2: min(-1.5, -1.2) = -1.5 unclipped -> grad = -1.5*(-1) = +1.5
    g, s = _single_token_grad(1.5, -1.0)
    assert close(g, 1.5) and s["clip_fraction"] == 0.0
    # asymmetric eps (DAPO clip-higher): eps_high=0.6 lets rho=1.5 through for A>0
    logp = t([[math.log(1.5)]], grad=True)
    loss, _ = grpo_loss(logp, torch.zeros(1, 1), None, t([1.0]), torch.ones(1, 1), beta=0.0,
                        eps_low=0.2, eps_high=0.6)
    loss.backward()
    assert close(loss, -1.5) and close(logp.grad, -1.5)


def test_grpo_kl_zero_at_reference_positive_elsewhere_and_pulls_back():
    logp = t([[-1.0, -2.0, -3.0]], grad=True)
    _, s = grpo_loss(logp, logp.detach(), logp.detach(), t([0.0]), torch.ones(1, 3), beta=0.04)
    assert s["kl"] == 0.0
    ref = t([[-0.5, -2.5, -3.0]])
    loss, s = grpo_loss(logp, logp.detach(), ref, t([0.0]), torch.ones(1, 3), beta=0.04)
    assert s["kl"] > 0 and loss.item() > 0  # A = 0: the loss is beta * KL only
    loss.backward()
    # d k3 / d logp = 1 - e^(ref - logp): ref above logp -> negative grad -> logp moves up to ref
    assert logp.grad[0, 0] < 0 and logp.grad[0, 1] > 0 and logp.grad[0, 2] == 0


def test_grpo_beta_zero_needs_no_reference():
    logp = torch.zeros(2, 2, requires_grad=True)
    loss, s = grpo_loss(logp, logp.detach(), None, t([1.0, -1.0]), torch.ones(2, 2), beta=0.0)
    loss.backward()
    assert s["kl"] == 0.0 and torch.isfinite(logp.grad).all()
    with pytest.raises(ValueError):
        grpo_loss(logp, logp.detach(), None, t([1.0, -1.0]), torch.ones(2, 2), beta=0.04)
    with pytest.raises(ValueError):
        grpo_loss(logp, logp.detach(), None, t([1.0, -1.0]), torch.ones(2, 2), beta=0.0, norm="x")


def test_grpo_extreme_log_ratios_and_empty_rows_are_finite():
    # log-ratios of +-1e4 against both old and ref policy; row 2 has an all-zero mask.
    logp = t([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0], [1e4, -1e4, float("-inf")]], grad=True)
    old = torch.zeros(3, 3)
    ref = t([[-1e4, 1e4, 0.0], [1e4, -1e4, 0.0], [0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1], [1, 1, 1], [0, 0, 0]])
    for adv in ([1.0, -1.0, 1.0], [-1.0, 1.0, 0.0]):
        for norm in ("seq", "token", "fixed"):
            logp.grad = None
            loss, stats = grpo_loss(logp, old, ref, t(adv), mask, beta=0.04, norm=norm)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(logp.grad).all(), (adv, norm)
            assert all(math.isfinite(v) for v in stats.values())
    # a batch with no valid token at all: loss 0, no NaN
    loss, stats = grpo_loss(logp, old, ref, t([1.0, 1.0, 1.0]), torch.zeros(3, 3))
    assert loss.item() == 0.0 and stats["clip_fraction"] == 0.0


def test_grpo_bf16_inputs_computed_in_fp32():
    logp = torch.zeros(1, 2, dtype=torch.bfloat16, requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), logp.detach(), t([1.0]), torch.ones(1, 2))
    assert loss.dtype == torch.float32 and close(loss, -1.0)
    loss.backward()
    assert logp.grad.dtype == torch.bfloat16


def test_accumulation_windows_close_every_stage():
    # 5 micro-steps, grad accumulation 2: windows {0,1}, {2,3}, {4}. The last, partial window is still
    # applied (boundary at 4) with its loss scaled by 2/1, because DeepSpeed divides every loss by 2.
    assert [vlm.accumulation(m, 5, 2) for m in range(5)] == [(False, 1.0), (True, 1.0), (False, 1.0),
                                                              (True, 1.0), (True, 2.0)]
    # one micro-step with accumulation 2: the window closes at the stage's end, a full update
    assert vlm.accumulation(0, 1, 2) == (True, 2.0)
    assert [vlm.accumulation(m, 3, 1) for m in range(3)] == [(True, 1.0)] * 3


def test_sequence_logp():
    # [-1,-2,(-3)] with mask [1,1,0] -> -3 ; [-0.5,(-inf),(nan)] with mask [1,0,0] -> -0.5
    tok = t([[-1.0, -2.0, -3.0], [-0.5, float("-inf"), float("nan")]])
    out = sequence_logp(tok, t([[1, 1, 0], [1, 0, 0]]))
    assert torch.allclose(out, t([-3.0, -0.5]))
    # all-zero mask -> 0 ; bf16 in -> fp32 out
    out = sequence_logp(tok.bfloat16(), torch.zeros(2, 3, dtype=torch.bool))
    assert out.dtype == torch.float32 and (out == 0).all()


def test_dpo_loss_single_pair_by_hand():
    # w: logp -1, ref -2 -> reward 0.1*( 1) =  0.1
    # l: logp -3, ref -2 -> reward 0.1*(-1) = -0.1 ; margin = 0.2
    # loss = -log sigmoid(0.2) = log(1 + e^-0.2) = log(1 + 0.818731) = log(1.818731) = 0.598139
    loss, s = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.1)
    assert close(loss, 0.598139) and close(loss, math.log(1 + math.exp(-0.2)))
    assert s["reward_accuracy"] == 1.0 and close(s["margin"], 0.2)
    assert close(s["chosen_reward"], 0.1) and close(s["rejected_reward"], -0.1)


def test_dpo_loss_two_pairs_by_hand():
    # beta 0.5.
    # pair 1: w -1 vs ref -2 -> 0.5 ; l -3 vs ref -2 -> -0.5 ; margin 1.0
    #         loss = log(1 + e^-1) = log(1.367879) = 0.313262
    # pair 2: w -5 vs ref -4 -> -0.5 ; l -1 vs ref -3 -> 1.0 ; margin -1.5
    #         loss = log(1 + e^1.5) = log(1 + 4.481689) = 1.701413
    # mean loss = (0.313262 + 1.701413)/2 = 1.007337 ; accuracy 1/2 ; margin (1 - 1.5)/2 = -0.25
    # chosen reward (0.5 - 0.5)/2 = 0 ; rejected reward (-0.5 + 1)/2 = 0.25
    loss, s = dpo_loss(t([-1.0, -5.0]), t([-3.0, -1.0]), t([-2.0, -4.0]), t([-2.0, -3.0]), beta=0.5)
    assert close(loss, 1.007337)
    assert s["reward_accuracy"] == 0.5 and close(s["margin"], -0.25)
    assert close(s["chosen_reward"], 0.0) and close(s["rejected_reward"], 0.25)
    # margin exactly 0 -> loss log 2 = 0.693147, and it does not count as "accurate"
    loss, s = dpo_loss(t([-1.0]), t([-1.0]), t([-1.0]), t([-1.0]))
    assert close(loss, LN2) and s["reward_accuracy"] == 0.0


def test_dpo_gradient_raises_chosen_lowers_rejected():
    # dL/dlogp_w = -beta * sigmoid(-margin) ; at margin 0, beta 0.1, N=1: -0.1 * 0.5 = -0.05
    # dL/dlogp_l = +0.05. Descent moves chosen up and rejected down.
    w, l = t([-1.0], grad=True), t([-1.0], grad=True)
    loss, _ = dpo_loss(w, l, t([-1.0]), t([-1.0]), beta=0.1)
    loss.backward()
    assert close(w.grad, -0.05) and close(l.grad, 0.05)


def test_dpo_large_margins_are_stable():
    # margin = 0.1 * (-1e5) = -1e4: log(sigmoid) would be log(0) = -inf; logsigmoid gives 1e4.
    w, l = t([-1e5, 1e5], grad=True), t([0.0, 0.0], grad=True)
    loss, _ = dpo_loss(w, l, t([0.0, 0.0]), t([0.0, 0.0]), beta=0.1)
    loss.backward()
    # pair 1 loss 1e4, pair 2 loss ~0 -> mean 5000
    assert close(loss, 5000.0, 1e-2) and torch.isfinite(w.grad).all() and torch.isfinite(l.grad).all()


def test_step_dpo_weighted_sum_by_hand():
    box = (t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]))    # margin 0.2 -> 0.598139
    answer = (t([-1.0]), t([-1.0]), t([-1.0]), t([-1.0]))  # margin 0   -> log 2 = 0.693147
    # 0.5*0.598139 + 0.5*0.693147 = 0.645643 ; 0.25*0.598139 + 0.75*0.693147 = 0.669395
    loss, s = step_dpo_loss(box, answer)
    assert close(loss, 0.645643)
    loss, s = step_dpo_loss(box, answer, box_weight=0.25)
    assert close(loss, 0.669395)
    assert close(s["box_loss"], 0.598139) and close(s["answer_loss"], LN2)
    assert s["box_reward_accuracy"] == 1.0 and s["answer_reward_accuracy"] == 0.0
    assert close(s["box_margin"], 0.2) and "answer_chosen_reward" in s
    # equals the weighted sum of two dpo_loss calls, random inputs and beta
    g = torch.Generator().manual_seed(0)
    box = tuple(torch.randn(5, generator=g) for _ in range(4))
    answer = tuple(torch.randn(5, generator=g) for _ in range(4))
    loss, _ = step_dpo_loss(box, answer, beta=0.3, box_weight=0.7)
    want = 0.7 * dpo_loss(*box, beta=0.3)[0] + 0.3 * dpo_loss(*answer, beta=0.3)[0]
    assert torch.allclose(loss, want)


def test_step_dpo_box_weight_one_ignores_answer():
    box = (t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]))
    nan = (t([float("nan")]),) * 4
    for answer in (None, nan):
        loss, s = step_dpo_loss(box, answer, box_weight=1.0)
        assert close(loss, 0.598139) and not any(k.startswith("answer_") for k in s)
    loss, s = step_dpo_loss(nan, box, box_weight=0.0)  # and the mirror image
    assert close(loss, 0.598139) and not any(k.startswith("box_") for k in s)
    with pytest.raises(ValueError):
        step_dpo_loss(box, box, box_weight=1.5)


@settings(max_examples=40, deadline=None, database=None)
@given(st.data())
def test_grpo_loss_never_nan(data):
    n, tt = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 6))
    grid = lambda: t(data.draw(st.lists(finite, min_size=n * tt, max_size=n * tt))).view(n, tt)
    logp = grid().requires_grad_(True)
    old, ref = grid(), grid()
    mask = t(data.draw(st.lists(st.booleans(), min_size=n * tt, max_size=n * tt))).view(n, tt)
    adv = t(data.draw(st.lists(st.floats(-10, 10, width=32), min_size=n, max_size=n)))
    beta = data.draw(st.sampled_from([0.0, 0.04]))
    norm = data.draw(st.sampled_from(["seq", "token", "fixed"]))
    loss, stats = grpo_loss(logp, old, ref if beta else None, adv, mask, beta=beta, norm=norm)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(math.isfinite(v) for v in stats.values())
    assert 0.0 <= stats["clip_fraction"] <= 1.0 and stats["kl"] >= 0.0


@settings(max_examples=30, deadline=None, database=None)
@given(st.integers(1, 4), st.integers(2, 5), st.data())
def test_group_advantages_finite_and_centred(b, g, data):
    r = t(data.draw(st.lists(st.floats(-1e3, 1e3, width=32), min_size=b * g, max_size=b * g)))
    for scale in (True, False):
        a = group_advantages(r, g, scale=scale)
        assert a.shape == r.shape and torch.isfinite(a).all()
        assert torch.allclose(a.view(b, g).mean(1), torch.zeros(b), atol=1e-2)
    assert 0.0 <= zero_std_fraction(r, g) <= 1.0


@settings(max_examples=30, deadline=None, database=None)
@given(st.integers(1, 5), st.data())
def test_dpo_losses_never_nan(n, data):
    vec = lambda: t(data.draw(st.lists(finite, min_size=n, max_size=n)))
    logps = [vec().requires_grad_(True) for _ in range(2)] + [vec(), vec()]
    beta = data.draw(st.floats(0.01, 1.0))
    loss, stats = step_dpo_loss(logps, [vec(), vec(), vec(), vec()], beta=beta)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() >= 0
    assert all(torch.isfinite(x.grad).all() for x in logps[:2])
    assert all(math.isfinite(v) for v in stats.values())


# ====================================================================================================
# rewards and metrics: rewards.py (hand values, scipy / pycocotools as references, fuzzing)
# ====================================================================================================

def _random_box(rng, size=20.0):
    x1, y1 = rng.uniform(0, size, 2)
    return [x1, y1, x1 + rng.uniform(1, size / 2), y1 + rng.uniform(1, size / 2)]


def _coco_map50(predictions, ground_truths):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    labels = sorted({l for g in ground_truths for l in g["labels"]} |
                    {l for p in predictions for l in p["labels"]})
    cat = {l: i + 1 for i, l in enumerate(labels)}
    xywh = lambda b: [b[0], b[1], b[2] - b[0], b[3] - b[1]]
    anns = []
    for i, g in enumerate(ground_truths):
        for b, l in zip(g["boxes"], g["labels"]):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat[l], "bbox": xywh(b),
                         "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": 0})
    dets = [{"image_id": i + 1, "category_id": cat[l], "bbox": xywh(b), "score": s}
            for i, p in enumerate(predictions) for b, l, s in zip(p["boxes"], p["labels"], p["scores"])]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": [{"id": i + 1} for i in range(len(ground_truths))],
                        "annotations": anns, "categories": [{"id": c} for c in cat.values()]}
        coco.createIndex()
        if not dets:
            return 0.0
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate(); ev.accumulate(); ev.summarize()
    return max(float(ev.stats[1]), 0.0)


GOOD_COT = "The image shows a warm bright area and an equally large cool calm area."


SEG = '{"bbox": [10, 20, 60, 80], "points": [[30, 40], [35, 50]]}'


class MeanColourModel(torch.nn.Module):
    """Stub CLIP: image embedding = mean (R, G) of the crop; text embedding fixed."""

    def __init__(self, text_vec):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.text_vec = torch.tensor([text_vec], dtype=torch.float32)
        self.image_calls = self.text_calls = 0

    def encode_image(self, x):
        self.image_calls += 1
        return x[:, :2].mean(dim=(2, 3))

    def encode_text(self, tokens):
        self.text_calls += 1
        return self.text_vec.repeat(len(tokens), 1)


def stub_preprocess(img):  # nearest-neighbour resize keeps a half/half crop exactly half/half
    return to_tensor(img.resize((10, 10), Image.NEAREST))


def two_colour_image():
    a = np.zeros((40, 60, 3), np.uint8)
    a[:, :30, 0] = 255   # left half red
    a[:, 30:, 1] = 255   # right half green
    return Image.fromarray(a)


FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "{", "}", "[", "]", "(", ")", ",",
             ":", '"', "'", " ", "\n", "NaN", "nan", "Infinity", "inf", "1e400", "-1e400", "1e308",
             "0", "0.5", ".25", "1.0", "-3", "99999", "30%", "percent", "zero point three",
             '"bbox"', '"points"', '"score"', '"red"', "'blue'", "[10, 20, 5, 2]", "[0,0,100,100]",
             '{"red": 0.5, "blue": 0.5}', '{"bbox": [1,2,3,4], "points": [[1,1],[2,2]]}',
             "```json", "True", "None", "__import__('os')", "x" * 50]


fuzz_text = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5)), max_size=40).map("".join),
    st.tuples(st.sampled_from(FRAGMENTS), st.integers(1, 10000)).map(lambda t: (t[0] * t[1])[:10000]),
)


# derandomize: the same examples every run (reproducible CI); database=None: no .hypothesis dir
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def test_parse_think_answer_ok():
    assert R.parse_think_answer("<think>a b</think><answer>x</answer>") == ("a b", "x")
    # whitespace around and between the blocks is allowed, contents are stripped
    assert R.parse_think_answer("  <think> a </think>\n\n<answer> x </answer>\n") == ("a", "x")
    assert R.parse_think_answer("<think></think><answer></answer>") == ("", "")


@pytest.mark.parametrize("text", [
    "<think>a</think><answer>x</answer><answer>y</answer>",   # duplicated answer
    "<think>a<answer>x</answer></think><answer>y</answer>",   # answer hidden in think
    "<think><think>a</think><answer>x</answer>",              # duplicated think
    "hello <think>a</think><answer>x</answer>",               # text before
    "<think>a</think> so <answer>x</answer>",                 # text between
    "<think>a</think><answer>x</answer> bye",                 # text after
    "<answer>x</answer><think>a</think>",                     # wrong order
    "<think>a</think>", "", None, 42,
])
def test_parse_think_answer_rejects(text):
    assert R.parse_think_answer(text) is None


def test_parse_class_probs():
    assert R.parse_class_probs('{"red": 0.5, "blue": 0.5}') == {"red": 0.5, "blue": 0.5}
    # Python literal with mixed quotes and a leading-dot number, inside a code fence
    text = "Here you go:\n```json\n{'red': 0.5, \"blue\": .5}\n```\nDone."
    assert R.parse_class_probs(text) == {"red": 0.5, "blue": 0.5}
    # integers are numbers too; keys are stripped
    assert R.parse_class_probs('{" joy ": 1, "fear": 0}') == {"joy": 1.0, "fear": 0.0}
    # the first parsable dict wins, garbage dicts before it are skipped
    assert R.parse_class_probs('{oops} then {"a": 0.2, "b": 0.8}') == {"a": 0.2, "b": 0.8}


@pytest.mark.parametrize("text", [
    '{"red": NaN}', '{"red": Infinity}', '{"red": 1e400}', "{'red': float('nan')}",
    '{"red": "high"}', '{}', '{"red": -0.1}', '{"red": true}', "{'red': True}",
    "{'a': __import__('os').getcwd()}", "{'a': 1+2j}", "{1: 0.5}", '{"": 1}',
    "{'a': None}", "red: 0.5", "", "{'a': " + "9" * 5000 + "}", None,
])
def test_parse_class_probs_rejects(text):
    assert R.parse_class_probs(text) is None


def test_parsers_fast_on_10k_garbage():
    garbage = ["{" * 10000, "[" * 10000, "1" * 10000, "{'a': " + "1," * 5000,
               "<think>" * 1500, "[1,2,3," * 1500, "one " * 2500, "0." * 5000,
               "9" * 10000 + " px", "(1,2)," * 1600]
    t0 = time.time()
    for g in garbage:
        R.parse_class_probs(g); R.parse_boxes(g); R.parse_seg_answer(g); R.parse_score(g)
        R.parse_think_answer(g); R.leaks(g, "cls"); R.leaks(g, "det"); R.is_narrative(g)
    assert time.time() - t0 < 2.0


def test_parse_boxes():
    assert R.parse_boxes("[1, 2, 3, 4]") == [[1.0, 2.0, 3.0, 4.0]]
    assert R.parse_boxes("boxes: [[1,2,3,4], [5.5, 6, 7, 8e1]]") == [[1, 2, 3, 4], [5.5, 6, 7, 80]]
    # Qwen2-VL's (x1,y1),(x2,y2) notation
    assert R.parse_boxes("<|box_start|>(10,20),(30,40)<|box_end|>") == [[10, 20, 30, 40]]


@pytest.mark.parametrize("text", [
    "[3, 2, 1, 4]",           # inverted x
    "[1, 2, 3, 2]",           # zero height
    "[1, 2, 3]",              # three numbers
    "[1e400, 0, 1e401, 1]",   # non-finite
    "[NaN, 0, 1, 1]", "no box here", "", None,
    "[1,2,3,4] and [4,3,2,1]",  # one broken box spoils the answer
    "[0,0,1,1]" * 101,         # more than MAX_BOXES boxes
])
def test_parse_boxes_rejects(text):
    assert R.parse_boxes(text) is None


def test_parse_seg_answer():
    ok = '{"bbox": [1, 2, 30, 40], "points": [[5, 6], [7.5, 8]]}'
    assert R.parse_seg_answer(ok) == ([1, 2, 30, 40], [[5, 6], [7.5, 8]])
    assert R.parse_seg_answer("sure ```json\n" + ok + "\n``` done") == ([1, 2, 30, 40], [[5, 6], [7.5, 8]])


@pytest.mark.parametrize("text", [
    '{"bbox": [1, 2, 30], "points": [[5, 6], [7, 8]]}',
    '{"bbox": [1, 2, 30, 40], "points": [[5, 6]]}',
    '{"bbox": [1, 2, 30, 40], "points": [[5, 6, 7], [7, 8]]}',
    '{"bbox": [NaN, 2, 30, 40], "points": [[5, 6], [7, 8]]}',
    '{"bbox": [1e400, 2, 30, 40], "points": [[5, 6], [7, 8]]}',
    '{"bbox": ["1", 2, 30, 40], "points": [[5, 6], [7, 8]]}',
    '{"bbox": [1, 2, 30, 40]}', "[1,2,3,4]", "", None,
])
def test_parse_seg_answer_rejects(text):
    assert R.parse_seg_answer(text) is None


def test_parse_seg_box_reads_the_first_valid_box_points_optional():
    assert R.parse_seg_box('{"bbox": [1, 2, 3]} then {"bbox": [1, 2, 30, 40]}') == [1, 2, 30, 40]
    assert R.parse_seg_box('{"bbox": [1, 2, 30, 40], "points": [[5, 6]]}') == [1, 2, 30, 40]
    for bad in ['{"bbox": [30, 2, 1, 40]}', '{"bbox": [1, 2, 30, NaN]}', '{"bbox": [true, 2, 30, 40]}',
                '{"bbox": [1, 2, ' + "9" * 400 + ', 40]}', "[1, 2, 30, 40]", None]:   # a 400-digit int
        assert R.parse_seg_box(bad) is None, bad
    assert R.seg_answer("<think>a</think><answer>{}</answer>") == "{}" and R.seg_answer("{}") == "{}"


@pytest.mark.parametrize("text,expected", [
    ('{"score": 0.7}', 0.7),
    ("The crop shows the sign. {'score': 0.25} ", 0.25),
    ('{"score": 1.5}', None),    # out of range on the 0..1 scale: unparsable, never clamped to 1
    ('{"score": -2}', None),     # out of range
    ('{"score": "0.4"}', 0.4),   # quoted number tolerated
    ('{"score": NaN}', None), ('{"score": 1e400}', None),  # non-finite: unreadable
    ("I cannot judge this.", None), ("", None), (None, None),
])
def test_parse_score(text, expected):
    assert R.parse_score(text) == (None if expected is None else approx(expected))


@pytest.mark.parametrize("text,expected", [
    ("Score: 2/10", 0.2),                    # 2 on a 10-point scale, not "2 -> clamped 1.0"
    ('{"score": "8/10"}', 0.8), ("score: 10/10", 1.0), ("Score: 7 out of 10", 0.7), ("score = 3 / 4", 0.75),
    ("80%", 0.8), ("Score: 80 %", 0.8), ('{"score": "45%"}', 0.45), ("2/10", 0.2), ("0.7", 0.7),
    ("score: 12/10", None), ("score: 150%", None), ("score: 3/0", None),   # outside the stated scale / no scale
    ("Score: 7", None), ("score: 4/-5", None), ("I'd say 7/10 overall.", None),  # no "score" and not alone
])
def test_parse_score_reads_the_stated_scale(text, expected):
    assert R.parse_score(text) == (None if expected is None else approx(expected))


def test_cls_similarity_hand_values():
    # identical: KL = 0, MSE = 0, sum = 1 -> exp(0) * exp(0) = 1
    assert R.cls_similarity({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == approx(1.0)
    # p = [1, 0] (clipped to ~[1, 1e-10]), q = [.5, .5]:
    # KL ~= 1*ln(1/.5) = ln 2; MSE = ((1-.5)^2 + (0-.5)^2)/2 = 0.25; sum = 1
    # Sim = exp(-.5 ln2 - .5*.25) = 2**-.5 * e**-.125 = 0.707107 * 0.882497 = 0.624018
    assert R.cls_similarity({"a": 0.5, "b": 0.5}, {"a": 1.0, "b": 0.0}) == approx(0.624018, abs=1e-5)
    # missing class counts as 0: p = [.5, .5], q_raw = [1, 0] -> q ~= [1, 1e-10]
    # KL = .5 ln(.5/1) + .5 ln(.5/1e-10) = .5(-0.693147) + .5(22.332704) = 10.819778
    # MSE = (.25 + .25)/2 = .25 ; Sim = exp(-5.409889 - .125) = exp(-5.534889) = 0.0039467
    assert R.cls_similarity({"a": 1.0}, {"a": 0.5, "b": 0.5}) == approx(0.0039467, rel=1e-3)
    # class names match case- and whitespace-insensitively
    assert R.cls_similarity({"Joy": 0.5, " SAD ": 0.5}, {"joy": 0.5, "sad": 0.5}) == approx(1.0)


def test_cls_similarity_hacks():
    # Hack: every class at probability 1.0. gt = [1, 0, 0], q_raw = [1, 1, 1]:
    # q = [1/3]*3, KL ~= ln 3 = 1.098612, MSE = (0 + 1 + 1)/3 = 2/3, sum = 3 -> exp(-|3-1|) = e^-2
    # Sim = exp(-.549306 - .333333) * e^-2 = 0.413725 * 0.135335 = 0.055992
    sim = R.cls_similarity({"a": 1, "b": 1, "c": 1}, {"a": 1.0, "b": 0.0, "c": 0.0})
    assert sim == approx(0.055992, abs=1e-5)
    # Hack on a uniform target: gt [.5, .5], q_raw [1, 1] -> q = [.5, .5], KL = 0,
    # MSE = (.25+.25)/2 = .25, sum = 2 -> Sim = exp(-.125) * exp(-1) = exp(-1.125) = 0.324652
    assert R.cls_similarity({"a": 1, "b": 1}, {"a": 0.5, "b": 0.5}) == approx(0.324652, abs=1e-6)
    # Hack: right answer plus mass on a made-up class. Over gt's class KL = MSE = 0 but the
    # sum over all predicted values is 2 -> exp(-1) = 0.367879
    assert R.cls_similarity({"a": 1, "junk": 1}, {"a": 1.0}) == approx(0.367879, abs=1e-6)


@pytest.mark.parametrize("pred", [
    {}, {"a": float("nan")}, {"a": float("inf")}, {"a": -0.5, "b": 1.5}, {"a": "x"},
    {"b": 1.0},   # no mass on any true class
    {"a": 0.0},   # likewise
    None, "a", {1: 0.5},
])
def test_cls_similarity_invalid_is_zero(pred):
    assert R.cls_similarity(pred, {"a": 1.0, "z": 0.0}) == 0.0


def test_box_iou_hand_values():
    # inter 5x5 = 25, union 100 + 100 - 25 = 175 -> 1/7
    assert R.box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == approx(1 / 7)
    # inter 1x2 = 2, union 4 + 4 - 2 = 6 -> 1/3
    assert R.box_iou([0, 0, 2, 2], [1, 0, 3, 2]) == approx(1 / 3)
    assert R.box_iou((1, 1, 4, 4), np.array([1, 1, 4, 4])) == approx(1.0)
    assert R.box_iou([0, 0, 1, 1], [1, 0, 2, 1]) == 0.0       # touching edges
    assert R.box_iou([0, 0, 1, 1], [5, 5, 6, 6]) == 0.0       # disjoint


@pytest.mark.parametrize("bad", [
    [10, 0, 0, 10], [0, 0, 0, 10], [0, 0, float("nan"), 10], [0, 0, float("inf"), 10],
    [0, 0, 10], "0000", None, {"a": 1}, ["a", "b", "c", "d"],
])
def test_box_iou_invalid(bad):
    assert R.box_iou(bad, [0, 0, 10, 10]) == 0.0
    assert R.box_iou([0, 0, 10, 10], bad) == 0.0


def test_det_similarity_hand_values():
    assert R.det_similarity([[0, 0, 10, 10]], [[0, 0, 10, 10]]) == approx(1.0)
    # order of predictions does not matter; gt1 <-> [0,0,10,5]: IoU 50/100 = .5, gt2 exact: 1
    # -> (0.5 + 1) / 2 = 0.75
    gt = [[0, 0, 10, 10], [20, 20, 30, 30]]
    assert R.det_similarity([[20, 20, 30, 30], [0, 0, 10, 5]], gt) == approx(0.75)
    # one GT found out of two -> 1/2; an invalid prediction scores 0 but does not break it
    assert R.det_similarity([[20, 20, 30, 30], [5, 5, 1, 1]], gt) == approx(0.5)
    # no GT: predicting nothing is right (1), predicting something is wrong (0)
    assert R.det_similarity([], []) == 1.0 and R.det_similarity([[0, 0, 1, 1]], []) == 0.0
    assert R.det_similarity(None, gt) == 0.0 and R.det_similarity([], gt) == 0.0


def test_det_similarity_hacks():
    # Hack: a box covering the whole 100x100 image for a 10x10 target.
    # IoU = 100 / 10000 = 0.01 -> similarity 0.01
    assert R.det_similarity([[0, 0, 100, 100]], [[10, 10, 20, 20]]) == approx(0.01)
    # Hack: spamming extra boxes is free under the paper's /N_gt (1.0), but costs with
    # penalize_extra: (1 + 0) / max(1, 2) = 0.5
    preds = [[0, 0, 10, 10], [50, 50, 60, 60]]
    assert R.det_similarity(preds, [[0, 0, 10, 10]]) == approx(1.0)
    assert R.det_similarity(preds, [[0, 0, 10, 10]], penalize_extra=True) == approx(0.5)


def test_det_similarity_matches_brute_force():
    # Hungarian == best assignment over all permutations (square-padded with IoU 0)
    rng = np.random.default_rng(0)
    for _ in range(200):
        gt = [_random_box(rng) for _ in range(rng.integers(1, 6))]
        pred = [_random_box(rng) for _ in range(rng.integers(0, 6))]
        k = max(len(gt), len(pred))
        iou = np.zeros((k, k))
        for i, g in enumerate(gt):
            for j, p in enumerate(pred):
                iou[i, j] = R.box_iou(p, g)
        best = max(sum(iou[i, perm[i]] for i in range(k)) for perm in itertools.permutations(range(k)))
        assert R.det_similarity(pred, gt) == approx(best / len(gt), abs=1e-12)


@pytest.mark.parametrize("cot", [
    "The joy is 0.3 here.", "about 30% of the faces", "roughly .25 of it", "it is 1.0 sure",
    "maybe 30 percent", "3/10 of the people smile",
    # spelled-out forms are caught (RISE eq. 1: probabilities must not leak)
    "zero point three of the mood is calm", "thirty percent sadness",
    "twenty-five per cent fear", "point two five joy", "one hundred percent certain",
])
def test_leaks_cls_positive(cot):
    assert R.leaks(cot, "cls")


@pytest.mark.parametrize("cot", [
    "Two children are smiling at a birthday party.", "There are 3 dogs and 12 balloons.",
    "The version 2.5 sign is blurry.",    # a decimal above 1 is not a probability
    "The left half of the scene is dark.",  # word fractions are ordinary description
    "At this point the sky turns grey.", "",
])
def test_leaks_cls_negative(cot):
    assert not R.leaks(cot, "cls")


def test_leaks_class_names():
    assert R.leaks("The faces show clear joy.", "cls", class_names=["joy", "fear"])
    assert R.leaks("Several Circles overlap.", "cls", class_names=["circle"])  # plural, any case
    assert not R.leaks("The faces are enjoying it.", "cls", class_names=["joy"])  # whole words only


@pytest.mark.parametrize("cot", [
    "The dog is at 12, 40 near the fence.", "box [10 20 30 40]", "around (120, 80)",
    "a 120x80 region", "x1 = 30 and y1 = 5", "about 40 pixels from the left", "at 0.1, 0.2",
])
def test_leaks_det_positive(cot):
    assert R.leaks(cot, "det")


@pytest.mark.parametrize("cot", [
    "The red circle sits in the upper left corner.", "There are 3 cars parked.",
    "The second of 2 dogs wears a coat.", "",
])
def test_leaks_det_negative(cot):
    assert not R.leaks(cot, "det")


def test_leaks_bad_task():
    with pytest.raises(ValueError):
        R.leaks("text", "seg")


def test_jsd_hand_values():
    # disjoint: m = [.5, .5], KL(p||m) = KL(q||m) = ln 2 -> JSD = ln 2
    assert R.jsd([1, 0], [0, 1]) == approx(LN2)
    assert R.jsd([0.2, 0.8], [0.2, 0.8]) == approx(0.0, abs=1e-15)
    # p = [1, 0], q = [.5, .5], m = [.75, .25]
    # KL(p||m) = ln(1/.75) = 0.287682 ; KL(q||m) = .5 ln(.5/.75) + .5 ln(.5/.25) = 0.143841
    # JSD = .5 (0.287682 + 0.143841) = 0.215762; unnormalised inputs are renormalised first
    assert R.jsd([1, 0], [0.5, 0.5]) == approx(0.215762, abs=1e-6)
    assert R.jsd([2, 0], [3, 3]) == approx(0.215762, abs=1e-6)
    # invalid input -> the worst value, ln 2
    assert R.jsd([0, 0], [1, 0]) == approx(LN2) and R.jsd([float("nan"), 1], [1, 0]) == approx(LN2)
    assert R.jsd([-1, 2], [1, 0]) == approx(LN2) and R.jsd([], []) == approx(LN2)
    # huge but finite values are fine: [9e307, 9e307] is [.5, .5]; vs [1, 0] -> 0.215762
    assert R.jsd([1, 0], [9e307, 9e307]) == approx(0.215762, abs=1e-6)
    with pytest.raises(ValueError):
        R.jsd([1, 0], [1, 0, 0])


def test_jsd_matches_scipy():
    from scipy.spatial.distance import jensenshannon
    rng = np.random.default_rng(1)
    for _ in range(200):
        k = rng.integers(2, 9)
        p, q = rng.random(k), rng.random(k)
        p[rng.random(k) < 0.3] = 0.0  # zeros exercise the 0 log 0 convention
        p[0] += 0.1
        assert R.jsd(p, q) == approx(jensenshannon(p, q) ** 2, abs=1e-12)
        assert 0.0 <= R.jsd(p, q) <= LN2


def test_win_rate_and_accuracy():
    # baseline lower only on sample 1 (0.1 < 0.2); tie on sample 2 is not a win -> 1/3
    assert R.win_rate([0.1, 0.2, 0.3], [0.2, 0.2, 0.1]) == approx(1 / 3)
    assert R.win_rate([0.0, 0.0], [0.5, 0.5]) == 1.0 and R.win_rate([], []) == 0.0
    # matches: a==a only; None (unparsable) is wrong -> 1/3
    assert R.accuracy(["a", "b", None], ["a", "c", "c"]) == approx(1 / 3)
    assert R.accuracy([1, 2], [1, 2]) == 1.0 and R.accuracy([], []) == 0.0


def test_probs_vector():
    assert R.probs_vector({"Joy": 0.7, "x": 0.3}, ["joy", "fear"]) == [0.7, 0.0]
    assert R.probs_vector(None, ["a"]) == [0.0]


def test_map50_hand_values():
    gt = [{"boxes": [[0, 0, 10, 10]], "labels": ["a"]}]
    # one perfect detection -> precision 1 at every recall -> AP 1
    assert R.map50([{"boxes": [[0, 0, 10, 10]], "labels": ["a"], "scores": [0.9]}], gt) == approx(1.0)
    # a false positive (score .9) ranked above the true positive (.8):
    # tp = [0, 1] -> recall [0, 1], precision [0, .5] -> envelope [.5, .5] -> AP = .5
    pred = {"boxes": [[50, 50, 60, 60], [0, 0, 10, 10]], "labels": ["a", "a"], "scores": [0.9, 0.8]}
    assert R.map50([pred], gt) == approx(0.5)
    # no scores: output order decides. Same order as above -> 0.5; reversed -> the TP comes
    # first: precision [1, .5], recall [1, 1] -> every threshold hits index 0 -> AP 1
    assert R.map50([{"boxes": pred["boxes"], "labels": ["a", "a"]}], gt) == approx(0.5)
    assert R.map50([{"boxes": pred["boxes"][::-1], "labels": ["a", "a"]}], gt) == approx(1.0)


def test_map50_classes_and_recall():
    # two GT boxes, one found: recall .5 with precision 1 -> the 51 thresholds 0..0.5 get 1,
    # the other 50 get 0 -> AP = 51/101 = 0.504950
    gt = [{"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "labels": [1, 1]}]
    assert R.map50([{"boxes": [[0, 0, 10, 10]], "labels": [1]}], gt) == approx(51 / 101)
    # class a perfect (1), class b in GT but never predicted (0), class c only predicted
    # (ignored) -> mean over {a, b} = 0.5; an unparsable (None) image adds no detections
    gt = [{"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "labels": ["a", "b"]}, {"boxes": [], "labels": []}]
    pred = [{"boxes": [[0, 0, 10, 10], [40, 40, 50, 50]], "labels": ["a", "c"]}, None]
    assert R.map50(pred, gt) == approx(0.5)
    assert R.map50([None], [{"boxes": [], "labels": []}]) == 0.0  # no GT class at all
    with pytest.raises(ValueError):  # a label or score per box, or it is a bug upstream
        R.map50([{"boxes": [[0, 0, 1, 1]], "labels": []}], [{"boxes": [], "labels": []}])


@pytest.mark.filterwarnings(PYCOCOTOOLS_NUMPY2)
def test_map50_matches_pycocotools():
    rng = np.random.default_rng(2)
    for case in range(40):
        n_img, classes = rng.integers(1, 5), ["cat", "dog", "car"][: rng.integers(1, 4)]
        gts, preds = [], []
        for _ in range(n_img):
            gb = [_random_box(rng, 40) for _ in range(rng.integers(0, 5))]
            gl = [str(rng.choice(classes)) for _ in gb]
            # detections: jittered GT boxes (some hits, some misses) plus random boxes
            pb = [list(np.add(b, rng.normal(0, 1, 4))) for b in gb if rng.random() < 0.8]
            pl = [l if rng.random() < 0.8 else str(rng.choice(classes)) for l in gl][: len(pb)]
            pb += [_random_box(rng, 40) for _ in range(rng.integers(0, 4))]
            pl += [str(rng.choice(classes)) for _ in range(len(pb) - len(pl))]
            pb = [[b[0], b[1], max(b[2], b[0] + 0.5), max(b[3], b[1] + 0.5)] for b in pb]
            # half the cases use coarse scores, so ties (kept in output order) happen
            scores = rng.random(len(pb)) if case % 2 else np.round(rng.random(len(pb)), 1)
            gts.append({"boxes": gb, "labels": gl})
            preds.append({"boxes": pb, "labels": pl, "scores": [float(s) for s in scores]})
        if not any(g["boxes"] for g in gts):
            gts[0] = {"boxes": [[0, 0, 5, 5]], "labels": [classes[0]]}
        assert R.map50(preds, gts) == approx(_coco_map50(preds, gts), abs=1e-9), case


def test_mask_iou_stats_hand_values():
    g1 = np.zeros((2, 3), bool); g1[0, :2] = True            # 2 px
    p1 = np.zeros((2, 3), bool); p1[0, 1:] = True            # 2 px, 1 shared -> 1/3
    g2 = np.ones((2, 2), bool)                                 # 4 px, predicted exactly -> 1
    # gIoU = (1/3 + 1)/2 = 2/3 ; cIoU = (1 + 4)/(3 + 4) = 5/7
    giou, ciou = R.mask_iou_stats([p1, g2.copy()], [g1, g2])
    assert giou == approx(2 / 3) and ciou == approx(5 / 7)
    # empty vs empty is perfect (1.0); None prediction = empty mask vs 2 px GT -> 0
    # gIoU = (1 + 0)/2 = .5 ; cIoU = 0 / 2 = 0
    empty = np.zeros((2, 3), bool)
    assert R.mask_iou_stats([empty, None], [empty, g1]) == (approx(0.5), approx(0.0))
    assert R.mask_iou_stats([empty], [empty]) == (1.0, 1.0)
    assert R.mask_iou_stats([], []) == (0.0, 0.0)
    with pytest.raises(ValueError):
        R.mask_iou_stats([np.zeros((2, 2), bool)], [empty])
    # from counts (what ranks merge): IoUs 2/4, 1.0 (empty union), 0 (unparsable, whatever its
    # counts) -> gIoU 0.5; cIoU (2 + 0 + 3) / (4 + 0 + 3) = 5/7
    giou, ciou = R.iou_from_counts([(2, 4), (0, 0), (3, 3)], [True, True, False])
    assert giou == approx(0.5) and ciou == approx(5 / 7)
    assert R.mask_counts(None, g1) == (0, 2) and R.mask_counts(p1, g1) == (1, 3)


def test_rise_cot_reward_cls():
    out = R.rise_cot_reward(GOOD_COT, '{"red": 0.5, "blue": 0.5}', GT_CLS, "cls")
    assert out == {"reward": 1.0, "leak": False, "format": True, "similarity": approx(1.0)}
    # leak: a probability in the CoT zeroes the reward, similarity is still logged
    out = R.rise_cot_reward("About 0.5 of it is warm and the rest cool.", '{"red": .5, "blue": .5}', GT_CLS, "cls")
    assert out["leak"] and out["reward"] == 0.0 and out["similarity"] == approx(1.0)
    # the paper's leak is numbers: naming a class is allowed by default, a leak with forbid_class_names=True
    cot = "A red patch dominates the left side of the picture."
    assert R.rise_cot_reward(cot, '{"red": .5, "blue": .5}', GT_CLS, "cls")["reward"] == 1.0
    assert R.rise_cot_reward(cot, '{"red": .5, "blue": .5}', GT_CLS, "cls", forbid_class_names=True)["leak"]
    # imperfect reconstruction {"red":1,"blue":1}: Sim = exp(-1.125) = 0.324652 (see cls hacks)
    assert R.rise_cot_reward(GOOD_COT, '{"red": 1, "blue": 1}', GT_CLS, "cls")["reward"] == approx(0.324652, abs=1e-6)


def test_rise_cot_reward_det_and_format():
    gt = [[0, 0, 10, 10]]
    cot = "The dog sits in the top left corner of the scene."
    # [0,0,10,5] vs [0,0,10,10]: IoU 50/100 = 0.5
    assert R.rise_cot_reward(cot, "[0, 0, 10, 5]", gt, "det")["reward"] == approx(0.5)
    assert R.rise_cot_reward("The dog is at 0, 0 up there.", "[0,0,10,10]", gt, "det")["leak"]
    # Hack: empty answer -> format fails, similarity 0
    out = R.rise_cot_reward(cot, "<answer></answer>", gt, "det")
    assert out == {"reward": 0.0, "leak": False, "format": False, "similarity": 0.0}
    # CoT smuggling an answer block, or not a narrative -> format 0
    assert not R.rise_cot_reward(cot + " <answer>[0,0,10,10]</answer>", "[0,0,10,10]", gt, "det")["format"]
    assert R.rise_cot_reward("   ", "[0,0,10,10]", gt, "det")["reward"] == 0.0
    assert R.rise_cot_reward("dog.", "[0,0,10,10]", gt, "det")["reward"] == 0.0   # < 3 words


def test_rise_cot_reward_ablation_drops_only_the_named_factors():
    """Paper Table 5: Sim alone, without the leak factor, without the format factor (rise_cot.py --reward)."""
    leaky = "The dog is at 0, 0 up there."                       # leaks coordinates, format fine
    short = "dog."                                              # no leak, not a narrative (< 3 words)
    gt, rec = [[0, 0, 10, 10]], "[0, 0, 10, 5]"                  # Sim = IoU 0.5
    expected = {("leak", "format"): (0.0, 0.0), ("format",): (0.5, 0.0), ("leak",): (0.0, 0.5), (): (0.5, 0.5)}
    for terms, want in expected.items():
        got = tuple(R.rise_cot_reward(cot, rec, gt, "det", terms=terms)["reward"] for cot in (leaky, short))
        assert got == approx(want), terms
    assert rise_cot.parse_args(["--reward", "sim,format"]).reward_terms == ["sim", "format"]
    for bad in ("leak,format", "sim,length"):
        with pytest.raises(SystemExit):
            rise_cot.parse_args(["--reward", bad])


def test_rise_r1_reward():
    good = '<think>Warm and cool areas are equal.</think><answer>{"red": 0.5, "blue": 0.5}</answer>'
    assert R.rise_r1_reward(good, GT_CLS, "cls") == {"reward": approx(2.0), "similarity": approx(1.0), "format": 1.0}
    # Hack: empty answer -> 0 similarity and 0 format
    assert R.rise_r1_reward("<think>a b c</think><answer></answer>", GT_CLS, "cls")["reward"] == 0.0
    # Hack: every class at 1.0. Sim = exp(-0.5*0 - 0.5*0.25) * exp(-|2-1|) = exp(-1.125) = 0.324652 (the sum
    # penalty is inside Sim, eqs. 2-5); the answer is well formed, R_fmt = 1 (eq. 9): total 1.324652
    out = R.rise_r1_reward('<think>x</think><answer>{"red": 1, "blue": 1}</answer>', GT_CLS, "cls")
    assert out["format"] == 1.0 and out["reward"] == approx(1.324652, abs=1e-6)
    # answer without think block: similarity 1, format 0 -> 1
    assert R.rise_r1_reward("<answer>[0,0,10,10]</answer>", [[0, 0, 10, 10]], "det")["reward"] == approx(1.0)
    # Hack: whole-image box for a small target: IoU 0.01 + format 1 = 1.01
    out = R.rise_r1_reward("<think>it is there</think><answer>[0,0,100,100]</answer>", [[10, 10, 20, 20]], "det")
    assert out["reward"] == approx(1.01)
    # duplicated answer tags: nothing parses -> 0
    assert R.rise_r1_reward("<think>a</think><answer>[0,0,1,1]</answer><answer>[0,0,1,1]</answer>",
                            [[0, 0, 1, 1]], "det")["reward"] == 0.0


def test_think_reward():
    assert R.think_reward("<think>look left</think>\n<answer>" + SEG + "</answer>") == 1.0
    assert R.think_reward("<answer>" + SEG + "</answer>") == 0.0                   # no think
    assert R.think_reward("<think></think><answer>x</answer>") == 0.0              # empty think
    assert R.think_reward("<think>a</think><answer>x</answer><answer>y</answer>") == 0.0


def test_seg_format_reward():
    wrap = lambda s: "<think>ok</think><answer>" + s + "</answer>"
    assert R.seg_format_reward(wrap(SEG), 100, 100) == 1.0
    assert R.seg_format_reward(SEG, 100, 100) == 1.0                # --no-cot: bare JSON
    assert R.seg_format_reward(wrap(SEG), 50, 100) == 0.0           # x2 = 60 > width 50
    assert R.seg_format_reward(wrap(SEG.replace("10, 20, 60", "70, 20, 60")), 100, 100) == 0.0  # inverted
    assert R.seg_format_reward(wrap(SEG.replace("[10, 20", "[-1, 20")), 100, 100) == 0.0         # outside
    assert R.seg_format_reward(wrap(SEG.replace("[35, 50]", "[35, 50, 1]")), 100, 100) == 0.0
    assert R.seg_format_reward(wrap(""), 100, 100) == 0.0           # empty answer
    # points outside the box still pass: point accuracy is never rewarded
    assert R.seg_format_reward(wrap(SEG.replace("[35, 50]", "[99, 99]")), 100, 100) == 1.0


def test_clip_reward_hand_values():
    img, tok = two_colour_image(), lambda texts: torch.zeros(len(texts), 4, dtype=torch.long)
    model = MeanColourModel([1.0, 0.0])
    boxes = [[0, 0, 30, 40],      # pure red: emb (1, 0) vs text (1, 0) -> cos 1
             [20, 0, 40, 40],     # half red half green: (.5, .5) -> cos = .5/(.7071) = 0.707107
             [30, 0, 60, 40],     # pure green: (0, 1) -> cos 0
             None, [5, 5, 1, 1], [100, 100, 120, 120], [0, 0, float("nan"), 3]]  # invalid -> 0
    out = R.clip_semantic_reward(model, stub_preprocess, tok, img, boxes, "a red thing")
    assert out == approx([1.0, 0.707107, 0.0, 0.0, 0.0, 0.0, 0.0], abs=1e-6)
    assert model.image_calls == 1 and model.text_calls == 1      # one batch, one text pass
    # negative cosine is clamped to 0: text (-1, 0) vs red (1, 0) -> cos -1 -> 0
    out = R.clip_semantic_reward(MeanColourModel([-1.0, 0.0]), stub_preprocess, tok, img, [[0, 0, 30, 40]], "x")
    assert out == [0.0]
    # nothing valid: no embedding at all
    model = MeanColourModel([1.0, 0.0])
    assert R.clip_semantic_reward(model, stub_preprocess, tok, img, [None, [3, 3, 3, 3]], "x") == [0.0, 0.0]
    assert model.image_calls == 0 and model.text_calls == 0


def test_clip_reward_crop_coordinates():
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    seen = []
    recording = lambda im: (seen.append(np.asarray(im).copy()), to_tensor(im.resize((8, 8))))[1]
    model, tok = MeanColourModel([1.0, 1.0]), lambda t: torch.zeros(len(t), 4, dtype=torch.long)
    boxes = [[3, 5, 20, 17],            # integer box: exactly these pixels
             [3.2, 5.7, 19.1, 16.5],    # fractional: rounded outwards -> (3, 5, 20, 17)
             [-5, -5, 10, 10],          # partly outside: clipped -> (0, 0, 10, 10)
             [60, 40, 80, 90]]          # clipped -> (60, 40, 64, 48)
    R.clip_semantic_reward(model, recording, tok, img, boxes, "x")
    expected = [(3, 5, 20, 17), (3, 5, 20, 17), (0, 0, 10, 10), (60, 40, 64, 48)]
    assert len(seen) == 4
    for got, box in zip(seen, expected):
        np.testing.assert_array_equal(got, np.asarray(img.crop(box)))


def test_clip_reward_real_model_batch_equals_single(tiny_clip):
    model, preprocess, tokenizer = tiny_clip
    img = Image.fromarray(np.random.default_rng(4).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    boxes = [[0, 0, 30, 30], [10, 5, 60, 45], None, [20, 20, 25, 40]]
    batch = R.clip_semantic_reward(model, preprocess, tokenizer, img, boxes, "a thing")
    single = [R.clip_semantic_reward(model, preprocess, tokenizer, img, [b], "a thing")[0] for b in boxes]
    assert batch == approx(single, abs=1e-5) and batch[2] == 0.0
    assert all(0.0 <= r <= 1.0 for r in batch)
    # the value is max(0, cosine) of the normalised embeddings
    with torch.no_grad():
        t = model.encode_text(tokenizer(["a thing"]))[0]
        i = model.encode_image(preprocess(img.crop((10, 5, 60, 45)))[None])[0]
    assert batch[1] == approx(max(0.0, torch.cosine_similarity(i, t, dim=0).item()), abs=1e-5)


def test_clip_reward_text_embedded_once_per_instruction(tiny_clip):
    model, preprocess, tokenizer = tiny_clip
    calls = []
    counting_tok = lambda texts: (calls.append(list(texts)), tokenizer(texts))[1]
    img, cache = Image.new("RGB", (40, 40), (200, 30, 30)), {}
    first = R.clip_semantic_reward(model, preprocess, counting_tok, img, [[0, 0, 20, 20]] * 8, "red square", cache)
    again = R.clip_semantic_reward(model, preprocess, counting_tok, img, [[5, 5, 30, 30]], "red square", cache)
    assert calls == [["red square"]] and "red square" in cache
    R.clip_semantic_reward(model, preprocess, counting_tok, img, [[0, 0, 20, 20]], "green circle", cache)
    assert calls == [["red square"], ["green circle"]]
    assert len(set(first)) == 1 and len(again) == 1   # 8 identical crops, identical rewards


@FUZZ
@given(fuzz_text)
def test_fuzz_parsers_and_rewards(text):
    assert R.parse_think_answer(text) is None or all(isinstance(s, str) for s in R.parse_think_answer(text))
    probs = R.parse_class_probs(text)
    assert probs is None or all(math.isfinite(v) and v >= 0 for v in probs.values())
    boxes = R.parse_boxes(text)
    assert boxes is None or all(R.box_iou(b, b) == 1.0 for b in boxes)
    seg = R.parse_seg_answer(text)
    assert seg is None or all(math.isfinite(v) for v in seg[0] + seg[1][0] + seg[1][1])
    assert R.parse_score(text) is None or 0.0 <= R.parse_score(text) <= 1.0
    assert R.leaks(text, "cls") in (True, False) and R.leaks(text, "det") in (True, False)
    assert R.think_reward(text) in (0.0, 1.0)
    assert R.seg_format_reward(text, 64, 48) in (0.0, 1.0)
    for schema, gt in (("cls", GT_CLS), ("det", [[0, 0, 10, 10], [5, 5, 20, 20]])):
        out = R.rise_cot_reward(text, text, gt, schema)
        assert 0.0 <= out["reward"] <= 1.0 and 0.0 <= out["similarity"] <= 1.0
        out = R.rise_r1_reward(text, gt, schema)
        assert 0.0 <= out["reward"] <= 2.0 and 0.0 <= out["format"] <= 1.0


@FUZZ
@given(st.dictionaries(st.text(max_size=3), floats, max_size=5),
       st.dictionaries(st.text(min_size=1, max_size=3), floats, min_size=1, max_size=5))
def test_fuzz_cls_similarity(pred, gt):
    sim = R.cls_similarity(pred, gt)
    assert 0.0 <= sim <= 1.0


@FUZZ
@given(st.lists(st.lists(floats, min_size=4, max_size=4), max_size=4),
       st.lists(st.lists(floats, min_size=4, max_size=4), min_size=1, max_size=4))
def test_fuzz_boxes(pred, gt):
    assert 0.0 <= R.det_similarity(pred, gt) <= 1.0
    assert 0.0 <= R.box_iou(pred[0] if pred else None, gt[0]) <= 1.0


@FUZZ
@given(st.lists(st.tuples(floats, floats), min_size=1, max_size=6))
def test_fuzz_jsd(pairs):
    p, q = zip(*pairs)
    assert 0.0 <= R.jsd(p, q) <= LN2 + 1e-12


@FUZZ
@given(st.lists(st.one_of(st.none(), st.lists(floats, min_size=4, max_size=4)), max_size=6))
def test_fuzz_clip_boxes(boxes):
    out = R.clip_semantic_reward(MeanColourModel([1.0, 0.5]), stub_preprocess,
                                 lambda t: torch.zeros(len(t), 4, dtype=torch.long),
                                 two_colour_image(), boxes, "thing")
    assert len(out) == len(boxes) and all(0.0 <= r <= 1.0 for r in out)


def test_box_format_reward_no_points():
    ok = '<answer>{"bbox": [0, 0, 1000, 1000]}</answer>'
    assert R.seg_box_format_reward(ok, 1000, 1000) == 1.0
    assert R.seg_box_format_reward(ok, 999, 1000) == 0.0                       # x2 outside the frame
    assert R.seg_box_format_reward('<answer>{"bbox": [-1, 0, 5, 5]}</answer>', 1000, 1000) == 0.0
    assert R.seg_box_format_reward('<answer>{"points": [[1, 2], [3, 4]]}</answer>', 1000, 1000) == 0.0
    assert R.seg_box_format_reward(None, 10, 10) == 0.0


def test_giou_ciou_hand_cases_match_mask_iou_stats():
    g1, p1 = square(10, 10, 0, 0, 4, 4), square(10, 10, 0, 0, 2, 4)    # 8 of 16 pixels: IoU 0.5
    g2 = square(10, 10, 5, 5, 7, 7)                                     # exact: 4 / 4
    g3 = square(10, 10, 0, 0, 1, 1)                                     # missed (unparsable): 0 / 1
    rows = []
    for p, g, box in ((p1, g1, [0, 0, 4, 2]), (g2.copy(), g2, [5, 5, 7, 7]), (None, g3, None)):
        inter, union = R.mask_counts(p, g)
        rows.append({"box": box, "inter": inter, "union": union, "box_iou": 0.0})
    assert [(r["inter"], r["union"]) for r in rows] == [(8, 16), (4, 4), (0, 1)]
    got = S.summarise(rows)
    # gIoU = (0.5 + 1 + 0) / 3 = 0.5;  cIoU = (8 + 4 + 0) / (16 + 4 + 1) = 12 / 21
    assert got["giou"] == approx(0.5) and got["ciou"] == approx(12 / 21)
    assert (got["giou"], got["ciou"]) == approx(R.mask_iou_stats([p1, g2, None], [g1, g2, g3]))
    assert got["unparsable"] == 1 and got["n"] == 3
    # an unparsable answer scores IoU 0 even against an empty mask (as mask_iou_stats); a parsed
    # answer whose mask is empty vs an empty GT is a perfect answer
    empty = np.zeros((3, 3), bool)
    counts = dict(zip(("inter", "union"), R.mask_counts(None, empty)))
    assert S.summarise([{"box": None, "box_iou": 0.0, **counts}])["giou"] == 0.0
    assert S.summarise([{"box": [0, 0, 1, 1], "box_iou": 0.0, **counts}])["giou"] == 1.0
    assert R.mask_iou_stats([None], [empty])[0] == 0.0 and R.mask_iou_stats([empty], [empty])[0] == 1.0


def test_critic_score_parsing():
    assert rewards.parse_score('{"score": 0.7}') == 0.7
    assert rewards.parse_score('The answer: {"score": 1}') == 1.0
    assert rewards.parse_score('{"score": 1.5}') is None and rewards.parse_score('{"score": -3}') is None
    for bad in ("", "no idea", '{"score": NaN}', '{"score": "high"}', '{"scores": }', None, "9" * 5000):
        assert rewards.parse_score(bad) is None


def test_normalised_answer_match():
    assert rewards.normalise_answer(" The Red. ") == "red" == rewards.normalise_answer("red")
    assert rewards.normalise_answer("red or blue") != rewards.normalise_answer("red")


# ====================================================================================================
# data.py: the shapes world, manifests and their checks, images, the shapes world's prompts
# ====================================================================================================

def _pixels(rec):
    return np.asarray(Image.open(rec["image_path"]).convert("RGB"))


def _colour_mask(img, name):
    return np.all(img == np.array(data.COLORS[name], dtype=np.uint8), axis=-1)


GOOD_CLS = {"id": "ok", "image": "ok.png", "classes": ["a", "b"], "probs": [0.5, 0.5]}


GOOD_DET = {"id": "ok", "image": "ok.png", "target": "the cat", "boxes": [[1, 2, 30, 40]]}


BAD = [  # (schema, bad line, words the message must contain)
    ("cls", '{"id": "x", "image": ', "invalid JSON"),
    ("cls", '["not", "an", "object"]', "not a JSON object"),
    ("cls", {"id": "x", "image": "ok.png", "classes": ["a"]}, "missing field(s): probs"),
    ("cls", dict(GOOD_CLS, id="x", image="nowhere.png"), "image file not found"),
    ("cls", dict(GOOD_CLS, id="x", image="broken.png"), "unreadable image"),
    ("cls", dict(GOOD_CLS, id="x", probs=[1.2, -0.2]), "negative probability"),
    ("cls", dict(GOOD_CLS, id="x", probs=[0.5, 0.6]), "sum to 1.1000"),
    ("cls", dict(GOOD_CLS, id="x", probs=[0.5, 0.3, 0.2]), "2 classes but 3 probs"),
    ("cls", '{"id": "x", "image": "ok.png", "classes": ["a", "b"], "probs": [NaN, 1]}',
     "non-finite"),
    ("cls", GOOD_CLS, "duplicate id 'ok' (first on line 1)"),
    ("det", dict(GOOD_DET, id="x", boxes=[[10, 10, 10, 20]]), "degenerate"),
    ("det", dict(GOOD_DET, id="x", boxes=[[10, 10, 5, 20]]), "degenerate"),
    ("det", dict(GOOD_DET, id="x", boxes=[[-1, 10, 5, 20]]), "negative coordinate"),
    ("det", dict(GOOD_DET, id="x", boxes=[[1, 2, 3]]), "not 4 numbers"),
    ("det", dict(GOOD_DET, id="x", boxes=[[1, 2, "3", 4]]), "not 4 numbers"),
    ("det", dict(GOOD_DET, id="x", boxes=[]), "non-empty list"),
    ("seg", {"id": "x", "image": "ok.png", "instruction": "it", "mask": "no.png"},
     "mask file not found"),
    ("seg", {"id": "x", "image": "ok.png", "instruction": "it", "box": [5, 5, 5, 9]},
     "degenerate"),
    ("seg", {"id": "x", "image": "ok.png", "instruction": "it", "mask": "empty_mask.png"}, "is empty"),
    ("seg", {"id": "x", "image": "ok.png", "instruction": "it", "mask": "small_mask.png"},
     "is 10x10 but the image is 50x50"),
    ("seg", {"id": "x", "image": "ok.png", "instruction": "it", "mask": "broken.png"}, "unreadable mask"),
    ("vqa", {"id": "x", "image": "ok.png", "question": "What?"}, "missing field(s): answer"),
    ("vqa", {"id": "x", "image": "ok.png", "question": "What?", "answer": ""}, "answer"),
]


GOOD = {"cls": GOOD_CLS, "det": GOOD_DET,
        "seg": {"id": "ok", "image": "ok.png", "instruction": "it"},
        "vqa": {"id": "ok", "image": "ok.png", "question": "What?", "answer": "red"}}


def _oriented(path, orientation):
    """A 200x100 stored image: red top-left 40x20 block, blue bottom-right 40x20 block, grey
    elsewhere, saved with an EXIF Orientation tag."""
    im = Image.new("RGB", (200, 100), (128, 128, 128))
    im.paste((255, 0, 0), (0, 0, 40, 20))
    im.paste((0, 0, 255), (160, 80, 200, 100))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, exif=exif, **({"quality": 95} if path.suffix == ".jpg" else {}))
    return path


def _chunk(kind, body):
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def _chunks(png):
    """A PNG file's chunks, [(type, data)], in file order."""
    chunks, at = [], 8
    while at < len(png):
        length = int.from_bytes(png[at:at + 4], "big")
        chunks.append((png[at + 4:at + 8], png[at + 8:at + 8 + length]))
        at += 12 + length
    return chunks


def _bomb_png(path, side=20000):
    """A valid 1-bit PNG whose header says side x side pixels (4e8 > 2 x PIL's MAX_IMAGE_PIXELS), ~50 KB."""
    z, rows = zlib.compressobj(9), bytes((1 + side // 8) * 1000)       # 1000 zero rows (filter byte + pixels)
    idat = b"".join(z.compress(rows) for _ in range(side // 1000)) + z.flush()
    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


NUMBER_WORDS = re.compile(r"\b(zero|one|two|three|four|five|six|seven|eight|nine|ten|half|"
                          r"quarter|third|percent|hundred|dozen|single|pair|twice)\b", re.I)


NAMES = re.compile(r"\b(" + "|".join(list(data.COLORS) + data.SHAPES) + r")s?\b", re.I)


def test_same_seed_same_bytes_different_seed_differs(world, tmp_path):
    first = _hashes(world)
    n_images = N_TRAIN + 2 * N_TEST                                         # train, val (n_test scenes), test
    assert len(first) == len(data.SHAPE_TASKS) * (3 + n_images) + n_images   # + seg masks
    data.make_shapes_world(tmp_path / "again", N_TRAIN, N_TEST, seed=0)
    assert _hashes(tmp_path / "again") == first
    data.make_shapes_world(tmp_path / "other", N_TRAIN, N_TEST, seed=1)
    other = _hashes(tmp_path / "other")
    assert set(other) == set(first)
    assert sum(other[k] != first[k] for k in first) > len(first) // 2
    for task in data.SHAPE_TASKS:                   # train, val and test are different streams
        assert len({first[f"{task}/images/{split}_00000.png"] for split in ("train", "val", "test")}) == 3
    data.make_shapes_world(tmp_path / "more_val", N_TRAIN, N_TEST, seed=0, n_val=N_TEST + 3)
    more_val = _hashes(tmp_path / "more_val")         # the validation split's size changes no other file
    assert all(more_val[k] == v for k, v in first.items() if "val" not in k)


def test_cli_matches_function(tmp_path):
    cmd = [sys.executable, str(ROOT / "data.py"), "shapes", "--out", str(tmp_path / "cli"),
           "--n-train", "3", "--n-test", "2", "--seed", "7"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    data.make_shapes_world(tmp_path / "fn", 3, 2, 7)
    assert _hashes(tmp_path / "cli") == _hashes(tmp_path / "fn")


@pytest.mark.parametrize("task", data.SHAPE_TASKS)
def test_every_manifest_is_valid_and_scenes_are_sane(world, task):
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        recs = _records(world, task, split)
        assert [r["id"] for r in recs] == [f"{task}-{split}-{i:05d}" for i in range(n)]
        for r in recs:
            img = Image.open(r["image_path"])
            assert img.mode == "RGB" and img.size == (data.IMAGE_SIZE, data.IMAGE_SIZE)
            px = np.asarray(img)
            bg = px[~np.any(np.stack([_colour_mask(px, c) for c in data.COLORS]), axis=0)]
            assert (bg == bg[0]).all() and 200 <= bg[0, 0] <= 245 and len(set(bg[0])) == 1
            boxes = [s["box"] for s in r["scene"]]
            for b in boxes:
                assert data.box_problem(b) is None and max(b) <= data.IMAGE_SIZE
                assert b[2] - b[0] == b[3] - b[1] and all(isinstance(v, int) for v in b)
            for i in range(len(boxes)):
                for j in range(i):
                    assert data._apart(boxes[i], boxes[j])


def test_soft_cls_probs_match_pixel_areas(world):
    for r in _records(world, "soft_cls") + _records(world, "soft_cls", "test"):
        assert r["classes"] == ["red", "green", "blue", "yellow"]
        img = _pixels(r)
        areas = np.array([_colour_mask(img, c).sum() for c in r["classes"]], dtype=float)
        shape_pixels = (~((img[..., 0] == img[..., 1]) & (img[..., 1] == img[..., 2]))).sum()
        assert areas.sum() == shape_pixels > 0          # every non-grey pixel is a class colour
        probs = np.array(r["probs"])
        assert all(isinstance(p, float) for p in r["probs"])
        assert abs(probs.sum() - 1) < 1e-9 and np.allclose(probs * 100, np.round(probs * 100))
        err = np.abs(probs - areas / areas.sum())
        assert err.max() <= 0.02 + 1e-9 and (err > 0.005 + 1e-9).sum() <= 1
        assert 2 <= len(r["scene"]) <= 4


def test_onehot_cls_names_the_big_shape(world):
    for r in _records(world, "onehot_cls"):
        big = max(r["scene"], key=lambda s: s["box"][2] - s["box"][0])
        assert r["classes"] == data.SHAPES
        assert r["probs"] == [1.0 if k == big["shape"] else 0.0 for k in data.SHAPES]
        assert 40 <= big["box"][2] - big["box"][0] <= 56
        small = [s for s in r["scene"] if s is not big]
        assert 1 <= len(small) <= 2
        assert all(s["shape"] != big["shape"] and s["box"][2] - s["box"][0] <= 20 for s in small)


def test_det_target_is_unique(world):
    for r in _records(world, "det"):
        colour, kind = re.fullmatch(r"the (\w+) (\w+)", r["target"]).groups()
        pairs = [(s["color"], s["shape"]) for s in r["scene"]]
        assert len(set(pairs)) == len(pairs) and 2 <= len(pairs) <= 4
        match = [s for s in r["scene"] if (s["color"], s["shape"]) == (colour, kind)]
        assert len(match) == 1 and r["boxes"] == [match[0]["box"]]
        x1, y1, x2, y2 = match[0]["box"]
        assert _colour_mask(_pixels(r)[y1:y2, x1:x2], colour).any()


def test_multi_det_boxes_are_all_of_the_kind(world):
    plural = {v: k for k, v in data.PLURAL.items()}
    for r in _records(world, "multi_det"):
        kind = plural[r["target"]]
        of_kind = [s["box"] for s in r["scene"] if s["shape"] == kind]
        assert sorted(r["boxes"]) == sorted(of_kind) and 1 <= len(of_kind) <= 3
        assert 1 <= len(r["scene"]) - len(of_kind) <= 2


def test_seg_mask_is_exactly_the_target_pixels(world):
    for r in _records(world, "seg") + _records(world, "seg", "test"):
        colour, kind = re.fullmatch(r"the (\w+) (\w+)", r["instruction"]).groups()
        assert sum((s["color"], s["shape"]) == (colour, kind) for s in r["scene"]) == 1
        mask_img = Image.open(r["mask_path"])
        assert mask_img.mode == "L" and r["mask"].startswith("masks/")
        mask = np.asarray(mask_img)
        assert set(np.unique(mask)) <= {0, 255}
        x1, y1, x2, y2 = r["box"]
        expected = np.zeros(mask.shape, bool)
        expected[y1:y2, x1:x2] = _colour_mask(_pixels(r)[y1:y2, x1:x2], colour)
        assert expected.any() and np.array_equal(mask > 0, expected)
        ys, xs = np.nonzero(mask)                    # the box is the mask's tight extent
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [x1, y1, x2, y2]


def test_vqa_answer_matches_the_quadrant_shape(world):
    half = data.IMAGE_SIZE // 2
    for r in _records(world, "vqa") + _records(world, "vqa", "test"):
        m = re.fullmatch(r"What (colour is the shape|shape is) in the (top|bottom)-(left|right)\?",
                         r["question"])
        assert m, r["question"]
        row, col = m.group(2) == "bottom", m.group(3) == "right"
        quads = [((s["box"][1] >= half), (s["box"][0] >= half)) for s in r["scene"]]
        assert sorted(quads) == [(False, False), (False, True), (True, False), (True, True)]
        shape = r["scene"][quads.index((row, col))]
        assert r["box"] == shape["box"]
        x1, y1, x2, y2 = shape["box"]
        inside = _pixels(r)[y1:y2, x1:x2]
        if m.group(1).startswith("colour"):
            assert r["answer"] == shape["color"] and _colour_mask(inside, r["answer"]).any()
        else:
            assert r["answer"] == shape["shape"]


@pytest.mark.parametrize("schema,line,words", BAD, ids=[b[2] for b in BAD])
def test_bad_record_names_file_and_line(folder, schema, line, words):
    path = _write(folder, [GOOD[schema], "", line])          # blank line 2: the bad one is line 3
    with pytest.raises(data.ManifestError) as info:
        data.read_manifest(path, schema)
    assert isinstance(info.value, ValueError) and info.value.line == 3
    assert str(info.value).startswith(f"{path}:3: ") and words in str(info.value)


@pytest.mark.parametrize("schema", ["cls", "det", "seg", "vqa"])
def test_skip_bad_skips_counts_and_warns(folder, schema, capsys):
    bad = [line for t, line, _ in BAD if t == schema]
    last_good = dict(GOOD[schema], id="last")
    path = _write(folder, [GOOD[schema]] + bad + [last_good])
    recs, skipped = data.read_manifest(path, schema, skip_bad=True)
    assert [r["id"] for r in recs] == ["ok", "last"] and skipped == len(bad)
    err = capsys.readouterr().err
    for lineno in range(2, 2 + len(bad)):
        assert f"{path}:{lineno}: " in err
    assert f"skipped {len(bad)} bad record(s)" in err


def test_read_manifest_keeps_fields_and_adds_absolute_paths(folder):
    m = np.zeros((50, 50), np.uint8)
    m[5:9, 5:9] = 255
    Image.fromarray(m).save(folder / "m.png")
    rec = {"id": 3, "image": "ok.png", "instruction": "the ünïcode thing", "mask": "m.png",
           "extra": {"k": [1]}}
    path = folder / "sub" / "x.jsonl"
    (folder / "sub").mkdir()
    data.write_jsonl(path, [dict(rec, image="../ok.png", mask="../m.png")])
    assert "ünïcode" in path.read_text(encoding="utf-8") and path.read_text().count("\n") == 1
    assert list(json.loads(path.read_text())) == ["id", "image", "instruction", "mask", "extra"]
    (out,), skipped = data.read_manifest(path, "seg")
    assert skipped == 0 and out["extra"] == {"k": [1]} and out["image"] == "../ok.png"
    assert Path(out["image_path"]).is_absolute() and Path(out["image_path"]).is_file()
    assert Path(out["mask_path"]).is_file()
    with pytest.raises(ValueError):
        data.read_manifest(path, "soft_cls")


def test_open_image_composites_transparency_on_white(tmp_path):
    # A black drawing on a transparent background. convert("RGB") gives one
    # flat black image; composited on white the drawing survives.
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (5, 5, 15, 15))
    rgba.putpixel((0, 19), (255, 0, 0, 128))           # half-transparent red
    rgba.save(tmp_path / "drawing.png")
    flat = np.asarray(Image.open(tmp_path / "drawing.png").convert("RGB"))
    assert (flat[:19] == 0).all()                      # drawing and background: both black
    got = np.asarray(data.open_image(tmp_path / "drawing.png")).astype(int)
    expected = np.full((20, 20, 3), 255)
    expected[5:15, 5:15] = 0
    expected[19, 0] = [255, 127, 127]          # 255*128/255 + 255*127/255, 0 + 255*127/255
    assert np.abs(got - expected).max() <= 1
    # A palette PNG whose index 0 is transparent (a "tRNS" key) and a grey + alpha image.
    pal = Image.new("P", (12, 8), 0)
    pal.putpalette([0, 0, 0, 40, 80, 220] + [0] * 762)
    pal.paste(1, (6, 0, 12, 8))
    pal.save(tmp_path / "palette.png", transparency=0)
    got = np.asarray(data.open_image(tmp_path / "palette.png"))
    assert (got[:, :6] == 255).all() and (got[:, 6:] == [40, 80, 220]).all()
    la = Image.new("LA", (4, 4), (0, 0))
    la.putpixel((1, 2), (60, 255))
    got = np.asarray(data.open_image(la))
    assert got.shape == (4, 4, 3) and (got[2, 1] == 60).all() and (got.sum(-1) == 765).sum() == 15
    opaque = Image.new("RGB", (3, 3), (1, 2, 3))
    assert np.array_equal(np.asarray(data.open_image(opaque)), np.asarray(opaque))


@pytest.mark.parametrize("orientation, name, size, red, blue", [
    # 6: rotate 90 degrees clockwise to display: stored (x, y) -> displayed (99 - y, x), so the
    # red block (x 0..39, y 0..19) lands at x 80..99, y 0..39 and the blue at x 0..19, y 160..199.
    (6, "photo.jpg", (100, 200), (slice(0, 40), slice(80, 100)), (slice(160, 200), slice(0, 20))),
    # 8: 90 degrees counter-clockwise: (x, y) -> (y, 199 - x).
    (8, "scan.png", (100, 200), (slice(160, 200), slice(0, 20)), (slice(0, 40), slice(80, 100))),
    # 3: 180 degrees: (x, y) -> (199 - x, 99 - y).
    (3, "upside.jpg", (200, 100), (slice(80, 100), slice(160, 200)), (slice(0, 20), slice(0, 40))),
])
def test_open_image_applies_exif_orientation(tmp_path, orientation, name, size, red, blue):
    path = _oriented(tmp_path / name, orientation)
    assert Image.open(path).size == (200, 100)            # stored
    image = data.open_image(path)
    assert image.size == size and image.mode == "RGB"
    a = np.asarray(image).astype(int)
    inner = lambda s: slice(s.start + 3, s.stop - 3)        # noqa: E731  (away from JPEG edges)
    assert np.abs(a[inner(red[0]), inner(red[1])] - [255, 0, 0]).max() < 30
    assert np.abs(a[inner(blue[0]), inner(blue[1])] - [0, 0, 255]).max() < 30
    assert data.open_image(image).size == size            # already upright: unchanged


def test_chat_inputs_see_transparent_images_on_white(tiny):
    """The processor gets the composited image whether it is given RGBA or the expected RGB."""
    _, processor = tiny
    rgba = Image.new("RGBA", (56, 56), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (14, 14, 42, 42))
    on_white = Image.new("RGB", (56, 56), (255, 255, 255))
    on_white.paste((0, 0, 0), (14, 14, 42, 42))
    conv = [[vlm.user_turn("What is drawn?")]]
    a = vlm.chat_inputs(processor, conv, [[rgba]])["pixel_values"]
    b = vlm.chat_inputs(processor, conv, [[on_white]])["pixel_values"]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("encoding", list(MASK_ENCODINGS))
def test_read_mask_any_nonzero_pixel_is_the_object(encoding, tmp_path):
    truth = np.zeros((8, 12), bool)
    truth[2:6, 3:9] = True
    truth[7, 11] = True
    MASK_ENCODINGS[encoding](truth).save(tmp_path / "m.png")
    got = data.read_mask(tmp_path / "m.png")
    assert got.dtype == bool and got.shape == (8, 12)
    np.testing.assert_array_equal(got, truth)            # 25 pixels, in every encoding
    Image.new("RGB", (12, 8)).save(tmp_path / "im.png")
    path = _write(tmp_path, [{"id": 1, "image": "im.png", "instruction": "it", "mask": "m.png"}])
    assert len(data.read_manifest(path, "seg")[0]) == 1   # a valid manifest record in every encoding


# ==== faults real runs meet: empty manifests, a manifest's task, boxes past the image, 16-bit and float
# grey images, decompression bombs and truncated files, SAM2 config names, every EOS a checkpoint declares
def test_manifest_without_usable_records_names_the_file(folder):
    empty = _write(folder, [], "empty.jsonl")
    blank = _write(folder, ["", "  "], "blank.jsonl")
    for path in (empty, blank):
        with pytest.raises(data.NoRecordsError, match=f"^no usable records in {re.escape(str(path))}: the file "
                                                      "holds no record"):
            data.read_manifest(path, "cls")
    bad = _write(folder, [dict(GOOD_CLS, probs=[0.5, 0.6]), dict(GOOD_CLS, id="x", image="nowhere.png")])
    with pytest.raises(data.ManifestError, match=r":1: probs sum to 1\.1000"):     # without --skip-bad: line 1
        data.read_manifest(bad, "cls")
    with pytest.raises(data.NoRecordsError) as info:
        data.read_manifest(bad, "cls", skip_bad=True)
    assert isinstance(info.value, data.ManifestError) and isinstance(info.value, ValueError)
    assert str(info.value) == (f"no usable records in {bad}: all 2 record(s) are bad (the first: {bad}:1: probs "
                               "sum to 1.1000, not 1)")


def test_manifest_task_is_told_by_every_record_not_the_first_line(folder):
    cls = _write(folder, ["", GOOD_CLS, dict(GOOD_CLS, id="b")], "cls.jsonl")      # blank first line
    assert "probs" not in cls.open().readline()
    assert data.manifest_task(cls) == "cls"
    assert [r["id"] for r in run.records(cls, False, allowed=("cls", "det"))[0]] == ["ok", "b"]   # the RISE scripts' call
    for schema, rec in GOOD.items():
        assert data.manifest_task(_write(folder, ['{"id": ', {"id": 9}, rec], f"{schema}.jsonl")) == schema
    mixed = _write(folder, [GOOD_CLS, "", dict(GOOD_DET, id="d")], "mixed.jsonl")
    with pytest.raises(data.ManifestError, match=r'mixed\.jsonl:3: a det record \(field "boxes"\) in a cls '
                                                 r"manifest \(line 1\)"):
        data.manifest_task(mixed)
    seg = _write(folder, [GOOD["seg"]], "seg.jsonl")
    with pytest.raises(data.ManifestError, match=r"seg\.jsonl:1: a seg manifest, but this takes cls or det"):
        data.manifest_task(seg, allowed=("cls", "det"))
    with pytest.raises(data.NoRecordsError, match="the file holds no record"):
        data.manifest_task(_write(folder, [""], "none.jsonl"))
    with pytest.raises(data.NoRecordsError, match='no record has one of the fields that tell the task \\("probs"'):
        data.manifest_task(_write(folder, [{"id": 1, "image": "ok.png"}], "untold.jsonl"))


def test_box_past_the_displayed_image_is_a_bad_record(folder, monkeypatch):
    # ok.png is 50x50; a box may reach BOX_SLACK = 1 px past it (annotation rounding), no more
    fits = [dict(GOOD_DET, boxes=[[10, 10, 50, 50]]), dict(GOOD_DET, id="b", boxes=[[10, 10, 51, 50.5]])]
    assert len(data.read_manifest(_write(folder, fits), "det")[0]) == 2
    past = [("det", dict(GOOD_DET, id="x", boxes=[[1, 2, 30, 40], [10, 10, 60, 40]], multi=True), "[10, 10, 60, 40]"),
            ("det", dict(GOOD_DET, id="x", boxes=[[10, 10, 40, 51.5]]), "[10, 10, 40, 51.5]"),
            ("seg", dict(GOOD["seg"], id="x", box=[0, 0, 10, 90]), "[0, 0, 10, 90]"),
            ("vqa", dict(GOOD["vqa"], id="x", box=[45, 0, 70, 10]), "[45, 0, 70, 10]")]
    for schema, rec, box in past:
        path = _write(folder, [GOOD[schema], rec])
        with pytest.raises(data.ManifestError) as info:
            data.read_manifest(path, schema)
        assert info.value.line == 2 and info.value.reason == (
            f"box {box} reaches past the 50x50 image {folder / 'ok.png'} (its size as displayed, EXIF orientation "
            "applied)")
        assert data.read_manifest(path, schema, skip_bad=True)[1] == 1
    # stored 200x100, displayed 100x200 (EXIF orientation 6): boxes are checked in the displayed frame
    _oriented(folder / "turned.jpg", 6)
    tall, wide = [0, 0, 90, 190], [0, 0, 150, 50]          # fits the displayed / only the stored image
    path = _write(folder, [dict(GOOD_DET, image="turned.jpg", boxes=[tall]),
                           dict(GOOD_DET, id="w", image="turned.jpg", boxes=[wide])])
    with pytest.raises(data.ManifestError, match=r":2: box \[0, 0, 150, 50\] reaches past the 100x200 image"):
        data.read_manifest(path, "det")
    # a PNG may hold its EXIF after the pixel data: found by seeking, without decoding the pixels
    png = _chunks(_oriented(folder / "turned.png", 6).read_bytes())
    kinds = [kind for kind, _ in png]
    assert kinds.index(b"eXIf") < kinds.index(b"IDAT")                    # where PIL writes it
    png.insert(-1, png.pop(kinds.index(b"eXIf")))                          # now just before IEND
    (folder / "late.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(_chunk(kind, body) for kind, body in png))
    assert data.open_image(folder / "late.png").size == (100, 200)        # PIL finds it after decoding
    path = _write(folder, [dict(GOOD_DET, image="late.png", boxes=[tall]),
                           dict(GOOD_DET, id="w", image="late.png", boxes=[wide])])
    with monkeypatch.context() as m:
        m.setattr(PngImagePlugin.PngImageFile, "load", None)              # no decode on the way
        with pytest.raises(data.ManifestError, match=r":2: box \[0, 0, 150, 50\] reaches past the 100x200"):
            data.read_manifest(path, "det")


def test_grey_images_of_more_than_8_bits_scale_to_8_bits(tmp_path):
    # 16-bit: round(v / 257); by hand 128 -> 0 (0.498), 129 -> 1 (0.502), 257 * 100 -> 100, 65535 -> 255
    a = np.array([[0, 128, 129, 25700], [40000, 65535, 1000, 7]], np.uint16)
    Image.fromarray(a).save(tmp_path / "scan.png")
    assert Image.open(tmp_path / "scan.png").mode == "I;16"
    assert np.asarray(Image.open(tmp_path / "scan.png").convert("RGB"))[1, 0, 0] == 255   # PIL clips, 40000 -> 255
    expected = np.array([[0, 0, 1, 100], [156, 255, 4, 0]])          # 40000 / 257 = 155.6, 1000 / 257 = 3.9
    np.testing.assert_array_equal(expected, np.round(a / 257))
    older_pillow = Image.fromarray(a.astype(np.int32))           # Pillow < 10.3 opens a 16-bit PNG as "I"
    older_pillow.format = "PNG"
    for image in (tmp_path / "scan.png", Image.fromarray(a.astype(">u2")), older_pillow):   # I;16, I;16B, I
        got = np.asarray(data.open_image(image))
        assert got.shape == (2, 4, 3) and (got == expected[..., None]).all()
    # 32-bit integer and float: the image's min..max onto 0..255, round((v - min) * 255 / (max - min))
    ints = np.array([[-3000, -2000, 0], [2500, 5000, 8000]], np.int32)        # range 11000
    Image.fromarray(ints).save(tmp_path / "depth.tif")
    assert Image.open(tmp_path / "depth.tif").mode == "I"
    got = np.asarray(data.open_image(tmp_path / "depth.tif"))[..., 0]
    # by hand: 1000 * 255 / 11000 = 23.2, 3000 -> 69.5, 5500 -> 127.5 (half to even: 128), 8000 -> 185.5
    np.testing.assert_array_equal(got, [[0, 23, 70], [128, 185, 255]])
    floats = np.array([[0.25, np.nan, 1.0], [0.5, 0.75, 0.25]], np.float32)
    Image.fromarray(floats).save(tmp_path / "ratio.tif")
    got = np.asarray(data.open_image(tmp_path / "ratio.tif"))[..., 0]
    np.testing.assert_array_equal(got, [[0, 0, 255], [85, 170, 0]])     # NaN counts as the minimum
    assert (np.asarray(data.open_image(Image.fromarray(np.full((2, 2), 7.0, np.float32)))) == 7).all()
    # a 16-bit transparency key (PNG tRNS) is composited on white like any transparency
    Image.fromarray(a).save(tmp_path / "keyed.png", transparency=1000)
    got = np.asarray(data.open_image(tmp_path / "keyed.png"))[..., 0]
    np.testing.assert_array_equal(got, np.where(a == 1000, 255, expected))


def test_unreadable_images_one_rule_bad_header_bad_record_bad_pixels_skipped_sample(folder, tiny, monkeypatch):
    _bomb_png(folder / "bomb.png")
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "photo.jpg", quality=90)                 # ~25 KB, mostly pixel data
    whole = (folder / "photo.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(whole[:len(whole) // 2])                  # truncated in its pixel data
    Image.new("RGB", (40, 40)).save(folder / "big.png")                        # over the lowered limit below
    path = _write(folder, [GOOD_CLS, dict(GOOD_CLS, id="bomb", image="bomb.png"),
                           dict(GOOD_CLS, id="cut", image="cut.jpg")])
    # the header check: a decompression bomb is a bad record (file:line, or a counted skip) ...
    with pytest.raises(data.ManifestError, match=r":2: unreadable image .*bomb\.png: DecompressionBombError: Image "
                                                 r"size \(400000000 pixels\).*MAX_IMAGE_PIXELS"):
        data.read_manifest(path, "cls")
    records, skipped = data.read_manifest(path, "cls", skip_bad=True)
    assert [r["id"] for r in records] == ["ok", "cut"] and skipped == 1       # the cut JPEG's header is fine
    # ... and so is an image over MAX_IMAGE_PIXELS but under twice it (PIL only warns)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)                      # 40 x 40 = 1600 pixels
    with pytest.raises(data.ManifestError, match=r":1: unreadable image .*big\.png: DecompressionBombWarning"):
        data.read_manifest(_write(folder, [dict(GOOD_CLS, image="big.png")], "big.jsonl"), "cls")
    with pytest.raises(data.UnreadableImage, match="DecompressionBombWarning"):
        data.open_image(folder / "big.png")
    monkeypatch.undo()
    # failing when decoded: open_image raises an OSError naming the file; the pre-scan skips and counts it
    with pytest.raises(data.UnreadableImage, match=r"unreadable image .*cut\.jpg: OSError: image file is truncated"):
        data.open_image(folder / "cut.jpg")
    model, processor = tiny
    problem = lambda r: vlm.prompt_problem(processor, [vlm.user_turn("What is it?")], [r["image_path"]])  # noqa: E731
    assert "DecompressionBombError" in problem({"image_path": folder / "bomb.png"})      # a reason, not raised
    bomb = {"id": "bomb", "image_path": str(folder / "bomb.png"), "question": "What colour is it?"}
    assert run.partition([bomb], lambda r: visrl.sample_problem(r, processor))[1][0][1].startswith(
        "UnreadableImage: unreadable image")                     # VisRL's and Seg-RISE's evaluations: OSError
    test = records + [bomb]
    kept, bad = run.usable(test, problem, 0, 1, split="test")
    assert [r["id"] for r in kept] == ["ok"] and [b["id"] for b in bad] == ["cut", "bomb"]
    assert all(b["reason"].startswith("UnreadableImage: unreadable image ") for b in bad)


def test_formatting_helpers():
    classes = ["red", "green", "blue", "yellow"]
    assert data.format_probs(classes, [0.5, 0.0, 0.25, 0.25]) == \
        '{"red": 0.50, "green": 0.00, "blue": 0.25, "yellow": 0.25}'
    assert data.format_probs(["a"], [-0.0]) == '{"a": 0.00}'
    assert data.format_box([12, 40.2, 56, 90]) == "[12,40,56,90]"
    assert data.format_boxes([[12, 40, 56, 90], [1, 2, 3, 4]]) == "[[12,40,56,90],[1,2,3,4]]"
    assert data.format_norm_box([0, 28, 56, 112], 112, 112) == "[0.00,0.25,0.50,1.00]"
    assert data.class_list(classes) == "red, green, blue, yellow"
    assert data.cot_prompt_cls(["a", "b"], [1, 0]).endswith(
        "Do not write any numbers or class names.")
    assert data.cot_prompt_cls(["a", "b"], [1, 0], mask_names=False).startswith(
        'The answer is {"a": 1.00, "b": 0.00}. Describe the image')
    assert data.cot_prompt_det("the red circle", [[1, 2, 3, 4]]).startswith(
        "The red circle is at [1,2,3,4]. Describe where it is")
    assert data.cot_prompt_det("circles", [[1, 2, 3, 4]], multi=True).startswith(
        "The circles are at [[1,2,3,4]].")
    assert data.SEG_PROMPT.format(instruction="the red circle").endswith(
        'with JSON {"bbox": [x1,y1,x2,y2], "points": [[x,y],[x,y]]} (two points inside the object): the box '
        'of the red circle.')
    # every box prompt the policy answers ends with the look question's words (the tiny base reads the box there)
    for style in ("r1", "plain"):
        assert data.prompt(style, {"target": "the red circle", "boxes": [[1, 2, 3, 4]], "scene": []}).endswith(
            "[x1,y1,x2,y2]: the box of the red circle.")
    assert data.CRITIC_BOX_PROMPT.format(question="Q?", answer="red").endswith(
        'Reply with JSON {"score": x}, x between 0 and 1.')
    assert data.REC_PROMPT_MULTI_DET.format(cot="c", target="circles").endswith(
        "answer with [[x1,y1,x2,y2], ...]: the boxes of all circles.")


def test_prompt_picks_the_template_of_the_record_task():
    cls = {"classes": ["red", "blue"], "probs": [0.75, 0.25], "scene": []}
    det = {"target": "the red circle", "boxes": [[1, 2, 3, 4]], "scene": []}
    multi = {"target": "circles", "boxes": [[1, 2, 3, 4], [5, 6, 7, 8]], "multi": True, "scene": []}
    assert data.prompt("plain", cls) == "Give as JSON the probability of each class in red, blue."
    assert data.prompt("r1", cls) == data.R1_PROMPT_CLS.format(class_list="red, blue")
    assert data.prompt("rec", cls, cot="C") == data.REC_PROMPT_CLS.format(cot="C", class_list="red, blue")
    assert data.prompt("cot", cls, mask_names=False) == (
        'The answer is {"red": 0.75, "blue": 0.25}. Describe the image so that someone could infer this answer '
        'from your description alone, in at most 60 words. Do not write any numbers.')
    assert data.prompt("plain", det) == "Answer with [x1,y1,x2,y2]: the box of the red circle."
    assert data.prompt("r1", multi) == data.R1_PROMPT_MULTI_DET.format(target="circles")
    assert data.prompt("rec", multi, cot="C") == data.REC_PROMPT_MULTI_DET.format(cot="C", target="circles")
    # the CoT prompt states the boxes it is given (the model's frame), not the record's pixels
    assert data.prompt("cot", det, boxes=[[10, 20, 30, 40]]) == data.COT_PROMPT_DET.format(
        target="red circle", annotation="[10,20,30,40]", max_words=60)
    # Seg-RISE and VisRL: a shapes-world record (it carries its "scene") gets the shapes world's wording
    assert data.prompt("seg", {"instruction": "x", "scene": []}) == data.SEG_PROMPT.format(instruction="x")
    assert data.prompt("seg_no_cot", {"instruction": "x", "scene": []}) == \
        data.SEG_PROMPT_NO_COT.format(instruction="x")
    assert data.prompt("visrl", {"question": "Q?", "scene": []}) == data.VISRL_BOX_PROMPT.format(question="Q?")
    # VisRL (arXiv 2503.07523) sec. 4.1, Settings: the CoT prompt added to the question, word for word
    assert data.prompt("visrl", {"question": "Q?", "scene": []}).startswith(
        "Please first provide the bounding box coordinate of the region, then refer to the corresponding "
        "sub-image to answer the question better.")
    with pytest.raises(KeyError):
        data.prompt("seg", cls)


def test_every_prompt_ends_with_what_to_look_for():
    """The target, instruction, question or class list is the last thing a prompt says, right before the
    image in the tiny chat template: the tiny base finds a named shape only then (README, "the tiny base":
    its box IoU in scenes fell from 0.37 to 0.19 with "Please." after the name, to 0.09 with a sentence)."""
    det = {"target": "the red circle", "boxes": [[1, 2, 3, 4]], "scene": []}
    multi = {"target": "circles", "boxes": [[1, 2, 3, 4]], "multi": True, "scene": []}
    cls = {"classes": ["red", "blue"], "probs": [0.75, 0.25], "scene": []}
    for style in ("rec", "r1", "plain"):
        assert data.prompt(style, det, cot="C", frame=(1000, 1000)).endswith("the red circle.")
        assert data.prompt(style, multi, cot="C").endswith("circles.")
        assert data.prompt(style, cls, cot="C").endswith("red, blue.")
    for style in ("seg", "seg_no_cot"):
        assert data.prompt(style, {"instruction": "the dog on the left", "scene": []}).endswith("the dog on the left.")
    assert data.prompt("visrl", {"question": "What colour is it?", "scene": []}).endswith("What colour is it?")


def test_prompt_never_tells_the_number_of_objects():
    """RISE (arXiv 2508.13229) sec. 4: the COCO-Sub prompt is the dataset's, not the label's. A record of a
    multi-object dataset with ONE box still gets the box-list template and a list answer; a single-object
    record gets the one-box template; a single-object record with two boxes is a manifest error."""
    one_of_many = {"target": "circles", "boxes": [[1, 2, 3, 4]], "multi": True, "scene": []}
    two_of_many = {"target": "circles", "boxes": [[1, 2, 3, 4], [5, 6, 7, 8]], "multi": True, "scene": []}
    for style in ("r1", "plain"):
        assert data.prompt(style, one_of_many) == data.prompt(style, two_of_many)
    assert data.prompt("plain", one_of_many) == "Answer with [[x1,y1,x2,y2], ...]: the boxes of all circles."
    assert data.format_annotation(one_of_many, [[1, 2, 3, 4]]) == "[[1,2,3,4]]"
    assert data.format_annotation({"target": "the red circle"}, [[1, 2, 3, 4]]) == "[1,2,3,4]"
    bad = {"id": "a", "image": "x.png", "target": "the red circle", "boxes": [[1, 2, 3, 4], [5, 6, 7, 8]]}
    assert "multi" in data._record_problem(bad, "det", Path("."), set())


def test_box_prompts_state_the_model_frame():
    """A real checkpoint is told its box frame: 1000x1000 for Qwen2-VL, the resized input's pixels for
    Qwen2.5-VL (640x480 at max 401,408 pixels -> smart_resize 644x476, multiples of 28)."""
    assert vlm.box_frame("qwen2_vl", (640, 480)) == (1000, 1000)

    class Proc:   # the three numbers of a Qwen2.5-VL image processor that smart_resize reads
        image_processor = type("IP", (), {"patch_size": 14, "merge_size": 2,
                                          "size": {"shortest_edge": 3136, "longest_edge": 401408}})
    assert vlm.box_frame("qwen2_5_vl", (640, 480), Proc) == (644, 476)
    det = {"target": "the red circle", "boxes": [[1, 2, 3, 4]], "scene": []}
    assert data.prompt("r1", det, frame=(1000, 1000)).startswith("The image is of resolution 1000x1000. Think in")
    assert data.prompt("seg", {"instruction": "x", "scene": []}, frame=(644, 476)).startswith(
        "The image is of resolution 644x476.")
    assert data.prompt("grounding", {"instruction": "the dog"}) == (
        "Locate the dog, output its bbox coordinates using JSON format.")
    cls = {"classes": ["a", "b"], "probs": [1.0, 0.0], "scene": []}
    assert "resolution" not in data.prompt("r1", cls, frame=(1000, 1000))    # no boxes, no frame


def test_position_word():
    s = data.IMAGE_SIZE
    assert data.position_word([0, 0, 10, 10]) == "top-left"
    assert data.position_word([50, 50, 60, 60]) == "centre"
    assert data.position_word([50, 0, 60, 10]) == "top"
    assert data.position_word([0, 50, 10, 60]) == "left"
    assert data.position_word([s - 10, s - 10, s, s]) == "bottom-right"
    assert data.position_word([50, 0, 60, 10], grid=2) == "top-left"
    assert data.position_word([60, 60, 70, 70], grid=2) == "bottom-right"


@settings(max_examples=25, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1), task=st.sampled_from(data.SHAPE_TASKS),
       with_names=st.booleans(), use_target=st.booleans())
def test_describe_scene_has_no_numbers(seed, task, with_names, use_target):
    scene = data.GENERATORS[task](np.random.default_rng(seed))[0]
    target = scene[seed % len(scene)] if use_target else None
    text = data.describe_scene(scene, np.random.default_rng(seed), with_names, target)
    assert text == data.describe_scene(scene, np.random.default_rng(seed), with_names, target)
    assert not re.search(r"\d", text) and not NUMBER_WORDS.search(text), text
    assert len(text.split()) <= 45 and text.endswith("."), text
    if with_names:
        assert all(s["color"] in text and s["shape"] in text
                   for s in ([target] if target else scene)), text
    else:
        assert not NAMES.search(text), text
    if target is not None:
        assert data.position_word(target["box"]) in text


# ====================================================================================================
# convert.py: the public datasets' own layouts -> manifests
# ====================================================================================================

def _portrait_photo(path, object_box=(60, 10, 96, 51)):
    """A photo displayed 100x200 with a red object at x 60..95, y 10..50, stored as a
    200x100 JPEG with EXIF Orientation 6 (turn 90 degrees clockwise to display)."""
    shown = Image.new("RGB", (100, 200), (128, 128, 128))
    shown.paste((220, 40, 40), object_box)
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    shown.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)   # 90 ccw
    return path


def _imagenet(root, per_class=4):
    for k in range(5):
        for n in range(per_class):
            _image(root / f"n0000000{k}" / f"n0000000{k}_{n}.JPEG", value=10 * k + n)
    names = root.parent / "LOC_synset_mapping.txt"
    names.write_text("n00000000 tench, Tinca tinca\nn00000001 goldfish\nn00000002 crane\n"
                     "n00000003 crane\nn00000004 great white shark, white shark\n")
    return names


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):          # unpickling this would run: touch <marker>
        return os.system, (f"touch '{self.marker}'",)


def test_emotion6_probs_stratified_split_and_determinism(tmp_path):
    root = _emotion6(tmp_path / "Emotion6")
    paths, skipped = convert.convert_emotion6(root, tmp_path / "a", seed=0)
    assert skipped == 0
    train, _ = data.read_manifest(paths["train"], "cls")
    test, _ = data.read_manifest(paths["test"], "cls")
    assert (len(train), len(test)) == (49, 21)           # 10 per folder -> 7 train / 3 test
    for emotion in convert.EMOTION6_CLASSES:
        assert sum(r["id"].startswith(f"emotion6-{emotion}-") for r in test) == 3
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    rec = {r["id"]: r for r in train + test}
    assert rec["emotion6-joy-3"]["probs"] == pytest.approx([p / 0.995 for p in ODD], abs=1e-12)
    assert rec["emotion6-fear-1"]["probs"] == [0, 0, 1, 0, 0, 0, 0]
    assert rec["emotion6-fear-1"]["classes"] == convert.EMOTION6_CLASSES
    assert (rec["emotion6-fear-1"]["valence"], rec["emotion6-fear-1"]["arousal"]) == (5.5, 4.25)
    assert rec["emotion6-anger-2"]["image"] == "../Emotion6/images/anger/2.jpg"   # relative
    convert.convert_emotion6(root, tmp_path / "b", seed=0)
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    convert.convert_emotion6(root, tmp_path / "c", seed=1)
    assert _ids(tmp_path / "c" / "test.jsonl") != _ids(paths["test"])


@pytest.mark.parametrize("line, why", [
    ("anger/1.jpg\t5\t5\t0.5\t0.3\t0\t0\t0\t0\t0", "sum to 0.8000"),
    ("anger/2.jpg\t5\t5\t1.1\t-0.1\t0\t0\t0\t0\t0", ">= 0"),
    ("anger/3.jpg\t5\t5\tx\t1\t0\t0\t0\t0\t0", "not a number"),
    ("anger/99.jpg\t5\t5\t1\t0\t0\t0\t0\t0\t0", "image file not found"),
    ("anger/4.jpg\t5\t5\t1\t0\t0\t0\t0\t0", "9 tab-separated fields"),
])
def test_emotion6_bad_lines(tmp_path, line, why):
    root = tmp_path / "E6"
    _emotion6(root)
    text = (root / "ground_truth.txt").read_text().splitlines()
    text[1] = line                                    # replaces anger/1.jpg, on line 2
    (root / "ground_truth.txt").write_text("\n".join(text) + "\n")
    with pytest.raises(data.ManifestError, match=rf"ground_truth\.txt:2: .*{why}"):
        convert.convert_emotion6(root, tmp_path / "out")
    paths, skipped = convert.convert_emotion6(root, tmp_path / "out", skip_bad=True)
    assert skipped == 1
    assert sum(len(_ids(p)) for p in paths.values()) == 69


def test_emotion6_cli(tmp_path, capsys):
    root = _emotion6(tmp_path / "E6")
    convert.main(["emotion6", "--root", str(root), "--out", str(tmp_path / "o"), "--seed", "3"])
    assert "49 records" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="ground_truth.txt"):
        convert.main(["emotion6", "--root", str(tmp_path), "--out", str(tmp_path / "o")])


def test_reasonseg_det_and_seg(tmp_path):
    src = tmp_path / "ReasonSeg" / "val"
    expected = _reasonseg(src)
    paths, skipped = convert.convert_reasonseg(src, tmp_path / "out")
    assert skipped == 0
    det, _ = data.read_manifest(paths["det"], "det")
    seg, _ = data.read_manifest(paths["seg"], "seg")
    # a's queries are questions (is_sentence): no target description yet -> needs_target.jsonl, not det;
    # b's phrase is the target, one sample per target shape, each with its own box
    assert [(r["id"], r["target"], r["boxes"]) for r in det] == [
        ("b-0-0", "the two cups", [[5, 5, 10, 10]]), ("b-0-1", "the two cups", [[40, 30, 51, 41]])]
    assert [(r["id"], r["question"], r["boxes"], r["target"]) for r in run.read_jsonl(paths["needs_target"])] == [
        ("a-0-0", "what holds the soup?", [[10, 10, 26, 21]], None), ("a-1-0", "the bowl", [[10, 10, 26, 21]], None)]
    assert [(r["id"], r["instruction"], r["box"]) for r in seg] == [
        ("a-0", "what holds the soup?", [10, 10, 26, 21]), ("a-1", "the bowl", [10, 10, 26, 21]),
        ("b-0", "the two cups", [5, 5, 51, 41])]
    assert det[0]["is_sentence"] is False and seg[0]["is_sentence"] is True
    for rec in seg:
        mask = np.asarray(Image.open(rec["mask_path"]))
        assert set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask == 255, expected[rec["id"][0]])
    assert det[0]["image"] == "../ReasonSeg/val/b.jpg"


@pytest.mark.parametrize("name, content, has_image, where", [
    ("c", {"text": ["x"], "shapes": [_rect(1, 1, 9, 9, "ignore")]}, True,
     r"c\.json:shapes: no target pixels"),
    ("d", {"text": ["y"], "shapes": [_rect(1, 1, 9, 9)]}, False,
     r"d\.json:image: image file not found"),
    ("e", '{"text": ["z"],\n "shapes": [}', True, r"e\.json:2: invalid JSON"),
    ("f", {"text": ["w"], "shapes": [{"label": "t", "points": [[1, 2]]}]}, True,
     r"f\.json:shapes\[0\]: points is not"),
    ("g", {"text": [], "shapes": [_rect(1, 1, 9, 9)]}, True, r"g\.json:text: "),
])
def test_reasonseg_bad_file(tmp_path, name, content, has_image, where):
    src = tmp_path / "val"
    _reasonseg(src)
    if has_image:
        _image(src / f"{name}.jpg", (64, 48))
    (src / f"{name}.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(data.ManifestError, match=where):
        convert.convert_reasonseg(src, tmp_path / "out")
    with pytest.raises(SystemExit, match=where):
        convert.main(["reasonseg", "--src", str(src), "--out", str(tmp_path / "out")])
    paths, skipped = convert.convert_reasonseg(src, tmp_path / "out", skip_bad=True)
    assert skipped == 1 and _ids(paths["seg"]) == ["a-0", "a-1", "b-0"]


def test_reasonseg_mask_lands_on_the_object_of_an_exif_rotated_photo(tmp_path):
    src = tmp_path / "val"
    _portrait_photo(src / "p.jpg")
    assert Image.open(src / "p.jpg").size == (200, 100)
    (src / "p.json").write_text(json.dumps({"text": ["the red thing"], "is_sentence": False, "imageWidth": 100,
                                            "imageHeight": 200, "shapes": [_rect(60, 10, 95, 50)]}))
    paths, skipped = convert.convert_reasonseg(src, tmp_path / "out")
    det, _ = data.read_manifest(paths["det"], "det")
    (seg,), _ = data.read_manifest(paths["seg"], "seg")
    assert skipped == 0 and det[0]["boxes"] == [[60, 10, 96, 51]] and seg["box"] == [60, 10, 96, 51]
    mask = np.asarray(Image.open(seg["mask_path"])) == 255
    shown = np.asarray(data.open_image(seg["image_path"])).astype(int)
    red = np.abs(shown - [220, 40, 40]).sum(-1) < 60                  # the object's pixels
    assert mask.shape == red.shape == (200, 100)
    assert (mask & red).sum() / (mask | red).sum() > 0.95             # IoU with the object


def test_reasonseg_refuses_a_labelme_size_that_is_not_the_displayed_one(tmp_path):
    src = tmp_path / "val"
    _portrait_photo(src / "q.jpg")
    _image(src / "ok.jpg", (64, 48))
    (src / "ok.json").write_text(json.dumps({"text": ["x"], "imageWidth": 64, "imageHeight": 48,
                                             "shapes": [_rect(1, 1, 9, 9)]}))
    # annotated on the stored 200x100 pixels: imageWidth is on line 5 of the indented JSON
    (src / "q.json").write_text(json.dumps({"text": ["the red thing"], "imageWidth": 200,
                                            "imageHeight": 100, "shapes": [_rect(60, 10, 95, 50)]},
                                           indent=1))
    where = r"q\.json:5: imageWidth/imageHeight says the image is 200x100, but .*q\.jpg is 100x200"
    with pytest.raises(data.ManifestError, match=where):
        convert.convert_reasonseg(src, tmp_path / "out")
    paths, skipped = convert.convert_reasonseg(src, tmp_path / "out", skip_bad=True)
    assert skipped == 1 and _ids(paths["seg"]) == ["ok-0"]


@pytest.mark.filterwarnings(PYCOCOTOOLS_NUMPY2)
def test_coco_sub_sampling_and_boxes(tmp_path):
    inst, expected = _coco(tmp_path / "coco")
    out = tmp_path / "sub"
    paths, skipped = convert.convert_coco(inst, tmp_path / "coco" / "images", out, n_train=3,
                                          n_test=2, seed=0)
    assert skipped == 0
    train, _ = data.read_manifest(paths["train"], "det")
    test, _ = data.read_manifest(paths["test"], "det")
    for cat, name in CATS.items():
        assert sum(r["target"] == name for r in train) == 3
        assert sum(r["target"] == name for r in test) == 2
    images_of = lambda recs: {r["id"].split("-")[1] for r in recs}   # noqa: E731
    assert not images_of(train) & images_of(test)       # no image in both splits
    for rec in train + test:
        image_id = int(rec["id"].split("-")[1])
        assert rec["boxes"] == expected[image_id, rec["category_id"]]
        assert CATS[rec["category_id"]] == rec["target"]
        assert rec["image"] == f"../coco/images/{image_id:012d}.jpg"
    assert not any(r["id"] == "coco-1-2" for r in train + test)   # crowd only: not a dog image
    convert.convert_coco(inst, tmp_path / "coco" / "images", tmp_path / "again", n_train=3,
                         n_test=2, seed=0)
    assert _hashes(out) == _hashes(tmp_path / "again")
    picks = set()
    for seed in range(4):
        p, _ = convert.convert_coco(inst, tmp_path / "coco" / "images", tmp_path / f"s{seed}",
                                    n_train=3, n_test=2, seed=seed)
        picks.add(tuple(_ids(p["test"])))
    assert len(picks) > 1


@pytest.mark.filterwarnings(PYCOCOTOOLS_NUMPY2)
def test_coco_sub_classes_and_bad_input(tmp_path):
    inst, _ = _coco(tmp_path / "coco", bad_annotation=True)
    images = tmp_path / "coco" / "images"
    with pytest.raises(data.ManifestError, match=r"instances\.json:annotations\[\d+\] \(id 999\)"
                                                 r": .*degenerate"):
        convert.convert_coco(inst, images, tmp_path / "o", n_train=3, n_test=2)
    paths, skipped = convert.convert_coco(inst, images, tmp_path / "o", classes=["traffic light"],
                                          n_train=3, n_test=2, skip_bad=True)
    assert skipped == 1
    assert {json.loads(x)["target"] for x in paths["train"].read_text().splitlines()} == {
        "traffic light"}
    with pytest.raises(ValueError, match="'horse'"):
        convert.convert_coco(inst, images, tmp_path / "o", classes=["horse"], skip_bad=True)
    good, _ = _coco(tmp_path / "good")
    with pytest.raises(data.ManifestError, match="category 'traffic light': 10 images"):
        convert.convert_coco(good, tmp_path / "good" / "images", tmp_path / "o", n_train=9,
                             n_test=2)
    (images / f"{4:012d}.jpg").write_bytes(b"not a jpeg")
    paths, skipped = convert.convert_coco(inst, images, tmp_path / "o2", n_train=4, n_test=2,
                                          skip_bad=True)
    assert skipped >= 2                                  # bad annotation + image 4's records
    for p in paths.values():
        assert all("-4-" not in i for i in _ids(p))
        data.read_manifest(p, "det")
    convert.main(["coco", "--instances", str(inst), "--images", str(images), "--out",
                  str(tmp_path / "cli"), "--n-train", "3", "--n-test", "2", "--classes",
                  "cat,traffic light", "--skip-bad"])
    assert len(_ids(tmp_path / "cli" / "test.jsonl")) == 4


@pytest.mark.filterwarnings(PYCOCOTOOLS_NUMPY2)
def test_coco_sub_refuses_a_stated_size_that_is_not_the_displayed_one(tmp_path):
    inst, _ = _coco(tmp_path / "coco")
    images = tmp_path / "coco" / "images"
    photo = Image.new("RGB", (40, 30))                 # stored 40x30 as COCO says, but EXIF 6
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(images / f"{7:012d}.jpg", exif=exif)
    kw = dict(classes=["traffic light"], n_train=8, n_test=2)     # uses all of images 1..10
    with pytest.raises(data.ManifestError, match=r"instances\.json:image id 7: instances\.json "
                                                 r"width/height says the image is 40x30, but "
                                                 r".* is 30x40 as displayed"):
        convert.convert_coco(inst, images, tmp_path / "o", **kw)
    paths, skipped = convert.convert_coco(inst, images, tmp_path / "o", skip_bad=True, **kw)
    assert skipped == 1 and "coco-7-3" not in _ids(paths["train"]) + _ids(paths["test"])


def test_imagenet_sub(tmp_path):
    root = tmp_path / "train"
    names = _imagenet(root)
    kw = dict(n_classes=3, n_train=2, n_test=1, seed=0)
    paths, skipped = convert.convert_imagenet(root, tmp_path / "a", names=names, **kw)
    assert skipped == 0
    train, _ = data.read_manifest(paths["train"], "cls")
    test, _ = data.read_manifest(paths["test"], "cls")
    classes = train[0]["classes"]
    assert len(classes) == 3 and (len(train), len(test)) == (6, 3)
    assert set(classes) <= {"tench", "goldfish", "crane (n00000002)", "crane (n00000003)",
                            "great white shark"}
    for rec in train + test:
        assert rec["classes"] == classes and sorted(rec["probs"]) == [0.0, 0.0, 1.0]
        folder = rec["id"].rsplit("-", 1)[0]
        assert rec["image"].startswith(f"../train/{folder}/")
        named = {"n00000000": "tench", "n00000001": "goldfish", "n00000004": "great white shark"}
        assert classes[rec["probs"].index(1.0)] == named.get(folder, f"crane ({folder})")
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    convert.convert_imagenet(root, tmp_path / "b", names=names, **kw)
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    chosen = {tuple(json.loads(convert.convert_imagenet(root, tmp_path / f"s{s}", **dict(
        kw, seed=s))[0]["test"].read_text().splitlines()[0])["classes"]) for s in range(5)}
    assert len(chosen) > 1                               # the class choice follows the seed
    paths, _ = convert.convert_imagenet(root, tmp_path / "seg", names=names, as_seg=True,
                                        classes=["goldfish", "n00000004"], n_train=3, n_test=1)
    seg, _ = data.read_manifest(paths["train"], "seg")
    assert len(seg) == 6 and {r["instruction"] for r in seg} == {"goldfish", "great white shark"}
    assert all("mask" not in r for r in seg)


def test_imagenet_bad_input(tmp_path):
    root = tmp_path / "train"
    _imagenet(root, per_class=3)
    (root / "n00000001" / "n00000001_0.JPEG").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(data.ManifestError, match=r"n00000001:n00000001_0\.JPEG: unreadable"):
        convert.convert_imagenet(root, tmp_path / "o", classes=["n00000001"], n_train=2, n_test=1)
    paths, skipped = convert.convert_imagenet(root, tmp_path / "o", classes=["n00000001"],
                                              n_train=2, n_test=1, skip_bad=True)
    assert skipped == 1 and len(_ids(paths["train"])) + len(_ids(paths["test"])) == 2
    with pytest.raises(data.ManifestError, match=r"train:class n00000000: 3 images"):
        convert.convert_imagenet(root, tmp_path / "o", n_classes=5, n_train=3, n_test=1)
    convert.main(["imagenet", "--root", str(root), "--out", str(tmp_path / "cli"), "--n-classes",
                  "2", "--n-train", "1", "--n-test", "1", "--skip-bad", "--as-seg"])
    assert len(_ids(tmp_path / "cli" / "train.jsonl")) >= 1


@pytest.mark.filterwarnings(PYCOCOTOOLS_NUMPY2)
def test_coco_mask_decodes_with_pycocotools_and_refuses_bad_rle():
    # 4x4, column-major runs [3, 2, 11]: pixels 3 and 4 are (row 3, col 0) and (row 0, col 1)
    expected = np.zeros((4, 4), bool)
    expected[3, 0] = expected[0, 1] = True
    assert np.array_equal(convert.coco_mask({"size": [4, 4], "counts": [3, 2, 11]}, 4, 4), expected)
    compressed = coco_api.encode(np.asfortranarray(expected.astype(np.uint8)))["counts"].decode()
    assert np.array_equal(convert.coco_mask({"size": [4, 4], "counts": compressed}, 4, 4), expected)
    # the triangle (0,0), (4,0), (0,4) as pycocotools rasterises it, and two polygons' union
    tri = convert.coco_mask([[0, 0, 4, 0, 0, 4]], 6, 6)
    assert tri[0, 0] and not tri[5, 5] and np.array_equal(tri, tri.T)
    union = convert.coco_mask([[0, 0, 4, 0, 0, 4], [5, 5, 6, 5, 6, 6, 5, 6]], 6, 6)
    assert np.array_equal(union, tri | convert.coco_mask([[5, 5, 6, 5, 6, 6, 5, 6]], 6, 6))
    square = convert.coco_mask([[10, 10, 30, 10, 30, 20, 10, 20]], 40, 50)
    assert data.mask_box(square) == [10, 10, 30, 20] and square.sum() == 200
    for bad, why in [({"size": [4, 4], "counts": [3, 2]}, "cover 5 pixels"),      # runs stop short
                     ({"size": [4, 4], "counts": [3, 20]}, "cover 23 pixels"),
                     ({"size": [4, 4], "counts": "xyz"}, "bad RLE"),
                     ({"size": [5, 4], "counts": [20]}, "not the image's"),
                     ([[1, 2, 3, 4]], "3 or more"),                              # a box, not a polygon
                     ([[0, 0, 4, 0, float("nan"), 4]], "3 or more")]:
        with pytest.raises(convert._Bad, match=why):
            convert.coco_mask(bad, 4, 4)


@pytest.mark.filterwarnings(PYCOCOTOOLS_NUMPY2)
def test_refcoco_records_and_masks(tmp_path):
    refs, inst, img_dir, masks = _refcoco(tmp_path)
    paths, skipped = convert.convert_refcoco(refs, inst, img_dir, tmp_path / "out", split="val")
    assert skipped == 0
    recs, _ = data.read_manifest(paths["val"], "seg")
    assert [(r["id"], r["instruction"], r["ann_id"]) for r in recs] == [
        ("100-0", "man on the left", 10), ("100-1", "left guy", 10), ("101-0", "blobs", 11),
        ("102-0", "the background", 12)]
    assert recs[0]["box"] == [5.5, 4, 48, 38] and recs[0]["mask"] == "masks/10.png"
    assert recs[0]["image"] == "../train2014/COCO_train2014_000000000001.jpg"
    for rec in recs:
        png = np.asarray(Image.open(rec["mask_path"]))
        assert np.array_equal(png == 255, masks[rec["ann_id"]]) and set(np.unique(png)) <= {0, 255}
    paths, _ = convert.convert_refcoco(refs, inst, img_dir, tmp_path / "out", split="train")
    assert _ids(paths["train"]) == ["103-0"]
    a, _ = convert.convert_refcoco(refs, inst, img_dir, tmp_path / "s1", split="val", sample=2)
    b, _ = convert.convert_refcoco(refs, inst, img_dir, tmp_path / "s2", split="val", sample=2)
    assert len(_ids(a["val"])) == 2 and a["val"].read_bytes() == b["val"].read_bytes()
    convert.main(["refcoco", "--refs", str(refs), "--instances", str(inst), "--images",
                  str(img_dir), "--out", str(tmp_path / "cli"), "--split", "testA"])
    assert _ids(tmp_path / "cli" / "testA.jsonl") == []


@pytest.mark.filterwarnings(PYCOCOTOOLS_NUMPY2)
def test_refcoco_bad_refs(tmp_path):
    refs, inst, img_dir, _ = _refcoco(tmp_path)
    good = convert.load_refs(refs)
    bad = good + [dict(good[0], ref_id=104, ann_id=77), dict(good[1], ref_id=105,
                                                            sentences=[{"sent": " "}])]
    refs, inst, img_dir, _ = _refcoco(tmp_path / "b", refs=bad)
    with pytest.raises(data.ManifestError, match=r"refs\(unc\)\.p:refs\[5\] \(ref_id 105\) "
                                                 r"sentence 0: needs a non-empty \"sent\""):
        convert.convert_refcoco(refs, inst, img_dir, tmp_path / "o")
    refs, inst, img_dir, _ = _refcoco(tmp_path / "c", refs=bad[:5])
    with pytest.raises(data.ManifestError, match=r"refs\(unc\)\.p:refs\[4\] \(ref_id 104\): "
                                                 r"ann_id 77 is not an annotation"):
        convert.convert_refcoco(refs, inst, img_dir, tmp_path / "o")
    refs, inst, img_dir, _ = _refcoco(tmp_path / "d", refs=bad)
    paths, skipped = convert.convert_refcoco(refs, inst, img_dir, tmp_path / "o", skip_bad=True)
    assert skipped == 3 and len(_ids(paths["val"])) == 4   # ref 104's 2 sentences + ref 105's


def test_refs_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "refs(unc).p"
    evil.write_bytes(pickle.dumps([{"ref_id": 1, "x": _Evil(marker)}], protocol=2))
    assert b"system" in evil.read_bytes()
    with pytest.raises(data.ManifestError, match=r"refs\(unc\)\.p:pickle: .*refused to load "
                                                 r"(posix|os|nt)\.system"):
        convert.load_refs(evil)
    inst = tmp_path / "instances.json"
    inst.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(data.ManifestError, match="refused"):
        convert.convert_refcoco(evil, inst, tmp_path, tmp_path / "o")
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):     # every protocol's way to a callable
        evil.write_bytes(pickle.dumps(_Evil(marker), protocol=protocol))
        with pytest.raises(data.ManifestError, match="refused"):
            convert.load_refs(evil)
    assert not marker.exists()
    with open(evil, "rb") as f, pytest.raises(pickle.UnpicklingError):
        convert.RefsUnpickler(f).load()
    # A refs file as refer's Python 2 code wrote it (protocol 0, byte strings) still loads.
    evil.write_bytes(b"(lp0\n(dp1\nS'ref_id'\np2\nI7\nsS'sentences'\np3\n(lp4\n(dp5\n"
                     b"S'sent'\np6\nS'the man'\np7\nsasa.")
    assert convert.load_refs(evil) == [{"ref_id": 7, "sentences": [{"sent": "the man"}]}]
    evil.write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(data.ManifestError, match="not a list"):
        convert.load_refs(evil)


def test_viscot_both_forms(tmp_path):
    path, _ = _viscot(tmp_path / "data")
    paths, skipped = convert.convert_viscot(path, tmp_path / "data", tmp_path / "out")
    assert skipped == 0
    recs, _ = data.read_manifest(paths["viscot_363k"], "vqa")
    got = {r["id"]: (r["question"], r["answer"], r.get("box")) for r in recs}
    assert got == {
        0: ("What is on the table?", "A cup", [21, 31, 99, 69]),     # exact pixels from "###"
        # 200x100 padded to 200x200 (50 px above): [0.1*200, 0.4*200-50, 0.5*200, 0.6*200-50]
        1: ("Which colour is the car?", "red", [20, 30, 100, 70]),
        # 100x200 padded to 200x200 (50 px on the left): [0.35*200-50, 20, 0.6*200-50, 100]
        2: ("Who is there?", "a man", [20, 20, 70, 100]),
        "flat-3": ("What shape?", "round", [1, 2, 30, 40]),
        "flat-4": ("What colour?", "grey", None)}
    assert recs[0]["dataset"] == "gqa" and recs[0]["image"] == "../data/cot/gqa/wide.jpg"
    paths, _ = convert.convert_viscot(path, tmp_path / "data", tmp_path / "img", norm="image")
    recs, _ = data.read_manifest(paths["viscot_363k"], "vqa")
    assert recs[1]["box"] == [20, 40, 100, 60]            # plain x * width, y * height
    assert convert.viscot_box_to_pixels([0, 0, 1, 1], 300, 100) == [0, 0, 300, 100]


def test_viscot_jsonl_and_bad_entries(tmp_path):
    path, items = _viscot(tmp_path)
    items[3]["image"] = "flat/missing.png"
    items[4]["answer"] = ""
    items.append(dict(items[0]))                          # duplicate question_id 0
    items[1]["conversations"][1]["value"] = "[12, 40, 100, 60]"
    path.write_text(json.dumps(items))
    with pytest.raises(data.ManifestError, match=r"viscot_363k\.json:entry 1: box turn"):
        convert.convert_viscot(path, tmp_path, tmp_path / "out")
    paths, skipped = convert.convert_viscot(path, tmp_path, tmp_path / "out", skip_bad=True)
    assert skipped == 4 and _ids(paths["viscot_363k"]) == [0, 2]
    meta = tmp_path / "gqa_cot_train.jsonl"
    meta.write_text(json.dumps({"question": "Where?", "answer": "there", "image": "flat/c.png",
                                "bboxs": [[1, 2, 10, 12], [5, 1, 20, 8]], "dataset": "gqa"})
                    + "\n\n{oops\n")
    with pytest.raises(data.ManifestError, match=r"gqa_cot_train\.jsonl:3: invalid JSON"):
        convert.convert_viscot(meta, tmp_path, tmp_path / "out")
    convert.main(["viscot", "--json", str(meta), "--images", str(tmp_path), "--out",
                  str(tmp_path / "out"), "--skip-bad"])
    recs, _ = data.read_manifest(tmp_path / "out" / "gqa_cot_train.jsonl", "vqa")
    assert [(r["id"], r["box"]) for r in recs] == [(1, [1, 1, 20, 12])]   # union of the boxes


# ====================================================================================================
# the papers' prompts and answers on real data (each dataset's layout, both model families)
# ====================================================================================================

# ==== RISE on real datasets: the authors' prompts per dataset layout, class names, repetition penalty, LISA
# targets, ImageNet-Sub classes, R_fmt. Expected texts are typed from the RISE authors' code (HSH55/RISE at
# 4ff62cc; the file is named at each) and Visual-RFT's (Liuziyu77/Visual-RFT at 9486633), not built from
# data.py's templates.
IMAGENET_SUB_AUTHORS = [      # HSH55/RISE dataset_generate.py, object_classes
    "analog clock", "backpack", "ballpoint", "Band Aid", "barbell", "barber chair", "beer bottle", "beer glass",
    "binoculars", "bolo tie", "bookcase", "bottlecap", "brassiere", "broom", "bucket", "buckle", "candle",
    "can opener", "carton", "cellular telephone"]


# RISE-R1/trainer/grpo_class_multithink_trainer_emo6.py L505-509, as rendered (only the description varies)
E6_REC = ("Please analyze the provided image description and generate a probability distribution across the "
          "following emotion categories: 'anger', 'disgust', 'fear', 'joy', 'sadness', 'surprise', 'neutral'. "
          "Description: %s. Do not provide any additional explanations or reasoning. Only return the result in the "
          "specified format. Each probability must be a floating-point number between 0 and 1, rounded to 6 "
          "decimal places. The sum of all probabilities must be exactly 1.000000 (allowing for minor "
          "floating-point errors). Example output: {'anger': 0.0, 'disgust': 0.1666667, 'fear': 0.1, 'joy': "
          "0.466667, 'sadness': 0.1, 'surprise': 0.166667, 'neutral': 0.0}. Incorrect output: {'anger': 0, "
          "'disgust': 0, 'fear': 0, 'joy': 1.0, 'sadness': 0, 'surprise': 0, 'neutral': 0}.")


# dataset_generate.py, question (ImageNet-Sub reasoning generation)
IMAGENET_COT = ("Analyze the image to explain how the visual elements support the object classification probability "
                "distribution %s, concisely in under 100 words. Describe key objects, shapes, textures, and contextual "
                "details that contribute to the inferred object category, highlighting their connection to the "
                "classification probabilities. Avoid directly stating the object names or probabilities; instead, "
                "focus on the visual cues and their implications.")


# RISE-COT/trainer/grpo_lisa_trainer.py newprompt_build(): the detection reasoning-generation text
DET_COT = ("Describe why the region is identified as the target object. The region's coordinates are %s, and it "
           "contains %s. Analyze its shape, color, texture, and contextual clues. Using these visual and contextual "
           "features, explain why this region is recognized as %s. Provide a clear Chain-of-Thought (CoT) to justify "
           "the conclusion.")


# grpo_lisa_trainer.py L583 (LISA) and grpo_coco_trainer.py L631 (COCO-Sub): the reconstruction
DET_REC = ('The image is of resolution %s. Based on the following reasoning, which describes the region corresponding '
           'to the target category "%s": %s, please extract and output the exact bounding box coordinates of that '
           'region.Only return the result in the following format:%s.')


# Visual-RFT coco_evaluation/Qwen2_VL_coco_infere.py: the think-answer block (its answer format replaced)
VRFT_THINK = ("\nOutput the thinking process in <think> </think> and final answer in <answer> </answer> tags.The "
              "output answer format should be as follows:\n<think> ... </think> <answer>%s</answer>\nPlease strictly "
              "follow the format.")


def _authors_imagenet_tree(root, per_class=2):
    """ImageNet's own layout (train/<wnid>/<wnid>_<n>.JPEG) for the authors' 20 ImageNet-Sub classes."""
    for k, wnid in enumerate(convert.IMAGENET_SUB):
        for n in range(per_class):
            _image(root / wnid / f"{wnid}_{n}.JPEG", (40, 30), value=5 * k + n)
    return root


def _real_datasets(tmp_path):
    """One converted record per RISE dataset layout, made by convert.py from fixtures in each dataset's own
    layout: {name: (record, image)}."""
    out = {}
    paths, _ = convert.convert_emotion6(_emotion6(tmp_path / "Emotion6"), tmp_path / "e6")
    out["Emotion6"] = next(r for r in data.read_manifest(paths["train"], "cls")[0] + data.read_manifest(
        paths["test"], "cls")[0] if r["id"] == "emotion6-joy-3")
    src = tmp_path / "ReasonSeg" / "train"
    _reasonseg(src)
    (tmp_path / "targets.jsonl").write_text(json.dumps({"id": "a-0-0", "target": "the bowl holding the soup"}) + "\n")
    paths, _ = convert.convert_reasonseg(src, tmp_path / "lisa", targets=tmp_path / "targets.jsonl")
    out["LISA"] = next(r for r in data.read_manifest(paths["det"], "det")[0] if r["id"] == "a-0-0")
    inst, _ = _coco(tmp_path / "coco")
    paths, _ = convert.convert_coco(inst, tmp_path / "coco" / "images", tmp_path / "cs", n_train=3, n_test=2)
    out["COCO-Sub"] = next(r for r in data.read_manifest(paths["train"], "det")[0] if r["target"] == "traffic light")
    paths, _ = convert.convert_imagenet(_authors_imagenet_tree(tmp_path / "imagenet" / "train"), tmp_path / "in",
                                        n_train=1, n_test=1)
    out["ImageNet-Sub"] = next(r for r in data.read_manifest(paths["train"], "cls")[0]
                               if r["id"].startswith("n02786058"))                   # a Band Aid image
    return {name: (rec, data.open_image(rec["image_path"])) for name, rec in out.items()}


# ==== the real-model path of Seg-RISE and VisRL: the papers' and the authors' prompts, boxes and scores
# The expected texts are typed from the sources, not read from data.py: Seg-Zero's single-object prompt
# (dvlab-research/Seg-Zero, verl/utils/rl_dataset.py of its first release), Qwen2.5-VL's grounding sentence,
# VisRL's CoT sentence (arXiv 2503.07523 sec. 4) and its released judge prompts (data_gen/generate.py).
# Records come from convert.py run on fixtures in each dataset's own layout (the converter tests' fixtures);
# prompts are rendered with Qwen2-VL's published chat template (tiny.QWEN_CHAT_TEMPLATE).
SEG_ZERO_TEXT = ("Please find '{}' with bbox and points.Compare the difference between objects and find the most "
                 "closely matched one.Output the thinking process in <think> </think> and final answer in <answer> "
                 "</answer> tags.Output the one bbox and points of two largest inscribed circles inside the "
                 "interested object in JSON format.i.e., <think> thinking process here </think><answer>{{'bbox': "
                 "[10,100,200,210], 'points_1': [30,110], 'points_2': [35,180]}}</answer>")


VISRL_COT = ("Please first provide the bounding box coordinate of the region, then refer to the corresponding "
             "sub-image to answer the question better.")


JUDGE_SCORE = """You are responsible for proofreading the answers, you need to give the score to the model's answer by referring to the standard answer, based on the given question and image.
    The full score is 1 point and the minimum score is 0 points. Please directly provide the score in JSON format, for example, {{"score": 0.8}}, without showing the intermediate process.
    The evaluation criteria require that the closer the model's answer is to the standard answer, the higher the score.

    Question: {} 
    Standard answer: {}
    Model's answer: {}
    """


JUDGE_BBOX = """You are responsible for verifying the relevance of the image based on the provided question and standard answer, you need to assess whether the image aligns with the standard answer.
    The full score is 1 point and the minimum score is 0 points. Please directly provide the score in JSON format, for example, {{"score": 0.8}}, without showing the intermediate process.
    The evaluation criteria is that, the higher score will be if the image effectively encompasses the information provided in the standard answer based on question.

    Question: {} 
    Standard answer: {}
    """


QWEN_USER = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"


QWEN_ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"


PICTURE = "<|vision_start|><|image_pad|><|vision_end|>"


def qwen_rendered(processor, conv):
    return processor.apply_chat_template(conv, chat_template=tiny_py.QWEN_CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)


def converted_layouts(root):
    """Seg-RISE and VisRL records, each built by convert.py from a fixture in its dataset's own layout."""
    refs, inst, img_dir, _ = _refcoco(root / "refcoco")
    refcoco = convert.convert_refcoco(refs, inst, img_dir, root / "refcoco-out", split="val")[0]["val"]
    _reasonseg(root / "ReasonSeg" / "val")
    reasonseg = convert.convert_reasonseg(root / "ReasonSeg" / "val", root / "reasonseg-out")[0]["seg"]
    viscot_json, _ = _viscot(root / "viscot")
    viscot = convert.convert_viscot(viscot_json, root / "viscot", root / "viscot-out")[0]["viscot_363k"]
    return (data.read_manifest(refcoco, "seg")[0], data.read_manifest(reasonseg, "seg")[0],
            data.read_manifest(viscot, "vqa")[0])


def seg_zero_answer(box, p1, p2, think="the one on the left"):
    return f'<think>{think}</think><answer>{json.dumps({"bbox": box, "points_1": p1, "points_2": p2})}</answer>'


def test_rise_prompts_of_every_dataset_layout_are_the_authors_for_both_model_families(real_arch, tmp_path):
    """The user text a real Qwen2-VL / Qwen2.5-VL gets, for a record convert.py made from each RISE dataset's own
    layout (printed; `pytest -s` shows them), against the authors' sentences. The box frame is the model's: 1000x1000
    for Qwen2-VL, for Qwen2.5-VL the pixels of the input its processor makes (its image grid x 14)."""
    from transformers import AutoConfig, AutoProcessor
    datasets = _real_datasets(tmp_path)
    e6, _ = datasets["Emotion6"]
    lisa, lisa_image = datasets["LISA"]
    coco, coco_image = datasets["COCO-Sub"]
    imnet, _ = datasets["ImageNet-Sub"]
    assert imnet["classes"] == IMAGENET_SUB_AUTHORS and imnet["probs"][3] == 1.0          # Band Aid
    assert (lisa["target"], lisa["question"], lisa["boxes"]) == ("the bowl holding the soup", "what holds the soup?",
                                                               [[10, 10, 26, 21]])
    assert coco["multi"] and coco["boxes"] == [[30, 20, 34, 26]]
    cot = "A smiling crowd gathers under bright lanterns."
    # classification prompts have no box frame: the same for both families
    e6_dist = ("{'anger':0.40201, 'disgust':0.100503, 'fear':0.100503, 'joy':0.201005, 'sadness':0.095477, "
               "'surprise':0.050251, 'neutral':0.050251}")   # ground_truth.txt's ratings / 0.995, 6 decimals
    assert data.prompt("cot", e6) == (      # adapted from IMAGENET_COT: the authors' Emotion6 text is unreleased
        "Analyze the image to explain how the visual elements support the emotion probability distribution "
        + e6_dist + ", concisely in under 100 words. Describe key objects, facial expressions, colors, scene settings, "
        "and contextual details that contribute to the evoked emotions, highlighting their connection to the emotion "
        "probabilities. Avoid directly stating the emotion names or probabilities; instead, focus on the visual cues "
        "and their implications.")
    assert data.prompt("rec", e6, cot=cot) == E6_REC % cot
    one_hot = "{" + ", ".join("'%s':%s" % (c, "1.0" if c == "Band Aid" else "0.0") for c in IMAGENET_SUB_AUTHORS) + "}"
    assert data.prompt("cot", imnet) == IMAGENET_COT % one_hot
    assert data.prompt("rec", imnet, cot=cot).startswith(
        "Please analyze the provided image description and generate a probability distribution across the following "
        "object categories: 'analog clock', 'backpack', 'ballpoint', 'Band Aid', ")
    e6_keys = "{'anger': probability, 'disgust': probability, 'fear': probability, 'joy': probability, " \
              "'sadness': probability, 'surprise': probability, 'neutral': probability}"
    e6_task = ("Please analyze the image and generate a probability distribution across the following emotion "
               "categories: 'anger', 'disgust', 'fear', 'joy', 'sadness', 'surprise', 'neutral'.")
    assert data.prompt("r1", e6) == e6_task + VRFT_THINK % e6_keys
    assert data.prompt("plain", e6) == e6_task + " Only return the result in the following format: " + e6_keys + "."
    for family, path in real_arch.items():
        processor = AutoProcessor.from_pretrained(path)
        model_type = AutoConfig.from_pretrained(path).model_type
        for (name, (rec, image)), box_format in zip((("LISA", datasets["LISA"]), ("COCO-Sub", datasets["COCO-Sub"])),
                                                    ("[x1, y1, x2, y2]", "[[x1,y1,x2,y2],...,[x1,y1,x2,y2]]")):
            if family == "qwen2_vl":
                fw, fh = 1000, 1000
            else:       # the processor's own resized input: its grid of 14-pixel patches
                _, gh, gw = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
                fw, fh = gw * 14, gh * 14
            frame = vlm.box_frame(model_type, image.size, processor)
            assert frame == (fw, fh)
            sx, sy = fw / image.size[0], fh / image.size[1]
            scaled = [[round(b[0] * sx), round(b[1] * sy), round(b[2] * sx), round(b[3] * sy)] for b in rec["boxes"]]
            boxes = [vlm.to_model_frame(b, model_type, image.size, processor) for b in rec["boxes"]]
            assert boxes == scaled
            stated = "[%d, %d, %d, %d]" % tuple(scaled[0]) if name == "LISA" else json.dumps(scaled).replace(" ", "")
            resolution = f"{fw}×{fh}"
            prompts = {style: data.prompt(style, rec, cot=cot, boxes=boxes, frame=frame)
                       for style in ("cot", "rec", "r1", "plain")}
            target = rec["target"]
            assert prompts["cot"] == f"The image is of resolution {resolution}. " + DET_COT % (stated, target, target)
            assert prompts["rec"] == DET_REC % (resolution, target, cot, box_format)
            task = (f'Detect the region corresponding to the target category "{target}" and provide its bounding box.'
                    if name == "LISA" else
                    "Detect all objects belonging to the category 'traffic light' in the image, and provide the "
                    "bounding boxes.")
            assert prompts["r1"] == f"The image is of resolution {resolution}. " + task + VRFT_THINK % box_format
            assert prompts["plain"] == (f"The image is of resolution {resolution}. {task} Only return the result in "
                                        f"the following format: {box_format}.")
            for style, text in prompts.items():
                assert "boxes of all" not in text and " are at " not in text and "what holds" not in text
                # what the model reads: the authors' message [image, text], no system message of ours
                rendered = processor.apply_chat_template([vlm.user_turn(text)], add_generation_prompt=True,
                                                         tokenize=False)
                assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
                assert rendered.endswith("<|vision_start|><|image_pad|><|vision_end|>" + text
                                         + "<|im_end|>\n<|im_start|>assistant\n")
                print(f"\n--- {name}, {family}, {style}:\n{text}")
    for name, rec in (("Emotion6", e6), ("ImageNet-Sub", imnet)):
        for style in ("cot", "rec", "r1", "plain"):
            print(f"\n--- {name}, both families, {style}:\n{data.prompt(style, rec, cot=cot)}")


def test_rise_answers_parse_and_score_with_multi_word_classes(tmp_path):
    """The answer texts of real records (SFT targets) read back exactly; class names are matched by one key on
    both sides, so ImageNet-Sub's multi-word names score however the model spaces or cases them (the authors'
    reward never matched "analog clock" or "Band Aid": it keyed only the answers)."""
    e6 = {"classes": data.EMOTION6_CLASSES, "probs": [0, 1 / 6, 0.1, 7 / 15, 0.1, 1 / 6, 0]}
    assert data.format_answer(e6) == ("{'anger': 0.0, 'disgust': 0.166667, 'fear': 0.1, 'joy': 0.466667, "
                                      "'sadness': 0.1, 'surprise': 0.166667, 'neutral': 0.0}")
    assert R.parse_class_probs(data.format_answer(e6)) == {
        "anger": 0.0, "disgust": 0.166667, "fear": 0.1, "joy": 0.466667, "sadness": 0.1, "surprise": 0.166667,
        "neutral": 0.0}
    assert R.parse_class_probs(data.EMOTION6_EXAMPLE)["disgust"] == 0.1666667       # the authors' example parses
    assert data.format_answer({"target": "x", "boxes": [[1, 2, 3, 4]]}, [[10, 20, 30, 40]]) == "[10, 20, 30, 40]"
    assert data.format_answer({"target": "x", "multi": True, "boxes": []}, [[1, 2, 3, 4], [5, 6, 7, 8]]) == \
        "[[1,2,3,4],[5,6,7,8]]"
    assert R.parse_boxes("[10, 20, 30, 40]") == [[10, 20, 30, 40]]
    gt = dict(zip(IMAGENET_SUB_AUTHORS, [0.0] * 3 + [1.0] + [0.0] * 16))                  # Band Aid
    authors_gt = "{" + ", ".join("'%s':%s" % (c, "1.0" if c == "Band Aid" else "0.0")
                                 for c in IMAGENET_SUB_AUTHORS) + "}"            # their `solution` text
    assert R.cls_similarity(R.parse_class_probs(authors_gt), gt) == approx(1.0)
    for spelled in ("band aid", "Band_Aid", "BAND-AID", "bandaid"):
        assert R.cls_similarity({spelled: 1.0}, gt) == approx(1.0), spelled
    assert R.cls_similarity({"Analog Clock": 1.0}, gt) < 1e-3                            # the wrong class
    assert R.probs_vector({"analog_clock": 0.25, "Analog clock": 0.25}, ["analog clock"]) == [0.5]   # merged
    out = R.rise_r1_reward("<think>a small adhesive strip on skin</think><answer>{'band aid': 1.0}</answer>", gt, "cls")
    assert out == {"reward": approx(2.0), "similarity": approx(1.0), "format": 1.0}


def test_rise_r1_format_reward_is_one_for_a_well_formed_answer():
    """RISE eq. 9: R = Sim + R_fmt with R_fmt the format compliance alone; the probability-sum penalty lives in
    Sim_cls (eqs. 2-5) and counts once. {"red": 0.3, "blue": 0.3} vs (0.5, 0.5): renormalised q = p, KL 0,
    MSE = (0.2^2 + 0.2^2) / 2 = 0.04, sum 0.6 -> Sim = exp(-0.02) * exp(-0.4) = exp(-0.42) = 0.657047."""
    out = R.rise_r1_reward('<think>both halves are alike</think><answer>{"red": 0.3, "blue": 0.3}</answer>',
                           GT_CLS, "cls")
    assert out["similarity"] == approx(math.exp(-0.42), abs=1e-9) == approx(0.657047, abs=1e-6)
    assert out["format"] == 1.0 and out["reward"] == approx(1.657047, abs=1e-6)
    assert R.rise_r1_reward('<answer>{"red": 0.3, "blue": 0.3}</answer>', GT_CLS, "cls")["format"] == 0.0   # no think


def test_class_names_allowed_removed_or_forbidden():
    """The three --class-names modes on hand-written CoTs: allow (the paper: only numbers leak), forbid (a class
    word in any sense is a leak, "neutral tones" too), remove (the sentences naming a class go)."""
    e6 = data.EMOTION6_CLASSES
    cot = "Neutral tones fill the room. A child laughs with joy! The sky is grey"
    assert not R.leaks(cot, "cls")                                       # allow: no number, no leak
    assert R.leaks(cot, "cls", class_names=["neutral"])                  # forbid: the word, whatever its sense
    assert R.leaks("Joys abound.", "cls", class_names=e6)                # plural, any case
    for innocent in ("The children enjoy the game.", "A danger sign hangs there.", "A joyful, fearless dog.",
                     "Reddish light."):
        assert not R.leaks(innocent, "cls", class_names=e6 + ["red"]), innocent
    pattern = R.class_name_pattern(["Band Aid", "R.V."])
    assert all(pattern.search(t) for t in ("a band-aid here", "two BandAids", "a Band_Aid", "the R.V. is parked"))
    assert R.class_name_pattern([]) is None and R.class_name_pattern(["  "]) is None
    # remove: the sentences with "Neutral" and "joy" go, the last one (no end punctuation) stays
    assert R.remove_class_sentences(cot, e6) == "The sky is grey"
    assert R.remove_class_sentences("Calm water.\nA fearful face! Is it surprise? Dark trees", e6) == \
        "Calm water. A fearful face! Dark trees"
    assert R.remove_class_sentences("The joy is clear", e6) == ""       # a last sentence that names one goes too
    assert R.remove_class_sentences("Two  lines\nof text.", []) == "Two lines of text."
    gt = {"joy": 1.0, "neutral": 0.0}
    good = R.rise_cot_reward(cot, "{'joy': 1.0, 'neutral': 0.0}", gt, "cls")
    assert good["reward"] == approx(1.0) and not good["leak"]
    assert R.rise_cot_reward(cot, "{'joy': 1.0, 'neutral': 0.0}", gt, "cls", forbid_class_names=True)["reward"] == 0.0


def test_rise_cot_presets_and_class_name_options():
    """The tiny demo keeps its behaviour (class names forbidden, asked for in its prompt; no repetition penalty);
    a real model gets the paper's (class names allowed) and the authors' penalty 1.2."""
    tiny_args = rise_cot.parse_args([])
    assert (tiny_args.class_names, tiny_args.rec_repetition_penalty) == ("forbid", 1.0)
    paper = rise_cot.parse_args(["--preset", "paper"])
    assert (paper.class_names, paper.rec_repetition_penalty) == ("allow", 1.2)
    assert rise_cot.parse_args(["--class-names", "allow"]).class_names == "allow"
    assert rise_cot.parse_args(["--preset", "paper", "--class-names", "remove"]).class_names == "remove"
    with pytest.raises(SystemExit):
        rise_cot.parse_args(["--class-names", "drop"])


@pytest.mark.slow
def test_remove_mode_reconstructs_from_the_cleaned_cot(cache, tmp_path):
    """--class-names remove with the tiny base on shapes soft_cls: the shapes prompt does not forbid names, so the
    base names colours; the reconstruction prompt, the reward and the kept CoT all use the CoT without the
    sentences that name a class, while the sampled tokens (the GRPO loss's) stay as sampled."""
    data.make_shapes_world(tmp_path / "w", n_train=2, n_test=1, seed=4)
    records, _ = data.read_manifest(tmp_path / "w" / "soft_cls" / "train.jsonl", "cls")
    model, processor = vlm.load_model(vlm.TINY_BASE)
    args = rise_cot.parse_args(["--class-names", "remove", "--max-new-tokens", "24"])
    images = [data.open_image(r["image_path"]) for r in records]
    answers = [dict(zip(r["classes"], r["probs"])) for r in records]
    torch.manual_seed(0)
    cots, recs, scored = rise_cot.closed_loop(model, processor, records, images, answers, args, 4)
    owner = [k // 4 for k in range(8)]
    assert cots["texts"] == [R.remove_class_sentences(t, records[i]["classes"])
                             for i, t in zip(owner, cots["sampled_texts"])]
    named = [k for k, t in enumerate(cots["sampled_texts"]) if R.leaks(t, "cls", records[owner[k]]["classes"])]
    assert named, cots["sampled_texts"]                 # the base named a colour: something was removed
    tok = processor.tokenizer
    for k in range(8):
        assert not R.leaks(cots["texts"][k], "cls", records[owner[k]]["classes"])
        assert cots["texts"][k] in tok.decode(recs["prompt"]["input_ids"][k], skip_special_tokens=True)
        assert scored[k]["reward"] == R.rise_cot_reward(cots["texts"][k], recs["texts"][k], answers[owner[k]], "cls",
                                                        terms=args.reward_terms)["reward"]
    assert tok.batch_decode(cots["completion_ids"] * cots["completion_mask"], skip_special_tokens=True) == \
        cots["sampled_texts"]


@pytest.mark.slow
def test_repetition_penalty_is_transformers_rule_and_off_by_default(tiny):
    """vlm.sample(repetition_penalty=p) decodes greedily as a hand loop over full forwards that divides the
    positive logits (multiplies the negative ones) of every token already in the sequence by p; None, 1.0 and
    leaving it out sample the same tokens."""
    model, processor = tiny
    batch = vlm.chat_inputs(processor, [[vlm.user_turn("Describe the image.")]], [[solid((220, 40, 40))]])
    runs = []
    for extra in ({}, {"repetition_penalty": None}, {"repetition_penalty": 1.0}):
        torch.manual_seed(5)
        runs.append(vlm.sample(model, processor, batch, 2, 8, temperature=1.0, **extra)["completion_ids"])
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    got = vlm.sample(model, processor, batch, 1, 8, do_sample=False, repetition_penalty=1.5)
    ids, suppress = batch["input_ids"].clone(), vlm.suppressed_ids(processor)
    eos = vlm.eos_ids(processor, model)
    with torch.no_grad():
        for _ in range(8):
            types = torch.cat([batch["mm_token_type_ids"], batch["mm_token_type_ids"].new_zeros(
                1, ids.shape[1] - batch["input_ids"].shape[1])], 1)           # generated tokens are text
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=batch["pixel_values"],
                           image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=types).logits[0, -1].float()
            seen = ids[0].unique()
            logits[seen] = torch.where(logits[seen] < 0, logits[seen] * 1.5, logits[seen] / 1.5)
            logits[suppress] = -math.inf
            nxt = int(logits.argmax())
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
            if nxt in eos:
                break
    manual = ids[0, batch["input_ids"].shape[1]:].tolist()
    assert got["completion_ids"][0, :len(manual)].tolist() == manual
    plain = vlm.sample(model, processor, batch, 1, 8, do_sample=False)["completion_ids"][0].tolist()
    assert plain != manual            # the random tiny model repeats itself; the penalty changes its greedy text


def test_lisa_detection_is_one_sample_per_question_and_target(tmp_path):
    """RISE's LISA conversion: a record per (query, target shape) with that shape's own box (less the ignore
    shapes drawn after it), the target description from a targets file or the phrase itself, never the question;
    the questions without one are listed for filling in, and the filled list passed back completes det.jsonl."""
    src = tmp_path / "train"
    _image(src / "c.jpg", (64, 48))
    # two targets overlapping at columns 20..24 (both keep them), an ignore shape drawn after the larger one
    # carving its rows 30..33, a flag dropped
    (src / "c.json").write_text(json.dumps({
        "text": ["Which items would you carry to a picnic?", "What could hold the food?"], "is_sentence": True,
        "shapes": [_rect(2, 2, 24, 33), _rect(20, 5, 40, 12), _rect(0, 30, 30, 40, "ignore"),
                   _rect(0, 0, 63, 47, "flag")]}))
    paths, skipped = convert.convert_reasonseg(src, tmp_path / "o")
    assert skipped == 0 and run.read_jsonl(paths["det"]) == []          # questions only, no description yet
    todo = run.read_jsonl(paths["needs_target"])
    assert [(r["id"], r["question"], r["boxes"]) for r in todo] == [
        ("c-0-0", "Which items would you carry to a picnic?", [[2, 2, 25, 30]]),
        ("c-0-1", "Which items would you carry to a picnic?", [[20, 5, 41, 13]]),
        ("c-1-0", "What could hold the food?", [[2, 2, 25, 30]]),
        ("c-1-1", "What could hold the food?", [[20, 5, 41, 13]])]
    filled = tmp_path / "filled.jsonl"
    filled.write_text("".join(json.dumps(dict(r, target=f"the picnic item {r['id'][-1]}")) + "\n" for r in todo[:3]))
    paths, _ = convert.convert_reasonseg(src, tmp_path / "o", targets=filled)
    det, _ = data.read_manifest(paths["det"], "det")
    assert [(r["id"], r["target"], r["boxes"]) for r in det] == [
        ("c-0-0", "the picnic item 0", [[2, 2, 25, 30]]), ("c-0-1", "the picnic item 1", [[20, 5, 41, 13]]),
        ("c-1-0", "the picnic item 0", [[2, 2, 25, 30]])]
    assert [r["id"] for r in run.read_jsonl(paths["needs_target"])] == ["c-1-1"]
    filled.write_text("".join(json.dumps(dict(r, target="x")) + "\n" for r in todo))
    paths, _ = convert.convert_reasonseg(src, tmp_path / "o", targets=filled, queries="first")
    assert _ids(paths["det"]) == ["c-0-0", "c-0-1"] and "needs_target" not in paths
    assert not (tmp_path / "o" / "needs_target.jsonl").exists()
    # a description for a question the folder does not have is a mistake, named with its line
    filled.write_text(json.dumps({"id": "c-0-0", "target": "x"}) + "\n" + json.dumps({"id": "z-0-0", "target": "y"}))
    with pytest.raises(data.ManifestError, match=r"filled\.jsonl:2: 1 id\(s\) name no LISA question .*z-0-0"):
        convert.convert_reasonseg(src, tmp_path / "o", targets=filled)
    convert.main(["reasonseg", "--src", str(src), "--out", str(tmp_path / "cli"), "--det-queries", "first"])
    assert len(run.read_jsonl(tmp_path / "cli" / "needs_target.jsonl")) == 2


def test_imagenet_sub_default_is_the_authors_20_classes(tmp_path):
    root = _authors_imagenet_tree(tmp_path / "train")
    paths, skipped = convert.convert_imagenet(root, tmp_path / "o", n_train=1, n_test=1)
    train, _ = data.read_manifest(paths["train"], "cls")
    assert skipped == 0 and len(train) == 20 and train[0]["classes"] == IMAGENET_SUB_AUTHORS
    assert [r["classes"][r["probs"].index(1.0)] for r in train] == IMAGENET_SUB_AUTHORS    # folder -> its name
    (root / "n02992529").rename(root / "phones")
    with pytest.raises(ValueError, match=r"no folder for 1 of the RISE authors' 20 .*n02992529 \(cellular telephone\)"):
        convert.convert_imagenet(root, tmp_path / "o", n_train=1, n_test=1)


def test_lisa_map_is_the_share_of_samples_found_whatever_their_order():
    """rise_r1.metrics_of on LISA-style records (every target its own description): mAP@0.5 = hits / samples,
    2/3 here in any order of the test set; a COCO-style class shared by images pools them."""
    records = [{"target": f"thing {k}", "boxes": [[0, 0, 10, 10]]} for k in range(3)]
    preds = [{"parsed": True, "boxes": b} for b in ([[0, 0, 10, 9]], [[20, 20, 30, 30]], [[1, 0, 10, 10]])]
    for order in itertools.permutations(range(3)):
        got = rise_r1.metrics_of([preds[i] for i in order], [records[i] for i in order], "det")["map50"]
        assert got == approx(2 / 3)


def test_diversify_box_area_is_the_default_and_differs_from_sides():
    """The paper's area bound by default (--diversity area); the released code's per-side bound on request:
    over 200 draws for a 0.1 x 0.1 b1 the area form keeps the aspect ratio 1, the sides form does not."""
    b1 = [0.45, 0.45, 0.55, 0.55]
    rng_a, rng_d = random.Random(3), random.Random(3)
    assert visrl.diversify_box(b1, b1, rng_a) == visrl.diversify_box(b1, b1, rng_d, mode="area")
    aspects = {m: [(b[2] - b[0]) / (b[3] - b[1]) for b in (visrl.diversify_box(b1, b1, random.Random(k), mode=m)
                                                          for k in range(200))] for m in ("area", "sides")}
    assert max(abs(a - 1) for a in aspects["area"]) < 1e-9 and max(abs(a - 1) for a in aspects["sides"]) > 0.2
    with pytest.raises(ValueError, match="area"):
        visrl.diversify_box(b1, b1, random.Random(0), mode="width")
    assert visrl.parse_args(["--model", "x"]).diversity == "area"
    assert visrl.parse_args(["--model", "x", "--diversity", "sides"]).diversity == "sides"


@pytest.mark.filterwarnings(PYCOCOTOOLS_NUMPY2)
def test_real_model_prompts_of_each_dataset_layout(tiny, tmp_path):
    """What a real Qwen2-VL / Qwen2.5-VL gets for one record of RefCOCO(g), ReasonSeg and VisCoT (printed:
    pytest -s shows them), word for word against the papers' and the authors' texts."""
    _, processor = tiny
    refcoco, reasonseg, viscot = converted_layouts(tmp_path)
    args = S.parse_args(["--model", "Qwen/Qwen2.5-VL-3B-Instruct"])
    shown = {}
    for name, records in (("RefCOCO", refcoco), ("ReasonSeg", reasonseg)):
        rec, image = records[0], data.open_image(records[0]["image_path"])
        args.shapes = data.is_shapes(records)          # what seg_rise.train and evaluate set from the data
        assert args.shapes is False
        shown[name] = qwen_rendered(processor, [vlm.user_turn(S.train_prompt(rec["instruction"], image, "qwen2_5_vl",
                                                                            processor, args))])
    # Seg-Zero's: the image, then its sentences with no space between them, no frame note, system prompt default
    assert shown["RefCOCO"] == QWEN_USER + PICTURE + SEG_ZERO_TEXT.format("man on the left") + QWEN_ASSISTANT
    assert shown["ReasonSeg"] == QWEN_USER + PICTURE + SEG_ZERO_TEXT.format("what holds the soup?") + QWEN_ASSISTANT
    assert S.prompt_text("The Man on the LEFT.") == SEG_ZERO_TEXT.format("the man on the left")   # .lower().strip(".")
    # the ablations: Seg-Zero's words with the think (Tab. 5) or the points (Tab. 6) deleted, nothing added
    assert S.prompt_text("the bowl", cot=False) == (
        "Please find 'the bowl' with bbox and points.Compare the difference between objects and find the most closely "
        "matched one.Output the final answer in <answer> </answer> tags.Output the one bbox and points of two largest "
        "inscribed circles inside the interested object in JSON format.i.e., <answer>{'bbox': [10,100,200,210], "
        "'points_1': [30,110], 'points_2': [35,180]}</answer>")
    assert S.prompt_text("the bowl", points=False) == (
        "Please find 'the bowl' with bbox.Compare the difference between objects and find the most closely matched "
        "one.Output the thinking process in <think> </think> and final answer in <answer> </answer> tags.Output the "
        "one bbox inside the interested object in JSON format.i.e., <think> thinking process here </think><answer>"
        "{'bbox': [10,100,200,210]}</answer>")
    assert "think" not in S.prompt_text("the bowl", cot=False, points=False).replace("thinking", "")
    # RefCOCO testing: Qwen2.5-VL's own grounding sentence with the expression in place of its example's
    args.eval_prompt = "grounding"
    shown["RefCOCO grounding"] = S.eval_prompt(refcoco[0], None, "qwen2_5_vl", processor, args)
    assert shown["RefCOCO grounding"] == "Locate man on the left, output its bbox coordinates using JSON format."
    # VisCoT -> VisRL: step 1 as LLaMA-Factory renders "<image>\n{question} Please first ... better."
    rec = next(r for r in viscot if r["id"] == 1)           # a 200 x 100 photo, its box [20, 30, 100, 70]
    image, question = data.open_image(rec["image_path"]), "Which colour is the car?"
    assert rec["question"] == question and not data.is_shapes([rec])
    shown["VisCoT box step"] = qwen_rendered(processor, visrl.box_turn(question))
    assert shown["VisCoT box step"] == QWEN_USER + PICTURE + "\n" + question + " " + VISRL_COT + QWEN_ASSISTANT
    # step 2 (the released code): a new user turn, the same text between the image and the crop, no box
    shown["VisCoT answer step"] = qwen_rendered(processor, visrl.answer_turns(question, "[0.100, 0.300, 0.500, 0.700]"))
    assert shown["VisCoT answer step"] == (QWEN_USER + PICTURE + "\n" + question + " " + VISRL_COT + "\n" + PICTURE
                                           + QWEN_ASSISTANT)
    # the SFT warm-up: two single-turn examples; the box in VisCoT's 3 decimals, normalised to the image itself
    # (the converter turned VisCoT's padded-square [0.100, 0.400, 0.500, 0.600] into pixels [20, 30, 100, 70])
    (box_conv, box_images), (answer_conv, answer_images) = visrl.sft_examples(rec, image)
    assert box_conv[-1]["content"][0]["text"] == "[0.100, 0.300, 0.500, 0.700]" and len(box_images) == 1
    assert answer_conv[-1]["content"][0]["text"] == "red" and answer_images[1].size == (80, 40)
    # the critic: the released judge prompts word for word, the question followed by one space
    (box_judge,), (answer_judge,) = visrl.critic_conversations(
        [{"question": question, "reference": "red", "answer": "A red car.", "shapes": False}])
    shown["VisRL critic s_b"] = qwen_rendered(processor, box_judge)
    shown["VisRL critic s_r"] = qwen_rendered(processor, answer_judge)
    assert shown["VisRL critic s_b"] == QWEN_USER + PICTURE + JUDGE_BBOX.format(question, "red") + QWEN_ASSISTANT
    assert shown["VisRL critic s_r"] == (QWEN_USER + PICTURE + JUDGE_SCORE.format(question, "red", "A red car.")
                                         + QWEN_ASSISTANT)
    for name, text in shown.items():
        print(f"---- {name}\n{text}")


def test_seg_zero_answers_and_r_seg():
    """R_seg (Seg-RISE sec. 4: "a parsable bounding box and two points in the correct JSON format with valid
    coordinate values") reads Seg-Zero's keys for real data, the shapes world's for shapes data, and wants
    the points in the image."""
    ok = seg_zero_answer([10, 20, 60, 80], [30, 40], [35, 50])
    assert R.parse_seg_answer(R.seg_answer(ok), "seg_zero") == ([10, 20, 60, 80], [[30, 40], [35, 50]])
    assert R.seg_format_reward(ok, 100, 100, "seg_zero") == 1.0
    shapes_answer = '<think>t</think><answer>{"bbox": [10, 20, 60, 80], "points": [[30, 40], [35, 50]]}</answer>'
    assert R.seg_format_reward(shapes_answer, 100, 100, "seg_zero") == 0.0
    assert R.seg_format_reward(shapes_answer, 100, 100, "shapes") == 1.0
    assert R.seg_format_reward(ok, 100, 100, "shapes") == 0.0
    # the prompt's own example, single-quoted, is not JSON: Seg-Zero's json.loads refuses it too
    assert R.seg_format_reward("<think>t</think><answer>{'bbox': [10,100,200,210], 'points_1': [30,110], "
                               "'points_2': [35,180]}</answer>", 840, 840, "seg_zero") == 0.0
    # the points: on the image's edge is inside; past it, or negative, is not
    assert R.seg_format_reward(seg_zero_answer([10, 20, 60, 80], [30, 40], [100, 100]), 100, 100, "seg_zero") == 1.0
    assert R.seg_format_reward(seg_zero_answer([10, 20, 60, 80], [101, 40], [35, 50]), 100, 100, "seg_zero") == 0.0
    assert R.seg_format_reward(seg_zero_answer([10, 20, 60, 80], [30, 40], [35, -1]), 100, 100, "seg_zero") == 0.0
    assert R.seg_format_reward(seg_zero_answer([10, 20, 60, 80], [30, 40], [35, 50, 1]), 100, 100, "seg_zero") == 0.0
    # read for real data: Qwen2-VL's 0..1000 frame of a 200 x 100 image, x / 5 and y / 10
    box, points = S.read_answer(ok, Image.new("RGB", (200, 100)), "qwen2_vl")
    assert box == approx([2, 2, 12, 8]) and points == [approx([6, 4]), approx([7, 5])]
    assert S.read_answer(shapes_answer, Image.new("RGB", (200, 100)), "qwen2_vl") == (approx([2, 2, 12, 8]), [])


def test_seg_zero_square_input_maps_back_to_the_original_pixels(tiny):
    """Real data: the model sees the photo resized to 840 x 840 (Seg-Zero's) and writes Qwen2.5-VL pixels of its
    own resize of that; the box goes back to the original by W / 840, H / 840. The tiny processor (max 224 x 224
    pixels) resizes 840 x 840 to 224 x 224: frame x -> original x * (840 / 224) * (1680 / 840) = 7.5 x, y * 1.875."""
    _, processor = tiny
    image = red_green(1680, 420)                     # left half red
    assert S.model_image(image, 840).size == (840, 840) and S.model_image(image, None) is image
    assert S.frame_size(image, "qwen2_5_vl", processor, 840) == (224, 224)
    assert S.box_to_pixels([56, 56, 112, 112], image, "qwen2_5_vl", processor, 840) == approx([420, 105, 840, 210])
    assert S.point_to_model_frame([420, 105], image, "qwen2_5_vl", processor, 840) == [56, 56]
    box, points = S.read_answer(seg_zero_answer([56, 56, 112, 112], [84, 84], [224, 0]), image, "qwen2_5_vl",
                                processor, side=840)
    assert box == approx([420, 105, 840, 210]) and points == [approx([630, 157.5]), approx([1680, 0])]
    # R_seg's bounds are the 224 x 224 frame the model wrote in; R_sem crops the original photo
    texts = [seg_zero_answer([0, 0, 112, 224], [56, 112], [10, 10]),     # -> [0, 0, 840, 420]: the red half
             seg_zero_answer([0, 0, 112, 225], [56, 112], [10, 10]),     # y2 past the frame
             seg_zero_answer([0, 0, 112, 224], [225, 112], [10, 10])]    # a point past the frame
    clip = (StubClip([1.0, 0.0]), seg_stub_preprocess, lambda t: torch.zeros(len(t), 4, dtype=torch.long))
    out = S.seg_rewards(texts, [0, 0, 0], [image], ["red"], clip, "qwen2_5_vl", processor, side=840)
    assert [o["seg"] for o in out] == [1, 0, 0] and [o["sem"] for o in out] == approx([1.0, 1.0, 1.0])
    # the paper preset resizes real data to 840 x 840; never the shapes world, the grounding prompt, or with 0
    args = S.parse_args(["--model", "Qwen/Qwen2.5-VL-3B-Instruct"])
    assert args.image_side == 840 and S.input_side(args) == 840
    assert S.input_side(argparse.Namespace(**{**vars(args), "shapes": True})) is None
    assert S.input_side(argparse.Namespace(**{**vars(args), "eval_prompt": "grounding"})) is None
    assert S.input_side(S.parse_args(["--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--image-side", "0"])) is None
    assert S.parse_args(["--model", "x", "--preset", "tiny"]).image_side == 0


def test_reasonseg_ignore_pixels_are_left_out_of_the_scores(tiny, monkeypatch, tmp_path):
    """ReasonSeg marks pixels to leave out with labelme shapes labelled "ignore" (LISA's get_mask_from_json: 255
    there, which its intersectionAndUnionGPU drops from both the intersection and the union). The converter
    writes them as masks/ignore/<name>.png; evaluation leaves them out of both counts."""
    model, processor = tiny
    src = tmp_path / "ReasonSeg" / "val"
    _reasonseg(src)
    paths, _ = convert.convert_reasonseg(src, tmp_path / "out")
    records, _ = data.read_manifest(paths["seg"], "seg")
    a = records[0]
    assert a["ignore_mask"] == "masks/ignore/a.png"
    assert a["ignore_mask_path"] == str(tmp_path / "out" / "masks" / "ignore" / "a.png")
    ignore = np.zeros((48, 64), bool)
    ignore[8:23, 26:36] = True                       # the "ignore" rectangle (26, 8)-(35, 22), boundary included
    assert np.array_equal(data.read_mask(a["ignore_mask_path"]), ignore)
    # in b the ignore shape is larger, drawn first: the two targets win over it
    b_ignore = data.read_mask(records[2]["ignore_mask_path"])
    assert b_ignore[0:21, 0:21].sum() == 21 * 21 - 5 * 5 and not b_ignore[5:10, 5:10].any()
    # a Seg-Zero answer whose box, pixels [10.5, 12.5, 39.5, 17.5] in Qwen2-VL's 0..1000 frame of 64 x 48, fills
    # columns 10..39 and rows 12..17 (the box executor rounds outwards)
    texts = [seg_zero_answer([10.5 / 64 * 1000, 12.5 / 48 * 1000, 39.5 / 64 * 1000, 17.5 / 48 * 1000],
                             [200, 300], [300, 300])]
    monkeypatch.setattr(vlm, "sample", lambda *a, **k: {"texts": texts})
    args = S.parse_args(["--model", "x", "--executor", "box"])
    (row,) = S.evaluate(model, processor, [a], args, S.make_executor(args, "cpu"))
    # target: columns 10..25, rows 10..20 (176 px); the box: 30 x 6 = 180 px, of which 16 x 6 = 96 on the target
    # and 10 x 6 = 60 ignored. Without them: union 180 + 176 - 96 = 260; with LISA's rule: 120 + 176 - 96 = 200
    assert (row["inter"], row["union"]) == (96, 200) and len(row["points"]) == 2
    gt = data.read_mask(a["mask_path"])
    pred = S.box_mask((64, 48), row["box"])
    assert R.mask_counts(pred, gt) == (96, 260) and R.mask_counts(pred, gt, ignore) == (96, 200)
    with pytest.raises(ValueError, match="differ"):
        R.mask_counts(pred, gt, ignore[:, :10])
    # an ignore mask the image does not match is a bad record, named with its line
    Image.new("L", (10, 10)).save(tmp_path / "out" / "masks" / "ignore" / "a.png")
    with pytest.raises(data.ManifestError, match=r"seg\.jsonl:1: mask .*ignore.* is 10x10 but the image is 64x48"):
        data.read_manifest(paths["seg"], "seg")


def test_visrl_real_boxes_keep_three_decimals_and_are_never_rounded():
    """VisCoT writes boxes with 3 decimals; the shapes world's 2 would cost a small text line its IoU
    (here 0.738) or its box (a line 0.4 % of the image high rounds to an empty box)."""
    text, box = visrl.canonical_box("[0.1234, 0.5, 0.6789, 0.5039]")
    assert box == [0.1234, 0.5, 0.6789, 0.5039] and text == "[0.123, 0.500, 0.679, 0.504]"
    line = [0.213, 0.402, 0.577, 0.417]              # 1.5 % of the image high
    assert rewards.box_iou(visrl.canonical_box(data.format_viscot_box(line))[1], line) == approx(1.0)
    # 2 decimals: [0.21, 0.40, 0.58, 0.42]: intersection 0.364 x 0.015, union 0.37 x 0.02
    rounded = visrl.canonical_box(data.format_viscot_box(line), shapes=True)[1]
    assert rewards.box_iou(rounded, line) == approx(0.364 * 0.015 / (0.37 * 0.02))
    thin = [0.312, 0.500, 0.688, 0.504]
    assert visrl.canonical_box(data.format_viscot_box(thin))[1] == approx(thin)
    assert visrl.canonical_box(data.format_viscot_box(thin), shapes=True) == (None, None)
    assert data.format_viscot_box([-0.0, 0.25, 1.2, 0.5]) == "[0.000, 0.250, 1.000, 0.500]"


@pytest.mark.filterwarnings(PYCOCOTOOLS_NUMPY2)
def test_visrl_unreadable_judgement_drops_the_candidate(monkeypatch, tmp_path):
    """A judgement the critic wrote out of format drops its candidate (the released filter.py drops a None
    score) and is counted; before, it scored 0 and made the candidate the rejected one. The real record gets
    the paper's answer step (image, question, crop) and the released judge prompts."""
    viscot = converted_layouts(tmp_path)[2]
    rec = next(r for r in viscot if r["id"] == 1)
    calls = []
    script = iter([["[0.100, 0.300, 0.500, 0.700]", "[0.600, 0.000, 0.900, 0.400]"],   # K = 1: b1, b2 (IoU 0)
                   ["A red car.", "blue"],                                             # their answers
                   ['{"score": 0.9}', "The crop shows a car, I would rate it highly."],  # s_b: b2 unreadable
                   ['{"score": 1.0}', '{"score": 0.1}']])                              # s_r

    def fake(model, processor, convs, images, *a, **k):
        calls.append((convs, images))
        return next(script)

    monkeypatch.setattr(visrl, "generate_texts", fake)
    args = type("A", (), dict(attempts=1, gen_batch_size=1, max_new_tokens=32, temperature=2.0,
                              answer_max_new_tokens=128, answer_temperature=2.0, max_prompt_len=None,
                              iou_thresh=0.05, size_tol=0.3))()
    (q,) = visrl.generate_candidates(None, (None, None), None, [rec], args, random.Random(0))
    assert q["dropped"]["critic_unparsable"] == 1 and q["shapes"] is False
    assert [(c["which"], c["box"], c["s_b"], c["s_r"]) for c in q["candidates"]] == [("b1", [0.1, 0.3, 0.5, 0.7], 0.9, 1.0)]
    pairs, survivors, _ = visrl.make_pairs([q])
    assert pairs == [] and survivors["win_set"] == 1 and survivors["lose_set"] == 0      # no candidate to lose
    (answer_convs, answer_images), (box_convs, box_images), (score_convs, score_images) = calls[1:]
    assert [part["type"] for part in answer_convs[0][0]["content"]] == ["image", "text", "image"]
    assert answer_convs[0][0]["content"][1]["text"] == "\nWhich colour is the car? " + VISRL_COT + "\n"
    assert [im.size for im in answer_images[0]] == [(200, 100), (80, 40)]            # full image, crop of b1
    assert box_convs[0][0]["content"][-1]["text"] == JUDGE_BBOX.format("Which colour is the car?", "red")
    assert [im.size for im in box_images[0]] == [(80, 40)]                            # s_b: the crop alone
    assert score_convs[1][0]["content"][-1]["text"] == JUDGE_SCORE.format("Which colour is the car?", "red", "blue")
    assert [im.size for im in score_images[1]] == [(200, 100)]                        # s_r: the full image
    assert "critic_unparsable" in visrl.DROPPED                 # generation_round sums DROPPED into stats.json


# ====================================================================================================
# vlm.py: the model side on the tiny model (sampling, log-probs, shared prefix, frames)
# ====================================================================================================

def sampled_and_scored(model, processor, seed, max_new_tokens, temperature):
    """4 samples for a green image, and our log-probs of them: (batch, rollout, our log-probs, completion mask)."""
    batch = vlm.chat_inputs(processor, [[vlm.user_turn("Describe the image.")]], [[solid((40, 170, 60))]])
    torch.manual_seed(seed)
    roll = vlm.sample(model, processor, batch, num_generations=4, max_new_tokens=max_new_tokens,
                      temperature=temperature, return_scores=True)
    ours = vlm.completion_logprobs(model, roll["prompt"], roll["completion_ids"], roll["completion_mask"],
                                   temperature=temperature, suppress=vlm.suppressed_ids(processor))
    return batch, roll, ours, roll["completion_mask"].bool()


@contextlib.contextmanager
def shared_prefix(on):
    saved, vlm.SHARED_PREFIX = vlm.SHARED_PREFIX, on
    try:
        yield
    finally:
        vlm.SHARED_PREFIX = saved


def logprobs_and_grads(model, roll, processor, group_size, on):
    """Our log-probs of a rollout (group_size as GRPO passes it) and the gradient of a fixed function
    of them, with the shared-prefix path on or off."""
    model.zero_grad()
    with shared_prefix(on):
        logp = vlm.completion_logprobs(model, roll["prompt"], roll["completion_ids"], roll["completion_mask"],
                                       1.3, vlm.suppressed_ids(processor), group_size=group_size)
    (0.1 * logp.sum() + 0.01 * (logp ** 2).sum()).backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def two_prompt_batch(processor):
    """2 prompts of different lengths (row 0 left-padded) with images of two sizes (one portrait)."""
    convs = [[vlm.user_turn("Describe the image.")],
             [vlm.user_turn("Give the box of the blue square as [x1,y1,x2,y2], in a longer prompt.")]]
    images = [[solid((220, 40, 40), 112)], [solid((40, 80, 220), 84).resize((84, 140))]]
    return vlm.chat_inputs(processor, convs, images)


def assert_shared_rollouts_equal_plain(model, processor, batch, seen=None):
    """sample() with and without the shared prefix, greedy and seeded sampling (G 3, 10 tokens): the same
    tokens and texts, scores within 1e-5; `seen` (images per vision-tower call) cleared before each run
    and checked: each image once when shared, G times when not."""
    runs = {}
    for on in (False, True):
        for greedy in (True, False):
            if seen is not None:
                seen.clear()
            torch.manual_seed(3)
            with shared_prefix(on):
                runs[on, greedy] = vlm.sample(model, processor, batch, 3, 10, temperature=1.3, do_sample=not greedy,
                                              return_scores=True)
            if seen is not None:
                assert seen == ([2] if on else [6])
    for greedy in (True, False):
        plain, shared = runs[False, greedy], runs[True, greedy]
        assert torch.equal(shared["completion_ids"], plain["completion_ids"]), greedy
        assert shared["texts"] == plain["texts"]
        mask = plain["completion_mask"].bool()
        torch.testing.assert_close(shared["sampled_logp"][mask], plain["sampled_logp"][mask], atol=1e-5, rtol=0)
    assert len(set(runs[False, False]["texts"])) > 1                 # sampling did sample


# shared-prefix log-probs under gradient checkpointing
@contextlib.contextmanager
def grad_checkpointing(model):
    """Training mode with non-reentrant gradient checkpointing (as the pipelines train); off, eval mode after."""
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        model.gradient_checkpointing_disable()
        model.zero_grad()
        model.eval()


@contextlib.contextmanager
def forward_counts(model):
    """{"images": images per vision-tower call, "attn": (rows, tokens) per call of the first text layer's
    attention}. The attention is a submodule of the checkpointed layer, so its replays in backward count."""
    seen = {"images": [], "attn": []}
    hooks = [model.model.visual.register_forward_pre_hook(
                 lambda m, args, kwargs: seen["images"].append(len(kwargs.get("grid_thw", args[-1]))),
                 with_kwargs=True),
             model.model.language_model.layers[0].self_attn.register_forward_pre_hook(
                 lambda m, args, kwargs: seen["attn"].append(tuple(kwargs["hidden_states"].shape[:2])),
                 with_kwargs=True)]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def assert_checkpointed_shared_prefix_equals_plain(model, processor, batch, G=3):
    """Under gradient checkpointing, G completions of each prompt of `batch`: the shared-prefix log-probs and
    gradients equal the plain path's (fp32), and the shared path was taken: the vision tower saw each image
    once, the text layers ran the B prompts once and the N = B x G completions alone, each pass twice
    (forward, then its replay in backward)."""
    torch.manual_seed(0)
    roll = vlm.sample(model, processor, batch, G, 10, temperature=1.3)
    B, P, T = batch["input_ids"].shape + roll["completion_ids"].shape[1:]
    runs = {}
    with grad_checkpointing(model):
        for on in (False, True):
            with forward_counts(model) as seen:
                runs[on] = logprobs_and_grads(model, roll, processor, G, on)
            runs[on] += (seen,)
    (plain, plain_grads, plain_seen), (shared, shared_grads, shared_seen) = runs[False], runs[True]
    assert plain_seen == {"images": [B * G], "attn": [(B * G, P + T)] * 2}
    assert shared_seen == {"images": [B], "attn": [(B, P), (B * G, T), (B * G, T), (B, P)]}
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    assert shared_grads.keys() == plain_grads.keys() and len(plain_grads) > 10
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    return roll


def _segment(tiny, lengths, width, budget):
    """Two completions (prompt-major, one prompt) of `lengths` valid tokens, padded to `width`."""
    model, processor = tiny
    batch = vlm.chat_inputs(processor, [[vlm.user_turn("What colour?")]], [[solid((200, 0, 0))]])
    prompt = vlm.repeat_batch(batch, len(lengths), processor.tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    ids = torch.full((len(lengths), width), processor.tokenizer.encode("red", add_special_tokens=False)[0])
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    return {"prompt": prompt, "completion_ids": ids, "completion_mask": mask, "temperature": 1.0,
            "max_new_tokens": budget}


class CapturedGrads:
    """An optimizer stand-in for grpo_update's plain-module path: keeps the gradients, changes nothing."""
    def __init__(self, model):
        self.model, self.grads = model, None

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def test_tiny_model_is_real_qwen2vl_and_tokenizer_keeps_tags(tiny):
    model, processor = tiny
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2VLProcessor"
    tok = processor.tokenizer
    for tag in tiny_py.TAG_TOKENS + tiny_py.SPECIAL_TOKENS:        # every tag and special token is ONE token
        assert len(tok.encode(tag, add_special_tokens=False)) == 1, tag
    ids = tok.encode("<think>a red circle</think><answer>[1,2,3,4]</answer><|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "<think>a red circle</think><answer>[1,2,3,4]</answer>"
    # Qwen2's pre-tokenizer splits digits one by one: "1000" is 4 tokens
    assert len(tok.encode("1000", add_special_tokens=False)) == 4


@pytest.mark.slow
def test_padded_batch_logprobs_equal_each_sample_alone(tiny):
    model, processor = tiny
    convs = [[vlm.user_turn("What colour is this image?")],
             [vlm.user_turn("Give the box of the red circle as [x1,y1,x2,y2]. Think first, then answer.")]]
    images = [[solid((220, 40, 40))], [solid((40, 80, 220), 84)]]
    batch = vlm.chat_inputs(processor, convs, images)
    lengths = batch["attention_mask"].sum(1)
    assert lengths[0] < lengths[1] and batch["attention_mask"][0, 0] == 0      # sample 0 is left-padded
    torch.manual_seed(0)
    roll = vlm.sample(model, processor, batch, num_generations=2, max_new_tokens=10)
    together = vlm.completion_logprobs(model, roll["prompt"], roll["completion_ids"], roll["completion_mask"])
    for i in range(4):
        alone_batch = vlm.chat_inputs(processor, [convs[i // 2]], [images[i // 2]])
        n = int(roll["completion_mask"][i].sum())
        alone = vlm.completion_logprobs(model, dict(alone_batch), roll["completion_ids"][i:i + 1, :n],
                                        roll["completion_mask"][i:i + 1, :n])
        torch.testing.assert_close(together[i, :n], alone[0], atol=1e-5, rtol=0)


def test_logprobs_equal_the_scores_generate_sampled_with(tiny):
    model, processor = tiny
    _, roll, ours, mask = sampled_and_scored(model, processor, seed=1, max_new_tokens=12, temperature=0.7)
    torch.testing.assert_close(ours[mask], roll["sampled_logp"][mask], atol=1e-4, rtol=0)
    # and the temperature matters: at T=1 the same tokens get other log-probs
    at_one = vlm.completion_logprobs(model, roll["prompt"], roll["completion_ids"], roll["completion_mask"],
                                     temperature=1.0, suppress=vlm.suppressed_ids(processor))
    assert (at_one[mask] - roll["sampled_logp"][mask]).abs().max() > 1e-3


@pytest.mark.slow
def test_shared_prefix_logprobs_equal_the_plain_path(tiny):
    """Each distinct prompt run once, its KV cache shared by its G completions: log-probs
    (fp32, <= 1e-5), gradients and the scores generate() sampled with equal the plain path's, with 2
    prompts of different lengths (left padding) and two images of different sizes (one portrait)."""
    model, processor = tiny
    convs = [[vlm.user_turn("Describe the image.")],
             [vlm.user_turn("Give the box of the blue square as [x1,y1,x2,y2], in a longer prompt.")]]
    images = [[solid((220, 40, 40), 112)], [solid((40, 80, 220), 84).resize((84, 140))]]
    batch = vlm.chat_inputs(processor, convs, images)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()          # row 0 is left-padded
    torch.manual_seed(0)
    with torch.no_grad():
        roll = vlm.sample(model, processor, batch, 3, 10, temperature=1.3, return_scores=True)
    model.train()
    try:
        plain, plain_grads = logprobs_and_grads(model, roll, processor, 3, on=False)
        shared, shared_grads = logprobs_and_grads(model, roll, processor, 3, on=True)
    finally:
        model.zero_grad()
        model.eval()
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    mask = roll["completion_mask"].bool()
    torch.testing.assert_close(shared[mask], roll["sampled_logp"][mask], atol=1e-4, rtol=0)
    assert shared_grads.keys() == plain_grads.keys() and len(plain_grads) > 10
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="copies of one prompt"):        # rows 0-1 and 2-3 are not one prompt
        vlm.completion_logprobs(model, roll["prompt"], roll["completion_ids"], roll["completion_mask"], group_size=2)


@pytest.mark.slow
def test_shared_prefix_dpo_pairs_equal_the_plain_path(tiny):
    """dpo.pair_logps runs each prompt once for its chosen and rejected response: the four summed
    log-probs equal the plain path's, and each equals a response scored alone."""
    model, processor = tiny
    convs = [[vlm.user_turn("Which colour?")], [vlm.user_turn("Where is the shape? Answer in one word.")]]
    images = [[solid((220, 40, 40))], [solid((40, 170, 60), 112)]]
    chosen, rejected = ["red", "[0.1,0.2,0.5,0.6]"], ["a green shape", "top"]
    with torch.no_grad():
        with shared_prefix(False):
            plain = vlm.pair_logps(model, model, processor, convs, images, chosen, rejected, "cpu")
        with shared_prefix(True):
            shared = vlm.pair_logps(model, model, processor, convs, images, chosen, rejected, "cpu")
        alone = vlm.response_logps(model, processor, convs[1:], images[1:], rejected[1:], "cpu")
    for a, b in zip(shared, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert shared[1][1].item() == approx(alone[0].item(), abs=1e-4)


@pytest.mark.slow
def test_shared_prefix_generation_samples_what_the_plain_path_samples(tiny):
    """sample() prefills each prompt once and generate() decodes its G rows from the repeated
    cache: the vision tower sees each image once (not G times), and greedy and seeded sampling give the
    plain path's tokens and scores (fp32, <= 1e-5), with left padding and two image sizes."""
    model, processor = tiny
    batch = two_prompt_batch(processor)
    seen = []                                     # images per vision-tower call
    hook = model.model.visual.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(len(kwargs.get("grid_thw", args[-1]))), with_kwargs=True)
    try:
        assert_shared_rollouts_equal_plain(model, processor, batch, seen)
    finally:
        hook.remove()


@pytest.mark.slow
def test_shared_prefix_logprobs_under_gradient_checkpointing_equal_the_plain_path(tiny):
    """With gradient checkpointing on (how real runs train), each prompt still runs once with its
    KV cache shared by its G completions, both passes checkpointed, the prefix replay storing nothing twice:
    log-probs and gradients equal the plain path's, with left padding and two image sizes; and the
    read-only-cache switch of the text layers is back to off afterwards."""
    model, processor = tiny
    batch = two_prompt_batch(processor)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()          # row 0 is left-padded
    roll = assert_checkpointed_shared_prefix_equals_plain(model, processor, batch)
    assert not any(layer._can_checkpoint_with_cache for layer in model.model.language_model.layers)
    with torch.no_grad():               # and the values are those of checkpointing off
        off = vlm.completion_logprobs(model, roll["prompt"], roll["completion_ids"], roll["completion_mask"],
                                      1.3, vlm.suppressed_ids(processor), group_size=3)
    with grad_checkpointing(model):
        on = vlm.completion_logprobs(model, roll["prompt"], roll["completion_ids"], roll["completion_mask"],
                                     1.3, vlm.suppressed_ids(processor), group_size=3)
    torch.testing.assert_close(on.detach(), off, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_shared_prefix_under_gradient_checkpointing_on_both_real_architectures(real_arch):
    """The same on Qwen2-VL and Qwen2.5-VL (window attention in the vision tower, its own M-RoPE)."""
    for family, path in real_arch.items():
        model, processor = vlm.load_model(path)
        assert_checkpointed_shared_prefix_equals_plain(model, processor, two_prompt_batch(processor))


@pytest.mark.slow
def test_shared_prefix_dpo_pairs_under_gradient_checkpointing(tiny):
    """DPO's pairs (group 2: chosen and rejected on one prompt run once) under gradient checkpointing, with
    gradients: the DPO loss and every gradient equal the plain path's, and each prompt's image is seen once."""
    model, processor = tiny
    convs = [[vlm.user_turn("Which colour?")], [vlm.user_turn("Where is the shape? Answer in one word.")]]
    images = [[solid((220, 40, 40))], [solid((40, 170, 60), 112)]]
    chosen, rejected = ["red", "[0.1,0.2,0.5,0.6]"], ["a green shape", "top"]
    results = {}
    with grad_checkpointing(model):
        for on in (False, True):
            model.zero_grad()
            with shared_prefix(on), forward_counts(model) as seen:
                logps = vlm.pair_logps(model, model, processor, convs, images, chosen, rejected, "cpu")
                loss, _ = dpo.dpo_loss(logps[0], logps[1], logps[2] - 0.3, logps[3] + 0.2)   # a non-zero margin
                (loss + 0.01 * (logps[0] - logps[1]).square().sum()).backward()
            results[on] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            assert seen["images"] == ([2, 2] if on else [4, 4])          # policy (with grad), then reference
    (plain, plain_grads), (shared, shared_grads) = results[False], results[True]
    assert shared == approx(plain, abs=1e-6)
    assert shared_grads.keys() == plain_grads.keys() and len(plain_grads) > 10
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_shared_prefix_two_segment_update_under_gradient_checkpointing(tiny, monkeypatch):
    """RISE-CoT's trajectory (a CoT segment of G rows on one prompt, then reconstruction rows on their own
    prompts) under gradient checkpointing: the two-segment test below, which checks the loss, its KL and
    every gradient against the plain path's and that the CoT segment takes the shared path (policy and
    reference), with checkpointing on throughout (grpo_update puts the model in training mode)."""
    with grad_checkpointing(tiny[0]):
        test_shared_prefix_two_segment_update_equals_the_plain_path(tiny, monkeypatch)
        assert vlm.is_checkpointing(tiny[0])


@pytest.mark.slow
def test_checkpoint_generation_config_never_changes_what_is_sampled(tiny):
    # Qwen checkpoints ship a generation_config.json with repetition_penalty 1.05, top_k, top_p:
    # generate() would apply them (it fills every unset option from it) while our log-probs do
    # not. The sampled scores must still equal our log-probs (fp32, tight), and greedy must be argmax.
    model, processor = tiny
    saved = model.generation_config
    model.generation_config = type(saved).from_dict(dict(saved.to_dict(), repetition_penalty=1.05, top_k=20,
                                                         top_p=0.5, temperature=0.1, no_repeat_ngram_size=2))
    try:
        batch, roll, ours, mask = sampled_and_scored(model, processor, seed=3, max_new_tokens=16, temperature=1.0)
        torch.testing.assert_close(ours[mask], roll["sampled_logp"][mask], atol=1e-5, rtol=0)
        greedy = vlm.sample(model, processor, batch, max_new_tokens=8, do_sample=False)
        ids, first = greedy["completion_ids"], greedy["completion_ids"][:, :1]
        scored = vlm.completion_logprobs(model, greedy["prompt"], first, torch.ones_like(first),
                                         suppress=vlm.suppressed_ids(processor))
        # the greedy first token is the argmax: its log-prob is the row's maximum
        logits = model(**{k: v for k, v in greedy["prompt"].items()}).logits[:, -1].float()
        logits[:, vlm.suppressed_ids(processor)] = float("-inf")
        assert ids[0, 0].item() == logits.argmax(-1).item()
        assert scored[0, 0].item() == pytest.approx(logits.log_softmax(-1).max().item(), abs=1e-5)
        assert model.generation_config.repetition_penalty == 1.05          # restored afterwards
    finally:
        model.generation_config = saved


@pytest.mark.slow
def test_chunked_logprobs_and_gradients_equal_one_piece(tiny):
    """The row-chunked, checkpointed path (used for a 151k vocabulary) gives the same values and
    the same gradients as scoring the whole batch at once."""
    model, processor = tiny
    batch = vlm.chat_inputs(processor, [[vlm.user_turn("Describe the image.")]] * 2,
                            [[solid((200, 30, 30))], [solid((30, 30, 200))]])
    torch.manual_seed(4)
    roll = vlm.sample(model, processor, batch, num_generations=3, max_new_tokens=8)
    args = (roll["prompt"], roll["completion_ids"], roll["completion_mask"], 0.9, vlm.suppressed_ids(processor))
    results = []
    for kwargs in ({}, {"chunk_rows": 4, "one_piece_bytes": 0}):    # 6 rows -> chunks of 4 and 2
        model.zero_grad()
        logp = vlm.completion_logprobs(model, *args, **kwargs)
        logp.sum().backward()
        results.append((logp.detach(), model.lm_head.weight.grad.clone(), model.model.visual.patch_embed.proj.weight.grad.clone()))
    model.zero_grad()
    for one, chunked in zip(*results):
        torch.testing.assert_close(one, chunked, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_batch2_group3_each_completion_is_scored_under_its_own_image(tiny):
    model, processor = tiny
    red, blue = solid((220, 40, 40)), solid((40, 80, 220))
    convs = [[vlm.user_turn("What colour is this image?")]] * 2
    batch = vlm.chat_inputs(processor, convs, [[red], [blue]])
    torch.manual_seed(2)
    roll = vlm.sample(model, processor, batch, num_generations=3, max_new_tokens=8, return_scores=True)
    ids, mask = roll["completion_ids"], roll["completion_mask"]
    # prompt-major order: rows 0-2 answer the red image, rows 3-5 the blue one
    rows = batch["image_grid_thw"][0].prod().item()
    expanded = roll["prompt"]["pixel_values"]
    for i in range(6):
        own = batch["pixel_values"][:rows] if i < 3 else batch["pixel_values"][rows:]
        torch.testing.assert_close(expanded[i * rows:(i + 1) * rows], own)
    suppress = vlm.suppressed_ids(processor)
    own_logp = vlm.completion_logprobs(model, roll["prompt"], ids, mask, suppress=suppress)
    torch.testing.assert_close(own_logp[mask.bool()], roll["sampled_logp"][mask.bool()], atol=1e-4, rtol=0)
    # the same completions scored with the images swapped: every row changes
    swapped = vlm.repeat_batch(vlm.chat_inputs(processor, convs, [[blue], [red]]), 3,
                               processor.tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    other_logp = vlm.completion_logprobs(model, swapped, ids, mask, suppress=suppress)
    per_row_diff = ((own_logp - other_logp).abs() * mask).sum(1)
    assert (per_row_diff > 1e-4).all(), per_row_diff
    # the bug this guards against: repeating pixel_values wholesale gives rows 1, 2 the wrong image
    wholesale = batch["pixel_values"].repeat(3, 1)
    assert not torch.equal(wholesale[rows:2 * rows], expanded[rows:2 * rows])


@pytest.mark.slow
def test_image_pad_token_is_never_sampled(tiny_dir):
    model, processor = vlm.load_model(tiny_dir)
    with torch.no_grad():                    # a uniform policy: every token equally likely
        model.lm_head.weight.zero_()
    batch = vlm.chat_inputs(processor, [[vlm.user_turn("Say anything.")]] * 2, [[solid((0, 0, 0))]] * 2)
    vision = torch.tensor(vlm.suppressed_ids(processor))
    torch.manual_seed(3)
    roll = vlm.sample(model, processor, batch, num_generations=8, max_new_tokens=64)
    sampled = roll["completion_ids"][roll["completion_mask"].bool()]
    assert sampled.numel() > 500
    assert not torch.isin(sampled, vision).any()
    # control: without the suppression the same uniform policy does emit vision tokens
    expanded = vlm.repeat_batch(batch, 8, processor.tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    torch.manual_seed(3)
    raw = model.generate(**expanded, max_new_tokens=64, do_sample=True, top_k=0, top_p=1.0, eos_token_id=[])
    assert torch.isin(raw[:, expanded["input_ids"].shape[1]:], vision).any()


def test_too_long_prompt_is_rejected_not_cut_inside_image_tokens(tiny):
    _, processor = tiny
    conv = [[vlm.user_turn("a long question " * 40)]]
    full = vlm.chat_inputs(processor, conv, [[solid((1, 2, 3))]])
    n = int(full["attention_mask"].sum())
    with pytest.raises(vlm.PromptTooLong, match=f"{n} tokens"):
        vlm.chat_inputs(processor, conv, [[solid((1, 2, 3))]], max_prompt_len=n - 1)
    assert vlm.chat_inputs(processor, conv, [[solid((1, 2, 3))]], max_prompt_len=n)["input_ids"].shape[1] == n


def test_completion_mask_stops_after_first_eos():
    eos = [7]
    ids = torch.tensor([[5, 7, 9, 7], [1, 2, 3, 4], [7, 0, 0, 0]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])   # EOS itself is kept
    assert torch.equal(vlm.completion_mask_from_ids(ids, eos), expected)


def test_save_load_gives_identical_outputs(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again, processor2 = vlm.load_model(tmp_path)
    batch = vlm.chat_inputs(processor2, [[vlm.user_turn("Describe the image.")]], [[solid((9, 99, 199))]])
    assert torch.equal(batch["input_ids"], vlm.chat_inputs(processor, [[vlm.user_turn("Describe the image.")]],
                                                           [[solid((9, 99, 199))]])["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, again(**batch).logits, atol=0, rtol=0)


def test_sft_loss_counts_only_assistant_tokens(tiny):
    model, processor = tiny
    conv = [vlm.user_turn("What colour is this image?"), vlm.assistant_turn("red")]
    batch = vlm.chat_inputs(processor, [conv], [[solid((220, 40, 40))]], add_generation_prompt=False)
    mask = vlm.assistant_mask(batch["input_ids"], processor)[0]
    tok = processor.tokenizer
    # the target is exactly "red<|im_end|>"
    assert tok.decode(batch["input_ids"][0][mask.bool()]) == "red<|im_end|>"
    # independent computation: cross-entropy of the two target tokens from the logits
    with torch.no_grad():
        logits = model(**batch).logits[0]
        positions = mask.nonzero().squeeze(1)
        manual = torch.stack([-logits[p - 1].log_softmax(-1)[batch["input_ids"][0, p]] for p in positions]).mean()
        torch.testing.assert_close(vlm.sft_loss(model, processor, [conv], [[solid((220, 40, 40))]]), manual)
    # a different prompt with the same answer changes the loss (conditioning) but not the target
    conv2 = [vlm.user_turn("Name the colour of the picture, please."), vlm.assistant_turn("red")]
    b2 = vlm.chat_inputs(processor, [conv2], [[solid((220, 40, 40))]], add_generation_prompt=False)
    assert tok.decode(b2["input_ids"][0][vlm.assistant_mask(b2["input_ids"], processor)[0].bool()]) == "red<|im_end|>"


def test_two_assistant_turns_are_both_targets(tiny):
    _, processor = tiny
    conv = [vlm.user_turn("Q?"), vlm.assistant_turn("[0.1,0.2,0.3,0.4]"),
            vlm.user_turn("Now answer."), vlm.assistant_turn("blue")]
    batch = vlm.chat_inputs(processor, [conv], [[solid((1, 1, 1)), solid((2, 2, 2))]], add_generation_prompt=False)
    mask = vlm.assistant_mask(batch["input_ids"], processor)[0]
    assert processor.tokenizer.decode(batch["input_ids"][0][mask.bool()]) == "[0.1,0.2,0.3,0.4]<|im_end|>blue<|im_end|>"


def test_box_frames_both_ways_for_both_model_families(tiny):
    _, processor = tiny
    # Qwen2-VL: 0..1000 of the original image. A 200x100 image: x*5, y*10.
    assert vlm.to_model_frame([20, 10, 100, 50], "qwen2_vl", (200, 100)) == [100, 100, 500, 500]
    assert vlm.from_model_frame([100, 100, 500, 500], "qwen2_vl", (200, 100)) == [20, 10, 100, 50]
    # Qwen2.5-VL: pixels of the resized input. The tiny processor (patch 14 x merge 2 = 28,
    # max 224*224 pixels) resizes 280x140 to 280x140 (both multiples of 28, 39200 <= 50176): scale 1.
    assert vlm.to_model_frame([28, 14, 140, 70], "qwen2_5_vl", (280, 140), processor) == [28, 14, 140, 70]
    # 560x280 has 156800 > 50176 pixels: beta = sqrt(156800/50176) = 1.7678; 560/1.7678 = 316.8 -> floor
    # to a multiple of 28: 308; 280/1.7678 = 158.4 -> 140. So x scales by 308/560 = 0.55, y by 140/280 = 0.5.
    assert vlm.to_model_frame([100, 100, 200, 200], "qwen2_5_vl", (560, 280), processor) == [55, 50, 110, 100]
    back = vlm.from_model_frame([55, 50, 110, 100], "qwen2_5_vl", (560, 280), processor)
    assert back == pytest.approx([100, 100, 200, 200])


@pytest.mark.slow
def test_shared_prefix_generation_on_both_real_architectures(real_arch):
    """The shared-prefix rollouts on Qwen2-VL and Qwen2.5-VL (window attention in the vision tower, its own
    M-RoPE offsets): the plain path's tokens and scores."""
    for family, path in real_arch.items():
        model, processor = vlm.load_model(path)
        assert_shared_rollouts_equal_plain(model, processor, two_prompt_batch(processor))


@pytest.mark.slow
def test_real_architectures_keep_the_published_structure(real_arch):
    for family, path in real_arch.items():
        model, processor = vlm.load_model(path)
        text, vision = model.config.text_config, model.config.vision_config
        assert model.config.model_type == family and text.num_hidden_layers == 2 and vision.depth == 2
        # published: head_dim 1536 / 12 = 2048 / 16 = 128, M-RoPE sections [16, 24, 24] summing to 128 / 2
        head_dim = text.hidden_size // text.num_attention_heads
        assert head_dim == 128 and sum(text.rope_parameters["mrope_section"]) == head_dim // 2
        assert text.num_attention_heads // text.num_key_value_heads == (6 if family == "qwen2_vl" else 8)
        if family == "qwen2_5_vl":       # window attention (112 px windows), then a full-attention block
            assert vision.window_size == 112 and vision.fullatt_block_indexes == [1]
            assert vision.out_hidden_size == text.hidden_size
        ip = processor.image_processor
        assert (ip.patch_size, ip.merge_size, ip.size["shortest_edge"], ip.size["longest_edge"]) == \
            (14, 2, 56 * 56, 28 * 28 * 16384)
        rendered = processor.apply_chat_template([vlm.user_turn("Hi", 0)], tokenize=False, add_generation_prompt=True)
        assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        gen = model.generation_config
        assert (gen.repetition_penalty, gen.top_k, gen.top_p, gen.temperature) == (1.05, 1, 0.001, 0.1)
        # sampling = scoring on the real path too, whatever the shipped generation config says
        batch = vlm.chat_inputs(processor, [[vlm.user_turn("What colour?")]], [[solid((200, 30, 30), 112)]])
        torch.manual_seed(0)
        roll = vlm.sample(model, processor, batch, 3, 6, return_scores=True)
        ours = vlm.completion_logprobs(model, roll["prompt"], roll["completion_ids"], roll["completion_mask"],
                                       suppress=vlm.suppressed_ids(processor))
        mask = roll["completion_mask"].bool()
        torch.testing.assert_close(ours[mask], roll["sampled_logp"][mask], atol=1e-5, rtol=0)


def test_paper_presets_fit_a_megapixel_photo_in_the_prompt_limit(real_arch):
    # Each pipeline's paper preset caps the image size (RISE: 401,408 pixels; Seg-RISE: 840x840 as Seg-Zero;
    # VisRL: 768x768 a picture, two pictures a prompt) so an ordinary 1000x1000 photo fits its prompt limit.
    # The tiny tokenizer spends more tokens on text than Qwen's, so this is the harder case. Without the
    # cap the published processor makes 36 x 36 = 1296 tokens of it: over 1024 on its own.
    photo = Image.new("RGB", (1000, 1000), (120, 90, 60))
    det = {"target": "the dog", "boxes": [[100, 100, 300, 300], [500, 500, 700, 700]], "multi": True}
    for family, path in real_arch.items():
        model, _ = vlm.load_model(path)
        cases = {"rise_cot": (rise_cot, [[vlm.user_turn(data.prompt("cot", det, boxes=det["boxes"],
                                                                    frame=(1000, 1000)))]], [[photo]]),
                 "rise_r1": (rise_r1, [[vlm.user_turn(data.prompt("r1", det, frame=(1000, 1000)))]], [[photo]]),
                 "seg_rise": (S, [[vlm.user_turn(S.prompt_text("the dog on the left", frame=(1000, 1000)))]], [[photo]]),
                 "visrl": (visrl, [visrl.answer_turns("What colour is the dog?", "[0.10,0.10,0.50,0.50]")],
                           [[photo, photo]])}
        for name, (script, convs, images) in cases.items():
            args = script.parse_args(["--model", str(path), "--preset", "paper"])
            _, processor = vlm.load_model(path, max_pixels=args.max_pixels)
            batch = vlm.chat_inputs(processor, convs, images, max_prompt_len=args.max_prompt_len)
            assert batch["attention_mask"].sum() <= args.max_prompt_len, (family, name)
        _, uncapped = vlm.load_model(path)
        with pytest.raises(vlm.PromptTooLong):
            vlm.chat_inputs(uncapped, cases["rise_r1"][1], [[photo]], max_prompt_len=1024)


def test_dr_grpo_divides_by_the_generation_budget_not_the_longest_completion(tiny):
    # Dr. GRPO (arXiv 2503.20783) / TRL dr_grpo: loss = -sum_{i,t} A_i rho_t / (N * max_new_tokens).
    # rewards [1, 0], unscaled -> A = [+0.5, -0.5]; rho = 1 (one update per batch).
    # Completions of 6 and 3 tokens, all ended by token 6 of a budget of 8:
    #   -(0.5*6 - 0.5*3) / (2*8) = -1.5/16 = -0.09375   (dividing by the longest, 6, gave -1.5/12 = -0.125)
    model, _ = tiny
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    try:
        one = _segment(tiny, [6, 3], 6, budget=8)
        stats = vlm.grpo_update(model, None, [one], t([1.0, 0.0]), 2, optimizer=sgd, beta=0.0, norm="fixed",
                                scale_rewards=False)
        assert stats["loss"] == pytest.approx(-0.09375, abs=1e-6)
        # RISE-CoT's two-part trajectory: the budget is the sum, 8 + 4 = 12; tokens 6+2 and 3+4:
        #   -(0.5*8 - 0.5*7) / (2*12) = -0.5/24
        two = _segment(tiny, [2, 4], 4, budget=4)
        stats = vlm.grpo_update(model, None, [one, two], t([1.0, 0.0]), 2, optimizer=sgd, beta=0.0, norm="fixed",
                                scale_rewards=False)
        assert stats["loss"] == pytest.approx(-0.5 / 24, abs=1e-6)
        with pytest.raises(ValueError, match="max_new_tokens"):
            vlm.grpo_update(model, None, [dict(one, max_new_tokens=None)], t([1.0, 0.0]), 2, optimizer=sgd,
                            beta=0.0, norm="fixed")
    finally:
        model.eval()


def test_shared_prefix_two_segment_update_equals_the_plain_path(tiny, monkeypatch):
    """A RISE-CoT-shaped trajectory, a CoT segment whose G rows share one prompt (run once)
    then reconstruction rows with different prompts (run plainly), with the KL to a reference: the
    GRPO loss, its KL and every gradient equal the plain path's."""
    model, processor = tiny
    cot = dict(_segment(tiny, [6, 3], 6, budget=8), group_size=2)
    convs = [[vlm.user_turn("Rebuild: a red circle.")], [vlm.user_turn("Rebuild from a much longer description.")]]
    rec_prompt = vlm.chat_inputs(processor, convs, [[solid((200, 0, 0))], [solid((0, 0, 200), 84)]])
    rec = dict(_segment(tiny, [2, 4], 4, budget=4), prompt=rec_prompt)         # no group_size: one row each
    results, calls, real = {}, [], vlm.shared_prefix_hidden
    monkeypatch.setattr(vlm, "shared_prefix_hidden", lambda *a: calls.append(a[4]) or real(*a))
    try:
        for on in (False, True):
            capture = CapturedGrads(model)
            with shared_prefix(on):
                stats = vlm.grpo_update(model, model, [cot, rec], t([1.0, 0.0]), 2, optimizer=capture,
                                        beta=0.04, scale_rewards=False)
            results[on] = stats, capture.grads
    finally:
        model.zero_grad()
        model.eval()
    assert calls == [2, 2]                     # shared path on: the CoT segment, policy and reference; off: none
    (plain, plain_grads), (shared, shared_grads) = results[False], results[True]
    assert shared["loss"] == approx(plain["loss"], abs=1e-6) and shared["kl"] == approx(plain["kl"], abs=1e-6)
    assert shared_grads.keys() == plain_grads.keys() and len(plain_grads) > 10
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_sampling_ends_at_every_eos_the_checkpoint_declares(real_arch):
    """Qwen's generation_config ends a reply at <|im_end|> or <|endoftext|>, the tokenizer names only the
    first: a completion that writes <|endoftext|> (forced here at step 3 of row 0, greedy) ends there."""
    model, processor = vlm.load_model(real_arch["qwen2_vl"])
    tok = processor.tokenizer
    im_end, end_of_text = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tok.eos_token_id == im_end and model.generation_config.eos_token_id == [im_end, end_of_text]
    assert vlm.eos_ids(processor, model) == sorted([im_end, end_of_text])
    batch = two_prompt_batch(processor)
    free = vlm.sample(model, processor, batch, max_new_tokens=6, do_sample=False)
    assert not torch.isin(free["completion_ids"][:, :3], torch.tensor([im_end, end_of_text])).any()
    steps = []

    def force(module, inputs, logits):              # the lm_head's logits of the third decoding step, row 0
        steps.append(1)
        if len(steps) == 3:
            logits = logits.clone()
            logits[0, -1, end_of_text] = logits[0, -1].max() + 10
        return logits
    hook = model.get_output_embeddings().register_forward_hook(force)
    try:
        forced = vlm.sample(model, processor, batch, max_new_tokens=6, do_sample=False)
    finally:
        hook.remove()
    ids, mask = forced["completion_ids"], forced["completion_mask"]
    assert ids.shape == (2, 6) and ids[0, 2] == end_of_text
    assert torch.equal(ids[0, :2], free["completion_ids"][0, :2]) and (ids[0, 3:] == tok.pad_token_id).all()
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], free["completion_mask"][1].tolist()]
    assert forced["texts"] == [tok.decode(ids[0, :2]), free["texts"][1]]
    assert torch.equal(ids[1], free["completion_ids"][1])          # the other row runs on
    ids, mask = vlm.completion_tensors(processor, ["a box"])                # DPO's targets still end in <|im_end|>
    assert ids[0, mask[0].sum() - 1] == im_end


def test_shapes_clip_build_save_load_and_determinism(clip_dir, tmp_path):
    cfg = json.loads((clip_dir / "config.json").read_text())
    assert cfg["captions"][:12] == tiny_py.CAPTIONS and len(tiny_py.CAPTIONS) == 12
    assert 0.0 <= cfg["zero_shot_accuracy"] <= 1.0 and cfg["n_crops"] > 0
    model, preprocess, tokenizer = S.load_clip("shapes", clip_dir)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    crop = Image.new("RGB", (30, 17), (220, 40, 40))
    assert preprocess(crop).shape == (3, 64, 64)
    assert tokenizer(["the red circle"]).shape == (1, 16)
    # the same seed rebuilds the same weights (on one thread count: both builds here)
    a, b = (safetensors_load(tiny_py.build_shapes_clip(tmp_path / name, seed=0, steps=2, batch_size=16, n_scenes=12,
                                                       log=lambda *a: None) / "model.safetensors") for name in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="holds no shapes CLIP"):
        S.load_clip("shapes", tmp_path / "missing")
    with pytest.raises(SystemExit, match="random CLIP"):
        S.load_clip("ViT-B-32", None)                    # never a random CLIP by accident


def test_freeze_vision_trains_the_merger_only_of_the_vision_side(tiny_dir):
    model, _ = vlm.load_model(tiny_dir)
    vlm.freeze_vision(model)
    visual = model.model.visual
    assert not any(p.requires_grad for n, p in visual.named_parameters() if not n.startswith("merger."))
    assert all(p.requires_grad for p in visual.merger.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())


# ====================================================================================================
# the pipelines' pieces, in-process (RISE, Seg-RISE, VisRL, run.py, tables.py, bench.py, tiny.py)
# ====================================================================================================

def _covered_pixels(box, crop):
    """Brute force: how many of box's unit pixels lie inside crop (integer boxes)."""
    grid = np.zeros((data.IMAGE_SIZE + 1, data.IMAGE_SIZE + 1), bool)
    grid[box[1]:box[3], box[0]:box[2]] = True
    inside = np.zeros_like(grid)
    inside[crop[1]:crop[3], crop[0]:crop[2]] = True
    return (grid & inside).sum(), grid.sum()


def ans(box, points=((250, 500), (100, 100)), think="the red half"):
    body = {"bbox": list(box)} if points is None else {"bbox": list(box), "points": [list(p) for p in points]}
    return (f"<think>{think}</think>" if think else "") + f"<answer>{json.dumps(body)}</answer>"


TEXTS = [ans([0, 0, 500, 1000]),            # -> pixels [0, 0, 100, 100]: all red, cos 1
         ans([500, 0, 1000, 1000]),         # -> [100, 0, 200, 100]: all green, cos 0
         ans([250, 0, 750, 1000]),          # -> [50, 0, 150, 100]: half/half, cos .5/sqrt(.5) = 0.707107
         ans([0, 0, 500, 1000], points=None, think=None),   # valid box, no think, no points
         "garbage with no answer",
         ans([0, 0, 1200, 1000])]           # beyond the frame: R_seg 0; crop clipped -> whole image, 0.707107


# (sem, think, seg) of each, by hand
EXPECTED = [(1.0, 1, 1), (0.0, 1, 1), (0.707107, 1, 1), (1.0, 0, 0), (0.0, 0, 0), (0.707107, 1, 0)]


@st.composite
def norm_boxes(draw, min_size=0.01, max_size=1.0):
    w = draw(st.floats(min_size, max_size))
    h = draw(st.floats(min_size, max_size))
    x1 = draw(st.floats(0.0, 1.0 - w))
    y1 = draw(st.floats(0.0, 1.0 - h))
    return [x1, y1, x1 + w, y1 + h]


def overlap_area(a, b):
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


class CountingRandom(random.Random):
    calls = 0

    def uniform(self, a, b):
        self.calls += 1
        return super().uniform(a, b)


def within_size_bound(out, b1, tol, mode):
    """VisRL eq. 3's size bound: the area within [1 - tol, 1 + tol] x b1's, b1's aspect ratio kept (mode
    "area", the paper), or the width and height each within +-tol of b1's ("sides", the released code)."""
    w1, h1, w, h = b1[2] - b1[0], b1[3] - b1[1], out[2] - out[0], out[3] - out[1]
    if mode == "area":
        return ((1 - tol) * w1 * h1 - 1e-9 <= w * h <= (1 + tol) * w1 * h1 + 1e-9
                and w / h == approx(w1 / h1, rel=1e-6))
    return w1 * (1 - tol) - 1e-9 <= w <= w1 * (1 + tol) + 1e-9 and h1 * (1 - tol) - 1e-9 <= h <= h1 * (1 + tol) + 1e-9


def cand(s_b, s_r, box=(0.1, 0.1, 0.3, 0.3), answer="red"):
    return {"box": list(box), "answer": answer, "s_b": s_b, "s_r": s_r}


THIN = "[0.50,0.10,0.51,0.90]"      # on a 400x2000 page a 4x1600 crop, aspect ratio 400


def _page(tmp_path, size=(400, 2000)):
    page = Image.new("RGB", size, "white")
    page.paste((220, 40, 40), (200, 200, 204, 1800))      # a red rule exactly under THIN
    page.save(tmp_path / "page.png")
    rec = {"id": "page", "image": "page.png", "question": "What colour is the rule?", "answer": "red"}
    return data.read_manifest(_write(tmp_path, [rec]), "vqa")[0]


class _EngineThatMustNotStep:
    """Records the DeepSpeed calls of an update (backward, step); a skipped update makes none."""

    def __init__(self):
        self.calls = []

    def set_gradient_accumulation_boundary(self, boundary):
        self.calls.append(("boundary", boundary))

    def backward(self, loss):
        self.calls.append(("backward", loss.item()))

    def step(self):
        self.calls.append(("step",))


def test_look_pools_go_from_one_shape_to_scenes(cache):
    """The look-question pools of the recipe: "where" pools of position questions about one shape drawn
    alone; two shapes of two colours, one named; --pixels 224 gives 64 image tokens instead of 16."""
    pools = tiny_py.probe_pools(tiny_py.pretrain_world(0, 6))
    assert len(pools["where_alone"]) == 6 * len(data.SHAPE_TASKS)           # one shape per training scene
    for conv, (image,) in pools["where_alone"]:
        assert conv[0]["content"][-1]["text"].startswith("Where ")
        assert len({px for px in map(tuple, np.asarray(image).reshape(-1, 3).tolist()) if len(set(px)) > 1}) == 1  # one shape colour, grey elsewhere
    for conv, (image,) in pools["where_pairs_colour"]:                   # two shapes, two colours, one named
        colours = {px for px in map(tuple, np.asarray(image).reshape(-1, 3).tolist()) if len(set(px)) > 1}
        assert len(colours) == 2 and conv[0]["content"][-1]["text"].endswith(" shape?")
        named = conv[0]["content"][-1]["text"].split()[3]
        assert data.COLORS[named] in colours
    processor = vlm.load_model(vlm.TINY_BASE)[1]
    image = data.render([], 220)
    after = vlm.chat_inputs(tiny_py.set_image_pixels(processor, 224), [[vlm.user_turn("Where?")]], [[image]])
    before = vlm.chat_inputs(tiny_py.set_image_pixels(processor, 112), [[vlm.user_turn("Where?")]], [[image]])
    assert before["image_grid_thw"].tolist() == [[1, 8, 8]] and after["image_grid_thw"].tolist() == [[1, 16, 16]]
    assert (after["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum() == 64


def test_look_examples_ask_only_what_the_scene_answers():
    """Two shapes of different kinds and one duplicate pair: colour questions only for a unique kind, kind
    questions only for a unique colour, where/box questions only for a unique (colour, kind); boxes in the
    0..1000 frame."""
    scene = [{"color": "red", "shape": "circle", "box": [0, 0, 28, 28]},
             {"color": "blue", "shape": "square", "box": [84, 84, 112, 112]},
             {"color": "blue", "shape": "square", "box": [84, 0, 112, 28]}]
    image = data.render(scene, 220)
    qa = [(conv[0]["content"][-1]["text"], conv[1]["content"][0]["text"])
          for conv, _ in tiny_py.look_examples(scene, image)]
    assert qa == [("What colour is the circle?", "red"), ("What kind is the red shape?", "circle"),
                  ("Where is the red circle?", "top-left"), ("Give the box of the red circle.", "[0,0,250,250]")]


def test_tiny_chat_template_puts_the_image_after_the_text(tiny):
    """The tiny model's own template: text, then image, in each user message (README: why)."""
    _, processor = tiny
    text = processor.apply_chat_template([vlm.user_turn("Q?")], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nQ?<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"


# ==== tiny base: look questions for every shape of a kind and for the shape in a quadrant
def _qa(examples):
    return [(conv[0]["content"][-1]["text"], conv[1]["content"][0]["text"]) for conv, _ in examples]


def test_kind_and_quadrant_look_questions_ask_only_what_the_scene_answers():
    """Kinds: one question per kind present, its boxes top to bottom (then left to right) in the 0..1000 frame;
    the large shape's kind only when it is 1.5 times as wide as every other. Quadrants: only a quadrant holding
    exactly one shape's centre is asked about (here the top-left holds two), box in 0..1 with 2 decimals."""
    scene = [{"color": "red", "shape": "circle", "box": [60, 70, 100, 110]},        # 40 px, bottom-right
             {"color": "blue", "shape": "circle", "box": [0, 0, 14, 14]},           # top-left
             {"color": "green", "shape": "square", "box": [30, 10, 50, 30]},        # top-left too
             {"color": "yellow", "shape": "circle", "box": [80, 0, 106, 26]}]       # 26 px, top-right
    image = data.render(scene, 220)
    assert _qa(tiny_py.kind_examples(scene, image)) == [
        ("What kind is the large shape?", "circle"),
        ("Give the boxes of all circles.", "[[0,0,125,125],[714,0,946,232],[536,625,893,982]]"),
        ("Give the boxes of all squares.", "[[268,89,446,268]]")]
    assert _qa(tiny_py.quadrant_examples(scene, image)) == [
        ("What colour is the shape in the top-right?", "yellow"), ("What shape is in the top-right?", "circle"),
        ("Give the box in 0..1 of the shape in the top-right.", "[0.71,0.00,0.95,0.23]"),
        ("What colour is the shape in the bottom-right?", "red"), ("What shape is in the bottom-right?", "circle"),
        ("Give the box in 0..1 of the shape in the bottom-right.", "[0.54,0.62,0.89,0.98]")]
    scene[3]["box"] = [70, 0, 106, 36]                          # 36 px: no longer 1.5 x narrower than 40 px
    assert "What kind is the large shape?" not in dict(_qa(tiny_py.kind_examples(scene, image)))


def test_kind_and_quadrant_look_questions_match_the_tasks_they_prepare(cache):
    """On a shapes world: every VQA record's question is asked by a quadrant look question with the record's
    answer, and its box turn's look question answers the record's box as VisRL's box turn writes it; every
    multi_det record's answer is the kinds look question's answer for its target; the "mixed" pool holds every
    other pool's questions (kinds three times) and is what the formats stage mixes in."""
    world = tiny_py.pretrain_world(0, 6)
    for task, rec in tiny_py.train_records(world):
        image = data.open_image(rec["image_path"])
        if task == "vqa":
            qa = dict(_qa(tiny_py.quadrant_examples(rec["scene"], image)))
            where = data.position_word(rec["box"], grid=2)
            assert qa[rec["question"]] == rec["answer"]
            assert qa[tiny_py.LOOK_IN_BOX.format(where=where)] == data.format_norm_box(rec["box"], *image.size)
        if task == "multi_det":
            qa = dict(_qa(tiny_py.kind_examples(rec["scene"], image)))
            assert qa[f"Give the boxes of all {rec['target']}."] == data.format_annotation(
                rec, [tiny_py.to_frame(b) for b in rec["boxes"]])
    pools = tiny_py.probe_pools(world)
    n = {name: len(pools[name]) for name in pools}
    assert n["kinds"] > 0 and n["quadrants"] > 0
    assert n["mixed"] == n["alone"] + n["pairs"] + 2 * n["scenes"] + 3 * n["kinds"] + 2 * n["quadrants"]
    assert {id(ex) for ex in pools["mixed"]} == {id(ex) for name in ("alone", "pairs", "scenes", "kinds", "quadrants")
                                                for ex in pools[name]}


def test_colour_reward_hand_cases():
    # exact first word (case, trailing punctuation and the rest ignored) -> 1.0
    assert tiny_py.colour_reward(["Red.", " blue sky"], [0, 1], ["red", "blue"]) == [1.0, 1.0]
    # a prefix earns partial x its share of the word: "bl" of "blue" 0.1 * 2/4; "re" of "red" 0.5 * 2/3
    # anything else 0: "tre" (contains "re" but is no prefix), "" (empty), "yellowish" (longer than the word)
    got = tiny_py.colour_reward(["bl", "tre", "", "yellowish"], [0, 1, 2, 3], ["blue", "red", "green", "yellow"])
    assert got == approx([0.05, 0.0, 0.0, 0.0])
    assert tiny_py.colour_reward(["re"], [0], ["red"], partial=0.5) == approx([1 / 3])


def test_critic_examples_are_labelled_by_the_scene(world):
    """s_b: a crop labelled 1 for a colour question shows that colour (pixels counted in the crop);
    s_r: label 1 iff the candidate is the reference, and wrong candidates are words of the same
    kind (a colour for a colour question). Both labels occur often."""
    rng = np.random.default_rng(0)
    n_box = n_hit = n_ans = n_same = positives = shows = 0
    records = _records(world, "vqa")
    for rec in records:
        image = Image.open(rec["image_path"]).convert("RGB")
        kind = "color" if rec["answer"] in data.COLORS else "shape"
        for conv, images in tiny_py._critic_examples(rec["question"], rec["answer"], rec["scene"], image, rng):
            prompt, label = conv[0]["content"][-1]["text"], json.loads(conv[1]["content"][0]["text"])["score"]
            if "Candidate answer" not in prompt:
                n_box += 1
                n_hit += label == 1.0
                if kind == "color" and label == 1.0:
                    crop = np.asarray(images[0]).astype(int)
                    positives += 1
                    shows += (np.abs(crop - data.COLORS[rec["answer"]]).sum(-1) < 30).any()
            else:
                n_ans += 1
                cand = prompt.split("Candidate answer: ")[1].split(".")[0].strip()
                assert cand in (list(data.COLORS) if kind == "color" else data.SHAPES)
                assert label == float(cand == rec["answer"])
                n_same += cand == rec["answer"]
    assert n_box == n_ans == 2 * len(records)
    assert 0.2 < n_hit / n_box < 0.8 and 0.2 < n_same / n_ans < 0.8
    assert positives > 0 and shows == positives


def test_critic_box_label_matches_pixel_count():
    """rewards.covers (the label rule) agrees with counting pixels on random integer boxes."""
    rng = np.random.default_rng(1)
    for _ in range(300):
        x1, y1 = rng.integers(0, 100, 2)
        box = [int(x1), int(y1), int(x1 + rng.integers(1, 12)), int(y1 + rng.integers(1, 12))]
        cx, cy = rng.integers(0, 100, 2)
        crop = [int(cx), int(cy), int(cx + rng.integers(1, 30)), int(cy + rng.integers(1, 30))]
        covered, area = _covered_pixels(box, crop)
        assert rewards.covers(crop, box) == (covered >= 0.5 * area)


def test_answer_text():
    assert R.answer_text("blah <answer> [1,2,3,4] </answer>") == "[1,2,3,4]"
    assert R.answer_text("<answer>a</answer><answer>b</answer>") is None  # ambiguous
    assert R.answer_text("no tags") is None
    assert R.answer_text("</answer>x<answer>") is None                  # wrong order
    assert R.answer_text("<answer>a</answer></answer>") is None          # stray tag


def test_sam2_config_by_bare_name_package_name_or_file(tmp_path, monkeypatch):
    sam2 = pytest.importorskip("sam2")
    torch.set_num_threads(1)
    package = Path(sam2.__file__).resolve().parent
    shipped = package / "configs" / "sam2.1" / "sam2.1_hiera_t.yaml"
    assert S.sam2_config_name("sam2.1_hiera_t.yaml", package) == ("configs/sam2.1/sam2.1_hiera_t.yaml", None)
    assert S.sam2_config_name("sam2_hiera_s", package)[0] in ("sam2_hiera_s.yaml", "configs/sam2/sam2_hiera_s.yaml")
    assert S.sam2_config_name(str(shipped), package) == ("configs/sam2.1/sam2.1_hiera_t.yaml", None)
    # a copy outside the package with another input size: loaded from its own folder, by relative path too
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "small_t.yaml").write_text(shipped.read_text().replace("image_size: 1024", "image_size: 512"))
    monkeypatch.chdir(tmp_path)
    reference = S.load_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, "cpu").model
    shapes = {k: v.shape for k, v in reference.state_dict().items()}
    for config, size in (("sam2.1_hiera_t.yaml", 1024), ("sam2.1_hiera_t", 1024), (str(shipped), 1024),
                         ("mine/small_t.yaml", 512), (str(tmp_path / "mine" / "small_t.yaml"), 512),
                         ("configs/sam2.1/sam2.1_hiera_t.yaml", 1024)):      # the package's search path is back
        model = S.load_sam2(config, None, "cpu").model
        assert model.image_size == size and model.sam_mask_decoder.dynamic_multimask_via_stability   # build_sam2's
        assert {k: v.shape for k, v in model.state_dict().items() if "pos_embed" not in k} == \
            {k: v for k, v in shapes.items() if "pos_embed" not in k}
    with pytest.raises(SystemExit, match=r"'sam2\.1_hiera_tiny\.yaml': no such file, nor a config of the sam2 "
                                         r"package .*configs/sam2\.1/sam2\.1_hiera_t\.yaml, .*configs/sam2/sam2_hiera_l"):
        S.load_sam2("sam2.1_hiera_tiny.yaml", None, "cpu")


def test_rise_samples_that_cannot_be_processed_are_skipped_counted_and_listed(tiny, rise_world, tmp_path):
    """run.usable with each RISE script's check: a page the processor refuses (600x2, aspect ratio 300)
    and a prompt over --max-prompt-len are skipped and listed once in OUT/skipped.jsonl (also when the
    check runs again, as on --resume); the good samples stay, in order."""
    model, processor = tiny
    records = data.read_manifest(rise_world / "soft_cls" / "train.jsonl", "cls")[0][:2]
    Image.new("RGB", (600, 2), "white").save(tmp_path / "strip.png")
    Image.new("RGB", (1024, 768), "white").save(tmp_path / "photo.png")
    bad = [dict(records[0], id="strip", image_path=str(tmp_path / "strip.png")),
           dict(records[0], id="photo", image_path=str(tmp_path / "photo.png"))]

    def length(rec, style):
        image = data.open_image(rec["image_path"])
        conv = [vlm.user_turn(rise_r1.prompt(style, rec, image, model, processor))]
        return int(vlm.chat_inputs(processor, [conv], [[image]])["attention_mask"].sum())

    limit = max(length(r, "r1") for r in records)
    assert length(bad[1], "r1") > limit
    for _ in range(2):
        kept, skipped = run.usable(records[:1] + bad + records[1:],
                                   lambda r: rise_r1.sample_problem(r, model, processor, "r1", limit), 0, 1, tmp_path)
        assert [r["id"] for r in kept] == [r["id"] for r in records]
    listed = run.read_jsonl(tmp_path / "skipped.jsonl")
    assert [(r["id"], r["split"]) for r in listed] == [("strip", "train"), ("photo", "train")]
    assert "aspect ratio" in listed[0]["reason"] and "max_prompt_len" in listed[1]["reason"]
    args = rise_cot.parse_args(["--preset", "tiny", "--max-prompt-len", "10000"])
    assert rise_cot.sample_problem(records[0], model, processor, args) is None
    assert "aspect ratio" in rise_cot.sample_problem(bad[0], model, processor, args)
    args.max_prompt_len = 20                            # shorter than any prompt with an image
    assert "max_prompt_len" in rise_cot.sample_problem(records[0], model, processor, args)
    with pytest.raises(SystemExit, match="every one of the 1 train samples"):
        run.usable(bad[:1], lambda r: rise_cot.sample_problem(r, model, processor, args), 0, 1)


def test_leaking_cot_gets_zero_reward_inside_the_loop(tiny, rise_world, monkeypatch):
    """Inject two CoTs into a real rollout: the same description with and without a leaked
    probability, both followed by a perfect reconstruction. The closed loop must give the
    leaking one 0 and the clean one the full similarity."""
    model, processor = tiny
    record = data.read_manifest(rise_world / "soft_cls" / "train.jsonl", "cls")[0][0]
    image = Image.open(record["image_path"]).convert("RGB")
    gt = dict(zip(record["classes"], record["probs"]))
    perfect = data.format_probs(record["classes"], record["probs"])
    injected = {0: "There is a large round shape covering 0.5 of the picture.",   # leaks a probability
                1: "There is a large round shape covering most of the picture."}
    real_sample = vlm.sample

    def sample_with_injection(*a, **k):
        out = real_sample(*a, **k)
        prompt_text = processor.tokenizer.decode(out["prompt"]["input_ids"][0])
        for row, text in injected.items():
            out["texts"][row] = perfect if "Description:" in prompt_text else text
        return out

    monkeypatch.setattr(rise_cot.vlm, "sample", sample_with_injection)
    args = rise_cot.parse_args(["--preset", "tiny", "-G", "2", "--max-new-tokens", "8", "--rec-max-new-tokens", "8"])
    cots, recs, scored = rise_cot.closed_loop(model, processor, [record], [image], [gt], args, 2)
    assert cots["texts"] == [injected[0], injected[1]] and recs["texts"] == [perfect, perfect]
    assert scored[0]["leak"] and scored[0]["reward"] == 0.0
    assert not scored[1]["leak"] and scored[1]["reward"] == pytest.approx(R.cls_similarity(gt, gt))
    assert scored[1]["reward"] > 0.99                   # exp(-0.5 KL - 0.5 MSE) * exp(-|1 - 1|) with KL = MSE = 0


def test_rise_r1_sft_target_is_think_answer_and_masks_the_prompt(tiny, rise_world):
    model, processor = tiny
    record = data.read_manifest(rise_world / "det" / "train.jsonl", "det")[0][0]
    image = Image.open(record["image_path"]).convert("RGB")
    conv = rise_r1.sft_conversation(record, "The red circle is at the top.", image, model, processor)
    batch = vlm.chat_inputs(processor, [conv], [[image]], add_generation_prompt=False)
    target = processor.tokenizer.decode(batch["input_ids"][0][vlm.assistant_mask(batch["input_ids"], processor)[0].bool()])
    # a 112x112 image: the box is written in Qwen2-VL's 0..1000 frame (x * 1000 / 112, rounded)
    x1, y1, x2, y2 = record["boxes"][0]
    box = [round(v * 1000 / 112) for v in (x1, y1, x2, y2)]
    assert target == f"<think>The red circle is at the top.</think><answer>[{box[0]},{box[1]},{box[2]},{box[3]}]</answer><|im_end|>"
    assert "Find" not in target                         # nothing of the prompt is a target


def test_rise_r1_and_rise_cot_write_qwen25_boxes_in_resized_pixels(tiny):
    # Qwen2.5-VL writes pixels of the processor's resized input. The tiny processor (factor 28, max
    # 224*224 = 50176 pixels) resizes 640x480 (307200 px): beta = sqrt(307200 / 50176) = 2.4744;
    # 480 / 2.4744 / 28 = 6.93 -> 6 * 28 = 168, 640 / 2.4744 / 28 = 9.24 -> 9 * 28 = 252.
    # [100,100,200,200] -> x * 252/640 = 39.4, 78.75; y * 168/480 = 35, 70 -> [39, 35, 79, 70].
    model, processor = tiny
    qwen25 = type("M", (), {"config": type("C", (), {"model_type": "qwen2_5_vl"})()})()
    record = {"target": "the cat", "boxes": [[100, 100, 200, 200]]}
    image = Image.new("RGB", (640, 480))
    assert rise_r1.annotation(record, image, qwen25, processor) == ([[39, 35, 79, 70]], "[39, 35, 79, 70]")
    assert rise_cot.annotation(record, image, qwen25, processor) == [[39, 35, 79, 70]]
    with pytest.raises(ValueError, match="pass the processor"):       # never an AttributeError
        vlm.to_model_frame([100, 100, 200, 200], "qwen2_5_vl", (640, 480))


def test_few_shot_rows_take_k_per_class_except_for_lisa():
    # RISE (arXiv 2508.13229), Results: "LISA uses 4/16 total samples, while Emotion6 uses 4/16 samples per
    # class"; ImageNet-Sub and COCO-Sub: "4/16 samples per class".
    coco = [{"id": f"c{c}-{i}", "target": name, "boxes": [[0, 0, 1, 1]], "category_id": c}
            for c, (name, n) in enumerate([("cat", 5), ("dog", 4), ("bus", 1)]) for i in range(n)]
    picked = rise_r1.few_shot(coco, "det", 2, seed=0)
    count = lambda rs, key: {v: sum(r[key] == v for r in rs) for v in {r[key] for r in rs}}  # noqa: E731
    assert count(picked, "target") == {"cat": 2, "dog": 2, "bus": 1}          # 2 per class, all of a rare one
    lisa = [{"id": f"l{i}", "target": f"the thing {i}", "boxes": [[0, 0, 1, 1]]} for i in range(10)]
    assert len(rise_r1.few_shot(lisa, "det", 4, seed=0)) == 4                 # 4 in total
    emotion = [{"id": f"e{i}", "classes": ["joy", "fear"], "probs": [0.9, 0.1] if i < 6 else [0.2, 0.8]}
               for i in range(9)]
    cls = rise_r1.few_shot(emotion, "cls", 2, seed=0)
    assert sorted(r["probs"][0] > 0.5 for r in cls) == [False, False, True, True]   # 2 joy + 2 fear
    assert rise_r1.few_shot(coco, "det", 2, seed=0) == picked                  # seeded


def test_rise_r1_eval_counts_unparsable_instead_of_crashing(tiny, rise_world):
    model, processor = tiny
    records = data.read_manifest(rise_world / "soft_cls" / "test.jsonl", "cls")[0]
    preds = rise_r1.predict(model, processor, records, "cls", max_new_tokens=6)   # a random model: garbage
    metrics = rise_r1.metrics_of(preds, records, "cls")
    assert metrics["n"] == 4 and metrics["unparsable"] == sum(not p["parsed"] for p in preds)
    # hand-made predictions: one exact, one unparsable. JSD: 0 and ln 2 -> mean ln2 / 2
    exact = {"id": records[0]["id"], "parsed": True, "probs": records[0]["probs"], "jsd": 0.0,
             "label": records[0]["classes"][max(range(4), key=lambda i: records[0]["probs"][i])]}
    broken = {"id": records[1]["id"], "parsed": False, "probs": None, "jsd": math.log(2), "label": None}
    m = rise_r1.metrics_of([exact, broken], records[:2], "cls")
    assert m["unparsable"] == 1 and m["jsd"] == pytest.approx(math.log(2) / 2) and m["accuracy"] == 0.5
    # detection: an unparsable answer has no boxes -> AP counts it as a miss
    det = data.read_manifest(rise_world / "det" / "test.jsonl", "det")[0][:2]
    det[1] = dict(det[1], target=det[0]["target"])      # one class, two GT boxes
    m = rise_r1.metrics_of([{"parsed": True, "boxes": det[0]["boxes"]}, {"parsed": False, "boxes": []}], det, "det")
    # one of two GT boxes found, with precision 1 at recall 0.5: 101-point AP = 51/101
    assert m["unparsable"] == 1 and m["map50"] == pytest.approx(51 / 101)


def test_frames_both_ways_both_families(tiny):
    _, processor = tiny
    wide = Image.new("RGB", (200, 100))
    # Qwen2-VL: 0..1000 of the original image. 200x100: x_px = x / 5, y_px = y / 10.
    assert S.frame_size(wide, "qwen2_vl") == (1000, 1000)
    assert S.box_to_pixels([100, 100, 500, 500], wide, "qwen2_vl") == [20, 10, 100, 50]
    assert S.point_to_pixels([250, 300], wide, "qwen2_vl") == [50, 30]
    assert S.point_to_model_frame([50, 30], wide, "qwen2_vl") == [250, 300]
    # Qwen2.5-VL: pixels of the resized input. The tiny processor (factor 28, max 224*224 pixels)
    # resizes 560x280 to 308x140 (see test_all.test_box_frames_both_ways_for_both_model_families):
    # x scales by 308/560 = 0.55, y by 140/280 = 0.5.
    big = Image.new("RGB", (560, 280))
    assert S.frame_size(big, "qwen2_5_vl", processor) == (308, 140)
    assert S.box_to_pixels([55, 50, 110, 100], big, "qwen2_5_vl", processor) == approx([100, 100, 200, 200])
    assert S.point_to_pixels([110, 70], big, "qwen2_5_vl", processor) == approx([200, 140])
    assert S.point_to_model_frame([200, 140], big, "qwen2_5_vl", processor) == [110, 70]
    # read_answer: the whole completion -> box and points in pixels, for both families (shapes-world format)
    text = '<think>t</think><answer>{"bbox": [55, 50, 110, 100], "points": [[110, 70], [66, 60]]}</answer>'
    box, pts = S.read_answer(text, big, "qwen2_5_vl", processor, shapes=True)
    assert box == approx([100, 100, 200, 200]) and pts == [approx([200, 140]), approx([120, 120])]
    box, pts = S.read_answer(text, wide, "qwen2_vl", shapes=True)
    assert box == approx([11, 5, 22, 10]) and pts == [approx([22, 7]), approx([13.2, 6])]


@pytest.mark.parametrize("text, box, n_points", [
    ('<think>a</think><answer>{"bbox": [100, 200, 300, 400], "points": [[150, 250], [200, 300]]}</answer>',
     [20, 20, 60, 40], 2),
    ('<answer>{"bbox": [100, 200, 300, 400]}</answer>', [20, 20, 60, 40], 0),              # no points
    ('{"bbox": [100, 200, 300, 400], "points": [[1, 2], [3, 4]]}', [20, 20, 60, 40], 2),  # --no-cot, no tags
    ('<answer>{"bbox": [300, 200, 100, 400], "points": [[1, 2], [3, 4]]}</answer>', None, 0),  # inverted
    ('<answer>{"bbox": [NaN, 200, 300, 400]}</answer>', None, 0),
    ('<answer>{"bbox": ["1", "2", "3", "4"]}</answer>', None, 0),                         # strings
    ('<answer>{"bbox": [true, 2, 3, 4]}</answer>', None, 0),                              # bool
    ('<answer>{"box": [1, 2, 3, 4]}</answer>', None, 0),
    ('<answer>a</answer><answer>{"bbox": [1, 2, 3, 4]}</answer>', None, 0),                # two blocks
    ("", None, 0), ("{" * 5000, None, 0), ("x" * 10000, None, 0),
])
def test_read_answer_formats_and_garbage(text, box, n_points):
    image = Image.new("RGB", (200, 100))            # Qwen2-VL frame: x / 5, y / 10
    got_box, pts = S.read_answer(text, image, "qwen2_vl", shapes=True)     # the shapes world's "points"
    assert (got_box is None) if box is None else got_box == approx(box)
    assert len(pts) == n_points
    assert S.read_answer(text, image, "qwen2_vl", points=False, shapes=True)[1] == []


@pytest.mark.parametrize("text, box", [
    ('```json\n[\n\t{"bbox_2d": [100, 250, 500, 750], "label": "the red circle"}\n]\n```', [20, 25, 100, 75]),
    ('[{"bbox_2d": [100, 250, 500, 750]}, {"bbox_2d": [0, 0, 10, 10]}]', [20, 25, 100, 75]),   # the first
    ('{"bbox": [100, 250, 500, 750]}', [20, 25, 100, 75]),
    ("<|box_start|>(100,250),(500,750)<|box_end|>", [20, 25, 100, 75]),      # Qwen2-VL's own box tokens
    ('{"bbox_2d": [500, 250, 100, 750]}', None),                             # inverted
    ('{"bbox_2d": [100, 250, "500", 750]}', None), ("the red circle is on the left", None), ("", None),
])
def test_grounding_eval_prompt_and_answer(tiny, text, box):
    """--eval-prompt grounding asks a real checkpoint its own grounding question word
    for word (Qwen2.5-VL's RefCOCO prompt: no frame note, no points) and reads its "bbox_2d" JSON or
    Qwen2-VL's box tokens; a 200x100 image in Qwen2-VL's 0..1000 frame: x / 5, y / 10."""
    _, processor = tiny
    image, rec = Image.new("RGB", (200, 100)), {"instruction": "the red circle"}
    args = argparse.Namespace(eval_prompt="grounding", cot=True, points=True)
    assert S.eval_prompt(rec, image, "qwen2_vl", processor, args) == \
        "Locate the red circle, output its bbox coordinates using JSON format."
    got, points = S.eval_answer(text, image, "qwen2_vl", processor, args)
    assert (got is None if box is None else got == approx(box)) and points == []
    args.eval_prompt = "seg"                   # the default: the training prompt and its reading
    assert S.eval_prompt(rec, image, "qwen2_vl", processor, args) == S.prompt_text(
        "the red circle", frame=(1000, 1000))
    assert S.eval_answer(text, image, "qwen2_vl", processor, args) == S.read_answer(text, image, "qwen2_vl")


def test_prompts_and_ablation_switches(tiny_dir):
    assert S.prompt_text("the red circle", shapes=True) == data.SEG_PROMPT.format(instruction="the red circle")
    assert S.prompt_text("x", cot=False, shapes=True) == data.SEG_PROMPT_NO_COT.format(instruction="x")
    for cot in (True, False):
        p = S.prompt_text("the red circle", cot=cot, points=False, shapes=True)
        assert "bbox" in p and "points" not in p and ("<think>" in p) == cot
    args = S.parse_args(["--model", str(tiny_dir)])
    assert args.terms == ["sem", "think", "seg"] and args.cot and args.points
    assert (args.lr, args.num_generations, args.beta) == (S.TINY["lr"], S.TINY["num_generations"], S.TINY["beta"])
    args = S.parse_args(["--model", str(tiny_dir), "--reward", "think,seg", "--no-points", "--lr", "0.5"])
    assert args.terms == ["think", "seg"] and not args.points and args.lr == 0.5
    assert S.parse_args(["--model", str(tiny_dir), "--no-cot"]).terms == ["sem", "seg"]   # no R_think
    # a real model gets the paper's defaults: G 8, lr 1e-6, KL 5e-3
    args = S.parse_args(["--model", "Qwen/Qwen2.5-VL-3B-Instruct"])
    assert (args.num_generations, args.lr, args.beta) == (8, 1e-6, 5e-3)
    for bad in (["--reward", "sem,size"], ["--reward", ""], ["--reward", "think", "--no-cot"]):
        with pytest.raises(SystemExit):
            S.parse_args(["--model", str(tiny_dir), *bad])


def test_seg_rewards_by_hand_crops_in_pixels():
    model, counting = StubClip([1.0, 0.0]), []
    tok = lambda t: (counting.append(list(t)), torch.zeros(len(t), 4, dtype=torch.long))[1]  # noqa: E731
    clip = (model, seg_stub_preprocess, tok)
    image = red_green()
    out = S.seg_rewards(TEXTS, [0] * len(TEXTS), [image], ["the red half"], clip, "qwen2_vl", shapes=True)
    for got, (sem, think, seg) in zip(out, EXPECTED):
        assert got["sem"] == approx(sem, abs=1e-6) and got["think"] == think and got["seg"] == seg
        assert got["reward"] == approx(sem + think + seg, abs=1e-6)
    # the group's 5 valid crops in ONE image batch, the text once
    assert model.image_calls == 1 and model.batch_sizes == [5] and model.text_calls == 1
    # a reward subset sums only its terms; the components are still reported
    out = S.seg_rewards(TEXTS, [0] * len(TEXTS), [image], ["the red half"], clip, "qwen2_vl", terms=["think", "seg"],
                        shapes=True)
    assert [o["reward"] for o in out] == [2, 2, 2, 0, 0, 1] and out[0]["sem"] == approx(1.0)
    # --no-cot: no R_think; --no-points: a box alone is a valid segmentation answer
    out = S.seg_rewards(TEXTS, [0] * len(TEXTS), [image], ["x"], clip, "qwen2_vl", cot=False, points=False)
    assert [o["think"] for o in out] == [0] * 6 and [o["seg"] for o in out] == [1, 1, 1, 1, 0, 0]


def test_seg_rewards_groups_batch_equals_single_and_text_cache():
    model = StubClip([1.0, 0.0])
    calls = []
    tok = lambda t: (calls.append(list(t)), torch.zeros(len(t), 4, dtype=torch.long))[1]  # noqa: E731
    clip, cache = (model, seg_stub_preprocess, tok), {}
    images = [red_green(), red_green(120, 60)]
    texts = TEXTS[:3] + TEXTS[:3]
    prompt_index = [0, 0, 0, 1, 1, 1]
    batch = S.seg_rewards(texts, prompt_index, images, ["red", "red"], clip, "qwen2_vl", text_cache=cache)
    assert model.image_calls == 2 and calls == [["red"]]      # one crop batch per prompt, one text pass
    plain = (model, seg_stub_preprocess, lambda t: torch.zeros(len(t), 4, dtype=torch.long))
    single = [S.seg_rewards([t], [0], [images[o]], ["red"], plain, "qwen2_vl")[0] for t, o in zip(texts, prompt_index)]
    assert [b["reward"] for b in batch] == approx([s["reward"] for s in single], abs=1e-6)
    # the second image is 120x60: [0, 0, 500, 1000] -> [0, 0, 60, 60], its red half: cos 1 again
    assert batch[3]["sem"] == approx(1.0)
    # later steps reuse the cached text embedding; a new instruction is embedded once
    S.seg_rewards(texts, prompt_index, images, ["red", "green"], clip, "qwen2_vl", text_cache=cache)
    assert calls == [["red"], ["green"]]


def test_seg_rewards_real_open_clip_batch_equals_single(clip_dir):
    clip = S.load_clip("shapes", clip_dir)
    image = red_green(112, 112)
    texts = [ans([0, 0, 500, 1000]), ans([100, 100, 900, 700]), "nope", ans([10, 10, 20, 990])]
    batch = S.seg_rewards(texts, [0] * 4, [image], ["the red square"], clip, "qwen2_vl")
    single = [S.seg_rewards([t], [0], [image], ["the red square"], clip, "qwen2_vl")[0] for t in texts]
    assert [b["sem"] for b in batch] == approx([s["sem"] for s in single], abs=1e-5)
    assert batch[2]["sem"] == 0.0 and all(0.0 <= b["sem"] <= 1.0 for b in batch)


def test_clip_loss_by_hand():
    # 2 crops, both caption 0, all logits 0. image->text: CE over 2 captions = ln 2 each.
    # text->image: caption 0's positives are both crops: -log(1/2 + 1/2) = 0; caption 1 absent.
    loss = tiny_py.clip_loss(torch.zeros(2, 2), torch.tensor([0, 0]))
    assert loss.item() == approx(math.log(2) / 2)
    # a confident, correct batch has a small loss; swapping the labels makes it large
    logits = torch.tensor([[10.0, -10.0], [-10.0, 10.0]])
    assert tiny_py.clip_loss(logits, torch.tensor([0, 1])).item() < 1e-3
    assert tiny_py.clip_loss(logits, torch.tensor([1, 0])).item() > 10


def test_clip_training_crops():
    rng = np.random.default_rng(0)
    box = [20, 30, 60, 70]                              # size 40: sides move by [-4.8, +8]
    for _ in range(50):
        j = tiny_py.jitter_box(box, rng)
        assert 20 - 9 <= j[0] <= 20 + 5 and 60 - 5 <= j[2] <= 60 + 9 and j[0] < j[2] and j[1] < j[3]
    scene = [{"color": "red", "shape": "circle", "box": [0, 0, 60, 112]}]
    for _ in range(20):
        b = tiny_py.background_box(scene, rng)
        assert b is None or b[0] >= 60                  # never touches the shape
    crops, labels = tiny_py.clip_batch(tiny_py.clip_scenes(3, 6), rng, 26)
    assert crops.shape == (26, 3, 64, 64) and labels.max() <= 12 and labels.min() >= 0


def test_box_mask_rounds_outwards_and_clips():
    m = S.box_mask((8, 6), [1.5, 2.2, 3.1, 9.0])        # x 1..4 (exclusive), y 2..6 (clipped)
    np.testing.assert_array_equal(m, square(6, 8, 2, 1, 6, 4))


@pytest.mark.slow
def test_sam2_random_tiny_returns_one_hxw_mask(capsys):
    pytest.importorskip("sam2")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    predictor = S.load_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, "cpu")   # random weights
    assert "RANDOM WEIGHTS" in capsys.readouterr().err                           # said loudly
    image = data.render([{"color": "red", "shape": "circle", "box": [20, 30, 60, 70]}], 220)
    mask = S.sam2_mask(predictor, image, [20, 30, 60, 70], [[40, 50], [35, 55]])
    assert mask.shape == (112, 112) and mask.dtype == bool


def test_evaluate_end_to_end_with_known_answers(tiny, seg_world, monkeypatch, tmp_path):
    """evaluate() on shapes-seg_world test records with scripted answers: the GT box itself (in the
    model's 0..1000 frame), a box on the wrong half, and garbage."""
    model, processor = tiny
    records, _ = data.read_manifest(seg_world / "seg" / "test.jsonl", "seg")
    records = records[:3]
    to_frame = lambda b: vlm.to_model_frame(b, "qwen2_vl", (112, 112))  # noqa: E731
    texts = [ans(to_frame(records[0]["box"]), points=((500, 500), (510, 510))),
             ans([0, 0, 10, 10]), "I cannot tell"]
    monkeypatch.setattr(vlm, "sample", lambda *a, **k: {"texts": texts[:len(a[2]["input_ids"])]})
    args = S.parse_args(["--model", "x", "--executor", "box", "--n-vis", "2"])
    clip = (StubClip([1.0, 0.0]), seg_stub_preprocess, lambda t: torch.zeros(len(t), 4, dtype=torch.long))
    rows = S.evaluate(model, processor, records, args, S.make_executor(args, "cpu"), vis_dir=tmp_path, clip=clip)
    got = S.summarise(rows)
    gt = [np.asarray(Image.open(r["mask_path"])) > 127 for r in records]
    # row 0: the filled GT box vs the GT shape: IoU = shape pixels / box pixels (1 for a square)
    x1, y1, x2, y2 = records[0]["box"]
    iou0 = gt[0].sum() / ((x2 - x1) * (y2 - y1))
    assert rows[0]["box_iou"] == approx(1.0, abs=0.02) and rows[0]["inter"] / rows[0]["union"] == approx(iou0, abs=0.03)
    assert rows[0]["points"] == [approx([56, 56]), approx([57.12, 57.12])]
    # row 1: a small box in the top-left corner: its filled box against the GT mask
    corner = S.box_mask((112, 112), rows[1]["box"])
    assert rows[1]["inter"] == int((corner & gt[1]).sum())
    assert rows[2]["box"] is None and rows[2]["inter"] == 0 and rows[2]["union"] == int(gt[2].sum())
    assert got["unparsable"] == 1 and got["n"] == 3
    assert got["giou"] == approx(np.mean([r["inter"] / r["union"] for r in rows]))
    # r_sem: the training reward of each predicted box (0 when unparsable), and its mean
    image = Image.open(records[0]["image_path"]).convert("RGB")
    assert rows[0]["r_sem"] == approx(R.clip_semantic_reward(*clip, image, [rows[0]["box"]], "x")[0])
    assert rows[2]["r_sem"] == 0.0 and got["r_sem"] == approx(np.mean([r["r_sem"] for r in rows]))
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(f"{r['id']}.png" for r in records[:2])


def test_eval_any_mask_encoding_and_unparsable_scores_zero(tiny, monkeypatch, tmp_path):
    """A 3-sample set with GT masks saved 0/1 (two) and 0/255 (one), every answer
    unparsable: gIoU 0 (it was 0.667: a 0/1 mask read as empty under `> 127`, and an empty prediction
    vs an empty GT counted 1). Ours too: the exact box on masks saved 0/1, palette and RGB: gIoU 1."""
    model, processor = tiny
    image = Image.new("RGB", (40, 40), "white")
    image.paste((0, 0, 0), (10, 10, 20, 20))                       # the object: x 10..19, y 10..19
    image.save(tmp_path / "im.png")
    truth = square(40, 40, 10, 10, 20, 20)
    files = {"L 0/1": "m01.png", "L 0/255": "m255.png", "palette index 1 (VOC style)": "mp.png",
             "RGB dark blue": "mrgb.png"}
    for name, file in files.items():
        MASK_ENCODINGS[name](truth).save(tmp_path / file)
    order = ["m01.png", "m01.png", "m255.png", "mp.png", "mrgb.png"]
    manifest = _write(tmp_path, [{"id": i, "image": "im.png", "instruction": "the black square", "mask": f}
                                 for i, f in enumerate(order)])
    records, _ = data.read_manifest(manifest, "seg")
    args = S.parse_args(["--model", "x", "--executor", "box"])
    texts = []
    monkeypatch.setattr(vlm, "sample", lambda *a, **k: {"texts": texts[:len(a[2]["input_ids"])]})
    texts[:] = ["no idea"] * 3
    got = S.summarise(S.evaluate(model, processor, records[:3], args, S.make_executor(args, "cpu")))
    assert (got["giou"], got["ciou"], got["unparsable"], got["n"]) == (0.0, 0.0, 3, 3)
    # the exact box, in Qwen2-VL's 0..1000 frame of a 40x40 image: 10 px -> 250
    texts[:] = [ans([250, 250, 500, 500], points=None)] * 3
    rows = S.evaluate(model, processor, [records[0], records[3], records[4]], args, S.make_executor(args, "cpu"))
    assert [(r["inter"], r["union"]) for r in rows] == [(100, 100)] * 3      # 10x10 pixels, in every encoding
    assert S.summarise(rows)["giou"] == 1.0


@settings(max_examples=300, deadline=None)
@given(norm_boxes(), norm_boxes(), st.integers(0, 2 ** 32 - 1), st.sampled_from(["area", "sides"]))
def test_diversify_box_properties(b1, b2, seed, mode):
    rng = CountingRandom(seed)
    out = visrl.diversify_box(b1, b2, rng, mode=mode)
    assert rng.calls <= 4 * 100                                   # terminates: 100 tries of 4 draws at most
    if rewards.box_iou(b1, b2) <= 0.05:
        assert out == b2 and rng.calls == 0                       # a diverse b2 is kept as it is
        return
    if out is None:                                               # gave up: no room around b1
        return
    assert 0.0 <= out[0] < out[2] <= 1.0 and 0.0 <= out[1] < out[3] <= 1.0     # inside the image
    assert overlap_area(out, b1) == 0.0                                          # outside b1
    assert within_size_bound(out, b1, 0.3 + 0.1 * 4, mode)       # widened 4 times in 100 tries at most


@settings(max_examples=200, deadline=None)
@given(norm_boxes(min_size=0.02, max_size=0.3), st.integers(0, 2 ** 32 - 1), st.sampled_from(["area", "sides"]))
def test_diversify_box_base_tolerance_and_small_boxes_always_succeed(b1, seed, mode):
    """With no widening (20 tries) the size stays within the +-30% bound; a small b1 always leaves room."""
    out = visrl.diversify_box(b1, list(b1), random.Random(seed), mode=mode, max_tries=20)
    if out is not None:
        assert within_size_bound(out, b1, 0.3, mode)
    assert visrl.diversify_box(b1, list(b1), random.Random(seed), mode=mode) is not None


def test_diversify_box_gives_up_and_is_reproducible():
    assert visrl.diversify_box([0.0, 0.0, 1.0, 1.0], [0.1, 0.1, 0.9, 0.9], random.Random(0)) is None
    b1, b2 = [0.4, 0.4, 0.6, 0.6], [0.41, 0.4, 0.6, 0.62]
    assert visrl.diversify_box(b1, b2, random.Random(7)) == visrl.diversify_box(b1, b2, random.Random(7))
    assert visrl.diversify_box(b1, [0.0, 0.0, 0.2, 0.2], random.Random(7)) == [0.0, 0.0, 0.2, 0.2]


def test_canonical_box():
    """Shapes world: 2 decimals for the text and the box (the tiny base's format)."""
    assert visrl.canonical_box("[0.123,0.4,0.5,0.61] and more", shapes=True) == (
        "[0.12,0.40,0.50,0.61]", [0.12, 0.4, 0.5, 0.61])
    assert visrl.canonical_box("[-0.2,0.1,1.7,0.5]", shapes=True) == ("[0.00,0.10,1.00,0.50]", [0.0, 0.1, 1.0, 0.5])
    for bad in ("", "no box", "[0.5,0.5,0.2,0.9]", "[0.3,0.3,0.301,0.5]", "[nan,0,1,1]", "x" * 10000):
        assert visrl.canonical_box(bad, shapes=True) == (None, None)


def test_select_pair_paper_rule():
    # VisRL eq. 4: W = {s_b >= 0.8 and s_r >= 0.8} = {1, 2}; c_w holds max s_b (0.9) and max s_r (0.95)
    # of W: index 2. L = {s_b <= 0.2 and s_r <= 0.2} = {3, 4}: c_l holds min s_b (0.1) and min s_r (0.0): 3.
    # Candidate 0 (s_r 1.0, s_b 0.5) is in neither set and is never the chosen one.
    cands = [cand(0.5, 1.0), cand(0.8, 0.9), cand(0.9, 0.95), cand(0.1, 0.0), cand(0.2, 0.1), cand(0.0, 0.3)]
    assert visrl.select_pair(cands) == (2, 3, "ok")
    # ties: the first
    assert visrl.select_pair([cand(1, 1), cand(1, 1), cand(0, 0), cand(0, 0)]) == (0, 2, "ok")
    # boundaries are inclusive: both scores 0.8 are in W, both 0.2 in L
    assert visrl.select_pair([cand(0.8, 0.8), cand(0.2, 0.2)]) == (0, 1, "ok")
    with pytest.raises(ValueError, match="above"):
        visrl.select_pair([cand(1, 1)], win=0.5, lose=0.5)


@pytest.mark.parametrize("cands, reason", [
    ([], "with_candidates"),
    # three question's candidates, as (s_b, s_r): each is dropped by the paper's rule
    ([cand(0.9, 0.5), cand(0.1, 0.9), cand(0.1, 0.1)], "win_set"),     # nobody has both >= 0.8
    ([cand(0.9, 0.95), cand(0.9, 0.1), cand(0.1, 0.9)], "lose_set"),   # nobody has both <= 0.2
    ([cand(0.8, 1.0), cand(1.0, 0.9), cand(0, 0)], "chosen_holds_both_max"),  # max s_b and max s_r split
    ([cand(1, 1), cand(0.0, 0.2), cand(0.1, 0.0)], "rejected_holds_both_min"),
    ([cand(0.7, 1.0), cand(0.79, 0.9), cand(0, 0.0)], "win_set"),
])
def test_select_pair_drops(cands, reason):
    assert visrl.select_pair(cands) == (None, None, reason)


def test_make_pairs_counts_survivors_and_quality():
    gt = [0.1, 0.1, 0.3, 0.3]
    far = (0.6, 0.6, 0.8, 0.8)
    q = lambda i, cands, gt_box=gt: {"id": i, "question": "q", "answer": "red", "image": "x.png",  # noqa: E731
                                     "size": [112, 112], "candidates": cands, "gt_box": gt_box}
    table = [
        q(0, [cand(1, 1), cand(0, 0, far)]),                       # pair: WP-LN
        q(1, [cand(1, 1, far), cand(0, 0)]),                       # pair: WN-LP
        q(2, [cand(1, 1), cand(0, 0)]),                            # pair: WP-LP
        q(3, [cand(1, 1), cand(0, 0, far)], gt_box=None),          # pair, no GT box: not graded
        q(4, []),                                                  # no candidate
        q(5, [cand(1, 0.5), cand(0, 0)]),                          # W empty (s_r too low)
        q(6, [cand(0.5, 1), cand(0, 0)]),                          # W empty (s_b too low)
        q(7, [cand(1, 1), cand(0.5, 0)]),                          # L empty
        q(8, [cand(0.9, 1), cand(1, 0.9), cand(0, 0)]),            # no candidate of W holds both maxima
        q(9, [cand(1, 1), cand(0, 0.1), cand(0.1, 0)]),            # no candidate of L holds both minima
    ]
    pairs, survivors, quality = visrl.make_pairs(table)
    assert [p["id"] for p in pairs] == [0, 1, 2, 3]
    assert survivors == {"questions": 10, "with_candidates": 9, "win_set": 7, "lose_set": 6,
                         "chosen_holds_both_max": 5, "rejected_holds_both_min": 4}
    assert quality == {"WP-LP": pytest.approx(1 / 3), "WP-LN": pytest.approx(1 / 3),
                       "WN-LP": pytest.approx(1 / 3), "WN-LN": 0.0, "graded": 3,
                       "chosen_gt_iou": pytest.approx(2 / 3), "rejected_gt_iou": pytest.approx(2 / 3)}
    assert pairs[0]["chosen"]["s_r"] == 1 and pairs[0]["rejected"]["box"] == list(far)
    assert [p["quality"] for p in pairs] == ["WP-LN", "WN-LP", "WP-LP", None]


def test_critic_scores_crop_only_for_s_b_full_image_for_s_r(monkeypatch):
    calls = []

    def fake(model, processor, convs, images, n, max_new_tokens, temperature, max_prompt_len=None, batch_size=None):
        calls.append((convs, images, temperature))
        return ['{"score": 0.9}', 'garbage'] if len(calls) == 1 else ['{"score": 0.1}', '{"score": 7}']

    monkeypatch.setattr(visrl, "generate_texts", fake)
    full, piece = Image.new("RGB", (112, 112)), Image.new("RGB", (20, 20))
    items = [{"question": "What colour?", "reference": "red", "answer": a, "image": full, "crop": piece,
              "shapes": True} for a in ("red", "blue")]
    s_b, s_r, _ = visrl.critic_scores((torch.nn.Linear(1, 1), None), items)
    assert s_b == [0.9, None] and s_r == [0.1, None]        # 7 is off the 0..1 scale: unparsable, not 1
    (box_convs, box_images, t_b), (ans_convs, ans_images, t_r) = calls
    assert t_b == 0 and t_r == 0                                              # greedy
    assert box_images == [[piece], [piece]] and ans_images == [[full], [full]]  # s_b: crop only; s_r: image
    assert "Reference answer: red" in box_convs[0][0]["content"][-1]["text"]
    assert "Candidate answer: blue" in ans_convs[1][0]["content"][-1]["text"]


def test_a_critic_with_its_own_vocabulary_is_prompted_through_its_own_processor(tiny):
    """--critic may be another model with another tokenizer (VisRL's critic is a separate judge): its prompts are
    tokenized by its processor. Here the critic's BPE has 300 tokens, so the policy's ids of the same prompt run past
    its embedding table; critic_scores' greedy judgements equal the critic's own generate() on its own inputs."""
    texts = ["Reference answer: red. Candidate answer: blue. What colour is the circle? score 0.8"] * 20
    tokenizer = tiny_py.build_tokenizer(texts, vocab_size=300)
    critic = (tiny_py.tiny_model(tokenizer, seed=1).eval(), tiny_py.tiny_processor(tokenizer))
    full, piece = Image.new("RGB", (112, 112), "red"), Image.new("RGB", (56, 56), "blue")
    items = [{"question": "What colour is the circle?", "reference": "red", "answer": a, "image": full, "crop": piece,
              "shapes": True} for a in ("red", "blue")]
    box_convs, _ = visrl.critic_conversations(items)
    policy_ids = vlm.chat_inputs(tiny[1], box_convs, [[piece]] * 2)["input_ids"]
    assert policy_ids.max() >= critic[0].config.text_config.vocab_size      # the policy's ids would not fit
    *_, raw = visrl.critic_scores(critic, items, max_new_tokens=6)
    inputs = vlm.chat_inputs(critic[1], box_convs, [[piece]] * 2)
    with torch.no_grad():
        out = critic[0].generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = critic[1].batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [b for b, _ in raw] == expected


def test_generate_candidates_with_scripted_policy_and_critic(monkeypatch, shapes):
    recs, _ = data.read_manifest(shapes / "vqa" / "train.jsonl", "vqa")
    rec = recs[0]
    gt = visrl.norm_box(rec["box"], 112, 112)
    box1 = data.format_norm_box(rec["box"], 112, 112)
    near = visrl.canonical_box([gt[0] + 0.01, gt[1], gt[2] + 0.01, gt[3]], shapes=True)[0]   # overlaps b1
    far = "[0.80,0.80,0.95,0.95]"
    box_texts = [box1, near, "broken [", far]                     # K = 2 attempts x (b1, b2)
    script = iter([box_texts, ["red ", "blue", "green"],         # answers of the 3 valid boxes
                   ['{"score": 1}', '{"score": 0}', '{"score": 0}'],        # s_b
                   ['{"score": 1}', '{"score": 0}', '{"score": 0.1}']])     # s_r
    monkeypatch.setattr(visrl, "generate_texts", lambda *a, **k: next(script))
    args = type("A", (), dict(attempts=2, gen_batch_size=4, max_new_tokens=32, temperature=1.0,
                              answer_max_new_tokens=8,
                              answer_temperature=1.0, max_prompt_len=None, iou_thresh=0.05, size_tol=0.3))()
    (q,) = visrl.generate_candidates(torch.nn.Linear(1, 1), (torch.nn.Linear(1, 1), None), None, [rec], args,
                                     random.Random(0))
    assert q["dropped"] == {"unparsable": 1, "no_crop": 0, "no_diverse_box": 0, "too_long": 0, "critic_unparsable": 0}
    c = q["candidates"]
    assert [(x["attempt"], x["which"], x["diversified"]) for x in c] == [(0, "b1", False), (0, "b2", True),
                                                                          (1, "b2", False)]
    assert rewards.box_iou(c[1]["box"], c[0]["box"]) == 0.0 and c[2]["box"] == [0.8, 0.8, 0.95, 0.95]
    assert [x["answer"] for x in c] == ["red", "blue", "green"] and [x["s_r"] for x in c] == [1, 0, 0.1]
    pairs, survivors, quality = visrl.make_pairs([q])
    assert len(pairs) == 1 and pairs[0]["chosen"]["answer"] == "red" and pairs[0]["rejected"]["answer"] == "blue"
    assert pairs[0]["quality"] == "WP-LN" and survivors["rejected_holds_both_min"] == 1


@pytest.mark.parametrize("box,raw_size,padded_size", [
    (THIN, (4, 1600), (16, 1600)),                      # the strip: padded to ratio 100
    ([0.0, 0.5, 1.0, 0.5005], (400, 1), (400, 4)),      # ours: a 1-pixel-high line, ratio 400
    ([0.0, 0.0, 0.01, 0.01], (4, 20), (4, 20)),         # ours: tiny (4 px wide), ratio 5: the processor takes it
    ([0.1, 0.1, 0.3, 0.3], (80, 400), (80, 400)),       # fits already: unchanged
])
def test_degenerate_crop_is_padded_to_one_the_processor_takes(tiny, box, raw_size, padded_size):
    _, processor = tiny
    page = Image.new("RGB", (400, 2000), "white")
    page.paste((220, 40, 40), (200, 200, 204, 1800))
    b = visrl.canonical_box(box)[1] if isinstance(box, str) else box
    raw = R.crop_box(page, visrl.pixel_box(b, 400, 2000))
    assert raw.size == raw_size
    if max(raw_size) / min(raw_size) > 200:         # the processor refuses it
        with pytest.raises(ValueError, match="aspect ratio"):
            processor.image_processor(images=[raw], return_tensors="pt")
    fitted = visrl.crop(page, b)                    # what every VisRL step feeds the processor
    assert fitted.size == padded_size and max(fitted.size) / min(fitted.size) <= 100
    # the crop's own pixels, centred; the rest white
    x0, y0 = (padded_size[0] - raw_size[0]) // 2, (padded_size[1] - raw_size[1]) // 2
    assert fitted.crop((x0, y0, x0 + raw_size[0], y0 + raw_size[1])).tobytes() == raw.tobytes()
    assert np.asarray(fitted).sum() == np.asarray(raw).sum() + 3 * 255 * (padded_size[0] * padded_size[1]
                                                                          - raw_size[0] * raw_size[1])
    vlm.chat_inputs(processor, [visrl.answer_turns("What?", "[0.1,0.1,0.3,0.3]")], [[page, fitted]])   # no error


def test_degenerate_crops_in_generation_sft_and_evaluation(visrl_tiny, monkeypatch, tmp_path):
    """A 400x2000 page through the real processor: data generation (policy answers + critic on the
    crop), the SFT warm-up example, and evaluation all run; nothing is dropped for the strip."""
    _, model, processor = visrl_tiny
    (rec,) = _page(tmp_path)
    script = iter([[THIN, "[0.00,0.00,0.01,0.01]"],              # K = 1: b1 the strip, b2 a 4x20 corner
                   ["red", "blue"],                              # answers of both crops
                   ['{"score": 1}', '{"score": 0}'], ['{"score": 1}', '{"score": 0}'],   # s_b, s_r
                   [THIN], ["red"]])                             # evaluation: box step, answer step
    monkeypatch.setattr(vlm, "sample", lambda *a, **k: {"texts": next(script)})
    args = visrl.parse_args(["--model", "x", "--preset", "tiny", "-K", "1", "--gen-batch-size", "1"])
    (q,) = visrl.generate_candidates(model, (model, processor), processor, [rec], args, random.Random(0))
    assert q["dropped"] == {"unparsable": 0, "no_crop": 0, "no_diverse_box": 0, "too_long": 0, "critic_unparsable": 0}
    assert [(c["box"], c["answer"], c["s_b"], c["s_r"]) for c in q["candidates"]] == [
        ([0.5, 0.1, 0.51, 0.9], "red", 1.0, 1.0), ([0.0, 0.0, 0.01, 0.01], "blue", 0.0, 0.0)]
    metrics, preds = visrl.evaluate(model, processor, [rec], args)
    assert metrics["answer_accuracy"] == 1.0 and metrics["unparsable"] == 0 and preds[0]["box"] == [0.5, 0.1, 0.51, 0.9]
    (box_conv, box_images), (conv, images) = visrl.sft_examples(dict(rec, box=[200, 200, 204, 1800]),
                                                                data.open_image(rec["image_path"]))
    loss = vlm.sft_loss(model, processor, [box_conv, conv], [box_images, images])
    assert images[1].size == (16, 1600) and math.isfinite(loss.item())


def test_visrl_skips_samples_and_candidates_that_cannot_be_processed(visrl_tiny, shapes, monkeypatch, tmp_path):
    """Evaluation: a page the processor refuses (900x3, aspect ratio 300) is skipped, counted and listed;
    the other question is scored. Generation: a candidate whose answer prompt (the crop of the whole
    400x2000 page) is over --max-prompt-len is dropped and counted as too_long; the other is kept."""
    _, model, processor = visrl_tiny
    good = data.read_manifest(shapes / "vqa" / "test.jsonl", "vqa")[0][0]
    Image.new("RGB", (900, 3), "white").save(tmp_path / "strip.png")
    rec = {"id": "strip", "image": "strip.png", "question": "What colour?", "answer": "red"}
    (strip,) = data.read_manifest(_write(tmp_path, [rec], "strip.jsonl"), "vqa")[0]
    script = iter([["[0.00,0.00,1.00,1.00]"], [good["answer"]]])    # the good record: its box, its answer
    monkeypatch.setattr(vlm, "sample", lambda *a, **k: {"texts": next(script)})
    args = visrl.parse_args(["--model", "x", "--preset", "tiny", "-K", "1", "--gen-batch-size", "2"])
    metrics, preds = visrl.evaluate(model, processor, [strip, good], args)
    assert (metrics["n"], metrics["skipped_samples"], metrics["answer_accuracy"]) == (1, 1, 1.0)
    assert preds[-1]["id"] == "strip" and "aspect ratio" in preds[-1]["skipped"]

    (page,) = _page(tmp_path)
    image = data.open_image(page["image_path"])
    small = visrl.crop(image, [0.0, 0.0, 0.01, 0.01])
    limit = int(vlm.chat_inputs(processor, [visrl.answer_turns(page["question"], "[0.00,0.00,0.01,0.01]")],
                                [[image, small]])["attention_mask"].sum())
    big = vlm.chat_inputs(processor, [visrl.answer_turns(page["question"], "[0.00,0.00,1.00,1.00]")],
                          [[image, visrl.crop(image, [0.0, 0.0, 1.0, 1.0])]])["attention_mask"].sum()
    assert big > limit                                                   # the whole-page crop has more tokens
    script = iter([["[0.00,0.00,1.00,1.00]", "[0.00,0.00,0.01,0.01]"],  # K = 1: b1 the page, b2 a corner
                   ["blue"], ['{"score": 0}'], ['{"score": 0}']])         # only b2 is answered and judged
    args.max_prompt_len = limit
    (q,) = visrl.generate_candidates(model, (model, processor), processor, [page], args, random.Random(0))
    assert q["dropped"] == {"unparsable": 0, "no_crop": 0, "no_diverse_box": 0, "too_long": 1, "critic_unparsable": 0}
    assert [(c["which"], c["answer"]) for c in q["candidates"]] == [("b2", "blue")]


def test_stage2_answers_are_conditioned_on_the_winning_crop(visrl_tiny, shapes):
    _, model, processor = visrl_tiny
    rec = data.read_manifest(shapes / "vqa" / "train.jsonl", "vqa")[0][0]
    image = Image.open(rec["image_path"]).convert("RGB")
    win, lose, other = [0.05, 0.05, 0.45, 0.45], [0.55, 0.55, 0.95, 0.95], [0.5, 0.0, 1.0, 0.5]
    convs, ims, chosen, rejected = visrl.answer_step([make_pair(rec["image_path"], win, lose)], [image])
    assert (chosen, rejected) == (["red"], ["blue"])
    assert convs[0][1]["content"][0]["text"] == "[0.05,0.05,0.45,0.45]"    # the winning box turn
    assert ims[0][1].size == visrl.crop(image, win).size                   # ... and the winning crop

    def logps(pair):
        with torch.no_grad():
            return vlm.pair_logps(model, model, processor, *visrl.answer_step([pair], [image]), "cpu")

    base = logps(make_pair(rec["image_path"], win, lose))
    moved_win = logps(make_pair(rec["image_path"], other, lose))
    moved_lose = logps(make_pair(rec["image_path"], win, other))
    assert base[0].item() != pytest.approx(moved_win[0].item(), abs=1e-6)   # chosen answer: new context
    assert base[1].item() != pytest.approx(moved_win[1].item(), abs=1e-6)   # rejected answer too
    assert torch.equal(base[0], moved_lose[0]) and torch.equal(base[1], moved_lose[1])  # loser's box: unused
    assert torch.equal(base[0], base[2]) and torch.isfinite(base[0]).all()  # same model as ref -> equal


def test_sequence_logps_match_per_token_sum_and_box_step(visrl_tiny, shapes):
    _, model, processor = visrl_tiny
    rec = data.read_manifest(shapes / "vqa" / "train.jsonl", "vqa")[0][0]
    image = Image.open(rec["image_path"]).convert("RGB")
    pair = make_pair(rec["image_path"], [0.05, 0.05, 0.45, 0.45], [0.55, 0.55, 0.95, 0.95])
    convs, ims, chosen, rejected = visrl.box_step([pair], [image])
    assert (chosen, rejected) == (["[0.05,0.05,0.45,0.45]"], ["[0.55,0.55,0.95,0.95]"]) and len(ims[0]) == 1
    with torch.no_grad():
        both = vlm.response_logps(model, processor, convs * 2, ims * 2, chosen + rejected, "cpu")
        alone = vlm.response_logps(model, processor, convs, ims, rejected, "cpu")
    assert both[1].item() == pytest.approx(alone[0].item(), abs=1e-4)      # padding changes nothing
    ids, mask = vlm.completion_tensors(processor, ["red", "[0.05,0.05,0.45,0.45]"], "cpu")
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids[0, mask[0].sum() - 1] == end and ids[1, -1] == end and mask[0, -1] == 0


def test_lora_trains_only_adapters_and_its_reference_is_the_model_without_them(tiny_dir, shapes):
    # --lora-rank (VisRL's released configs train LoRA adapters): the DPO reference is the policy with
    # its adapters off, which must score exactly as the untouched model does; only adapter weights move.
    base, processor = vlm.load_model(tiny_dir)
    policy = vlm.add_lora(vlm.load_model(tiny_dir)[0], rank=4)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    rec = data.read_manifest(shapes / "vqa" / "train.jsonl", "vqa")[0][0]
    pair = dict(make_pair(rec["image_path"], visrl.norm_box(rec["box"], 112, 112), [0.0, 0.0, 0.1, 0.1]),
                question=rec["question"])
    step = visrl.box_step([pair], [data.open_image(rec["image_path"])])
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):                  # step 1 moves B (initialised to 0), step 2 also A
        loss, _ = step_dpo_loss(vlm.pair_logps(policy, None, processor, *step, "cpu"), None, box_weight=1.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= trainable
    with torch.no_grad():
        chosen, rejected, ref_chosen, ref_rejected = vlm.pair_logps(policy, None, processor, *step, "cpu")
        base_chosen, base_rejected, _, _ = vlm.pair_logps(base, base, processor, *step, "cpu")
        assert ref_chosen.item() == pytest.approx(base_chosen.item(), abs=1e-5)
        assert ref_rejected.item() == pytest.approx(base_rejected.item(), abs=1e-5)
        assert abs(chosen.item() - ref_chosen.item()) > 1e-3          # the adapters did change the policy
        folded = vlm.load_model(tiny_dir)[0]          # the stage's saved model: adapters folded into the weights
        folded.load_state_dict(vlm.merged_state_dict(policy))
        merged_chosen, _, _, _ = vlm.pair_logps(folded, folded, processor, *step, "cpu")
        assert merged_chosen.item() == pytest.approx(chosen.item(), abs=1e-4)


def test_sft_example_is_the_two_turn_chat(shapes):
    rec = data.read_manifest(shapes / "vqa" / "train.jsonl", "vqa")[0][0]
    image = Image.open(rec["image_path"]).convert("RGB")
    (conv, images), = visrl.sft_examples(rec, image)       # the shapes world: one two-turn chat
    assert [m["role"] for m in conv] == ["user", "assistant", "user", "assistant"]
    assert conv[1]["content"][0]["text"] == data.format_norm_box(rec["box"], 112, 112)
    assert conv[3]["content"][0]["text"] == rec["answer"] and len(images) == 2
    x1, y1, x2, y2 = rec["box"]
    assert abs(images[1].size[0] - (x2 - x1)) <= 2 and abs(images[1].size[1] - (y2 - y1)) <= 2


def test_oracle_critic_reads_gt_box_and_exact_match():
    full = Image.new("RGB", (100, 100))
    items = [{"question": "q", "reference": "red", "answer": a, "image": full, "crop": full}
             for a in ("Red.", "blue", "red")]
    records = [{"box": [10, 10, 30, 30]}, {"box": [10, 10, 30, 30]}, {}]
    boxes = [[0.05, 0.05, 0.25, 0.25], [0.2, 0.2, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]]
    s_b, s_r = visrl.oracle_scores(items, records, boxes)
    assert s_b == [1.0, 0.0, 0.0] and s_r == [1.0, 0.0, 1.0]      # (0.2..0.3)^2 is 1/4 of the GT box
    assert rewards.covers([0, 0, 1, 1], [0.2, 0.2, 0.4, 0.4]) and not rewards.covers([0, 0, 0.3, 0.3], [0.2, 0.2, 0.6, 0.6])


def test_presets_fill_unset_options_tiny_for_a_tiny_model(tiny_dir):
    for module in (rise_cot, rise_r1, S, visrl):
        tiny_args = module.parse_args(["--model", str(tiny_dir)])          # auto: a tiny model dir
        paper_args = module.parse_args(["--model", "Qwen/Qwen2-VL-2B-Instruct"])
        for key, value in module.TINY.items():
            assert getattr(tiny_args, key) == value, (module.__name__, key)
        for key, value in module.PAPER.items():
            assert getattr(paper_args, key) == value, (module.__name__, key)
        given = module.parse_args(["--model", str(tiny_dir), "--preset", "paper", "--lr", "0.25"])
        assert given.lr == 0.25 and given.max_new_tokens == module.PAPER["max_new_tokens"]
    assert vlm.is_tiny(vlm.TINY_BASE) and vlm.is_tiny(str(tiny_dir)) and not vlm.is_tiny("Qwen/Qwen2-VL-2B-Instruct")


@pytest.mark.slow
def test_wandb_is_imported_only_when_asked_and_named_when_missing(tmp_path):
    import importlib.util
    code = "import rise_cot, rise_r1, seg_rise, visrl, sys; print('wandb' in sys.modules, 'peft' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=300)
    assert proc.stdout.split() == ["False", "False"]
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(SystemExit, match="pip install wandb"):
            run.open_tracker(argparse.Namespace(report_to="wandb"), tmp_path, 0)


def test_an_evaluation_never_writes_into_a_training_run(tmp_path):
    """--eval refuses a folder holding a training run (before anything is loaded or written); rise_cot.py has no
    evaluation and refuses --eval; VisRL warns when its run will end without one."""
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "metrics.jsonl").write_text('{"step": 0}\n')
    for module in (rise_r1, S, visrl):
        with pytest.raises(SystemExit, match="holds a training run"):
            module.main(["--eval", "--model", vlm.TINY_BASE, "--out", str(trained)])
    assert (trained / "metrics.jsonl").read_text() == '{"step": 0}\n' and sorted(trained.iterdir()) == [trained / "metrics.jsonl"]
    for flag in ("--eval", "--test", "--n-test"):
        with pytest.raises(SystemExit):
            rise_cot.parse_args([flag, "x"] if flag != "--eval" else [flag])


def test_every_flag_of_every_script_is_read():
    """Every option a pipeline accepts is read somewhere (args.<name> in the script, run.py or vlm.py): a flag
    that does nothing is not accepted."""
    shared = (ROOT / "run.py").read_text() + (ROOT / "vlm.py").read_text()
    for module in (rise_cot, rise_r1, S, visrl):
        source = Path(module.__file__).read_text() + shared
        for dest in vars(module.parse_args(["--model", vlm.TINY_BASE])):
            if dest not in ("local_rank", "preset", "config"):        # read by the launcher / run.parse_args
                assert re.search(rf"\bargs\.{dest}\b|getattr\(args, \"{dest}\"", source), (module.__name__, dest)


def test_manifest_path_takes_a_file_or_a_shapes_world_task(tmp_path):
    assert run.manifest_path("a/b/train.jsonl", "test", 0, "seg") == Path("a/b/train.jsonl")
    assert run.manifest_path(None, "test", 3, "seg", world=tmp_path) == tmp_path / "seg" / "test.jsonl"
    assert run.manifest_path("det", "train", 3, "seg", world=tmp_path) == tmp_path / "det" / "train.jsonl"


def test_guarded_update_never_applies_a_non_finite_loss(capsys, tmp_path):
    engine = _EngineThatMustNotStep()
    assert vlm.update(engine, torch.tensor(2.0), window=(True, 1.5)) is False
    assert engine.calls == [("boundary", True), ("backward", 3.0), ("step",)]      # 2.0 x loss_scale 1.5
    engine.calls.clear()
    assert vlm.update(engine, torch.tensor(float("nan"))) is True
    assert vlm.update(engine, torch.tensor(float("inf"))) is True
    assert engine.calls == []
    # end_step counts skipped updates: a finite loss resets the count, the third in a row stops the run
    engine.global_steps, engine.optimizer = 0, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    args, state = argparse.Namespace(save_every=100, grad_accum=1), {"step": 0}
    for step, skipped in enumerate([True, True, False, True, True]):
        run.end_step(engine, tmp_path, state, step, 100, {"loss": 0.0, "skipped": skipped}, args, 0)
    assert "non-finite loss: update skipped (2 in a row)" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row at step 5"):
        run.end_step(engine, tmp_path, state, 5, 100, {"loss": 0.0, "skipped": True}, args, 0)
    assert [m["lr"] for m in run.read_jsonl(tmp_path / "metrics.jsonl")] == [0.1] * 6


# bench: the memory estimate and the checkpointing flag
def test_memory_estimate_by_hand():
    """bench.memory_estimate against numbers worked out by hand (bytes; GiB = 2^30 bytes)."""
    arch = dict(layers=2, hidden=10, intermediate=20, kv=4, vocab=100, vision_blocks=3, vision_width=8,
                vision_block_bytes=50)
    step = dict(prompts=2, group_size=3, prompt_tokens=5, image_patches=7, new_tokens=4)
    z2 = bench.memory_estimate(1.0, 2, 4, arch=arch, **step)
    # 1e9 parameters: bf16 weights 2e9 bytes (ZeRO-2: whole, the reference too), gradients 2e9 / 4 GPUs,
    # AdamW fp32 master + 2 moments 12e9 / 4
    assert z2["params"] * 2**30 == approx(2e9) and z2["reference"] * 2**30 == approx(2e9)
    assert z2["grads"] * 2**30 == approx(5e8) and z2["optimizer"] * 2**30 == approx(3e9)
    # activations, shared prefix, checkpointing: 6 rows; text tokens 2*5 + 6*4 = 34, patches 2*7 = 14;
    # a text layer saves 20*10 + 6*4 + 8*20 = 384 bytes a token, kept under checkpointing: its input, 2*10 bytes
    # -> 34 * (2 * 20 + 384) = 14416; vision 14 * (3 * 2 * 8 + 50) = 1372; logits: all 6 rows of 4 x 100 fp32
    # (9600 bytes <= 256 MB) x 3 = 28800
    assert z2["activations"] * 2**30 == approx(14416 + 1372 + 28800)
    assert z2["total"] == approx(sum(z2[k] for k in ("params", "reference", "grads", "optimizer", "activations")))
    z3 = bench.memory_estimate(1.0, 3, 4, arch=arch, **step)
    assert z3["params"] * 2**30 == approx(5e8) and z3["reference"] * 2**30 == approx(5e8)
    assert z3["activations"] == z2["activations"] and z3["optimizer"] == z2["optimizer"]
    # the plain path without checkpointing, 2 logit rows: 6 * (5 + 4) = 54 tokens x 2 layers x 384 = 41472,
    # 6 * 7 = 42 patches x 3 blocks x 50 = 6300, logits 2 x 1600 x 3 = 9600
    plain = bench.memory_estimate(1.0, 2, 4, arch=arch, grad_ckpt=False, shared_prefix=False, logit_rows=2,
                                  reference=False, **step)
    assert plain["activations"] * 2**30 == approx(41472 + 6300 + 9600) and plain["reference"] == 0
    # Qwen2-VL-2B at the paper's step, ZeRO-3 on 8 GPUs: weights 2 * 2.209e9 / 8 = 5.5225e8 bytes;
    # tokens 620 + 8 * 256 = 2668, each 28 * 2 * 1536 + (20*1536 + 6*256 + 8*8960) = 86016 + 103936 bytes;
    # patches 2048 x (32 * 2 * 1280 + 58952); logits: a row of 256 x 151936 fp32 is 155,582,464 bytes, so one
    # row at a time (256 MB holds one), x 3
    big = bench.memory_estimate(2.209, 3, 8, arch="Qwen2-VL-2B", **bench.PAPER_STEP)
    assert big["params"] * 2**30 == approx(5.5225e8)
    assert big["activations"] * 2**30 == approx(2668 * 189952 + 2048 * 140872 + 3 * 155582464)
    with pytest.raises(ValueError, match="zero_stage"):
        bench.memory_estimate(1.0, 1, 4, arch=arch)


def test_memory_estimate_text_layer_matches_what_a_bf16_layer_saves(real_arch):
    """The 20 h + 6 kv + 8 I bytes per token of memory_estimate: what a bf16 Qwen2-VL / Qwen2.5-VL decoder
    layer really saves for backward (saved-tensor hooks; its weights excluded), within 1 %."""
    for family, path in real_arch.items():
        model, _ = vlm.load_model(path, dtype=torch.bfloat16)
        model.train()
        text, layer = model.config.text_config, model.model.language_model.layers[0]
        h, n = text.hidden_size, 64
        kv = text.num_key_value_heads * h // text.num_attention_heads
        x = torch.randn(1, n, h, dtype=torch.bfloat16, requires_grad=True)
        rope = model.model.language_model.rotary_emb(x, torch.arange(n).view(1, 1, -1).expand(3, 1, -1))
        weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
        saved = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            layer(x, attention_mask=None, position_embeddings=rope)
        assert sum(saved.values()) / n == approx(20 * h + 6 * kv + 8 * text.intermediate_size, rel=0.01), family


def test_memory_table_and_the_checkpointing_flag(capsys):
    """`bench.py --memory`: a row per model and ZeRO stage; ZeRO-3 shards the weights, the shared prefix keeps
    fewer activations than the plain path. --grad-ckpt is on by default, --no-grad-ckpt turns it off."""
    rows = bench.main(["--memory", "--gpus", "8"])
    assert [(r["model"], r["zero_stage"]) for r in rows] == [(m, z) for m in bench.MODELS for z in (2, 3)]
    assert "Qwen2.5-VL-7B" in capsys.readouterr().out
    for zero2, zero3 in zip(rows[0::2], rows[1::2]):
        assert zero3["params"] == approx(zero2["params"] / 8) and zero3["total"] < zero2["total"]
        assert zero2["activations"] < zero2["plain_activations"]
    assert bench.p.parse_args([]).grad_ckpt and bench.p.parse_args(["--scaling", "--grad-ckpt"]).grad_ckpt
    assert not bench.p.parse_args(["--no-grad-ckpt"]).grad_ckpt


def test_roc_auc_is_the_share_of_rightly_ordered_pairs():
    # positives {0.35, 0.8} vs negatives {0.1, 0.4}: 3 of the 4 (positive, negative) pairs ordered right
    assert tables.roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == approx(0.75)
    # positive 0.5 vs negatives {0.5 (a tie: one half), 0.9 (wrong)}: 0.5 / 2
    assert tables.roc_auc([0.5, 0.5, 0.9], [True, False, False]) == approx(0.25)
    assert tables.roc_auc([0.2, 0.3], [True, True]) is None
    rng = np.random.default_rng(0)
    scores, positive = rng.integers(0, 5, 40) / 4, rng.random(40) < 0.4     # many ties
    from scipy.stats import mannwhitneyu
    u = mannwhitneyu(scores[positive], scores[~positive]).statistic
    assert tables.roc_auc(scores, positive) == approx(u / (positive.sum() * (~positive).sum()))


def test_script_args_for_one_script_go_to_that_script_alone():
    split = tables.split_script_args(["--n-test 4", "rise_r1.py --sft-steps 200 --lr 1e-5", "rise_r1.py --tau 0.5"])
    assert split == {None: ["--n-test", "4"], "rise_r1.py": ["--sft-steps", "200", "--lr", "1e-5", "--tau", "0.5"]}
    # rise_cot.py evaluates nothing: --n-test is dropped for it with its value, kept for rise_r1.py
    assert tables.taken("rise_cot.py", split[None]) == [] and tables.taken("rise_r1.py", split[None]) == ["--n-test", "4"]


def test_table_cells_are_the_mean_and_sample_std_over_seeds():
    per_seed = [{"T": {"a": {"x": 0.2, "y": None}}}, {"T": {"a": {"x": 0.4, "y": 1.0}, "b": {"x": 1.0}}}]
    summary = tables.summarise(per_seed)
    assert summary["T"]["a"]["x"] == approx([0.3, 0.2 / math.sqrt(2), 2])    # std of (0.2, 0.4) with ddof 1
    assert summary["T"]["a"]["y"] == [1.0, 0.0, 1] and summary["T"]["b"]["x"] == [1.0, 0.0, 1]
    text = tables.markdown(summary, seeds=[0, 1])
    assert "| a | 0.3 +- 0.14 | 1 +- 0 (n=1) |" in text      # a cell missing a seed says so
    assert "| b | 1 +- 0 (n=1) | - |" in text


def test_critic_auc_and_d_high_quality_from_run_files(tmp_path):
    cands = [{"answer": "Red", "gt_box": [0.0, 0.0, 0.5, 0.5], "candidates": [
        {"answer": "red.", "box": [0.0, 0.0, 0.5, 0.5], "s_r": 0.9, "s_b": 0.8},     # right, covers
        {"answer": "blue", "box": [0.5, 0.5, 1.0, 1.0], "s_r": 0.95, "s_b": 0.1},    # wrong, misses
        {"answer": "green", "box": [0.0, 0.0, 0.3, 0.3], "s_r": 0.1, "s_b": 0.9}]}]  # wrong, covers 0.36 < 0.5
    data.write_jsonl(tmp_path / "candidates.jsonl", cands)
    auc = tables.critic_auc(tmp_path / "candidates.jsonl")
    # s_r: the right answer (0.9) beats 0.1 but not 0.95 -> 1/2; s_b: the covering crop (0.8) beats 0.1, not 0.9
    assert auc["AUC s_r (right vs wrong answer)"] == approx(0.5)
    assert auc["AUC s_b (crop covers the target vs not)"] == approx(0.5)
    assert auc["right answers"] == approx(1 / 3) and auc["candidates"] == 3
    data.write_jsonl(tmp_path / "cots.jsonl", [{"reward": 0.9, "leak": True, "format": True},
                                               {"reward": 0.6, "leak": False, "format": False},
                                               {"reward": 0.2, "leak": False, "format": True}])
    assert tables.d_high_quality(tmp_path / "cots.jsonl", tau=0.5) == {
        "pass rate": approx(2 / 3), "D_high leaks": 0.5, "D_high format ok": 0.5}
    with pytest.raises(SystemExit, match="no such file"):           # a missing --cots says so, not "no CoT"
        rise_r1.high_quality(tmp_path / "missing.jsonl", [], 0.5)
    # two thinks differ only by surrounding spaces (the same CoT); an answer without think tags has none
    data.write_jsonl(tmp_path / "predictions.jsonl", [
        {"text": "<think>a red square</think><answer>{}</answer>"},
        {"text": "<think> a red square </think><answer>[1,2,3,4]</answer>"},
        {"text": "<think>a blue circle</think><answer>{}</answer>"}, {"text": "{\"red\": 1.0}"}])
    assert tables.distinct_thinks(run.read_jsonl(tmp_path / "predictions.jsonl")) == 2


def test_constant_prior_is_the_uniform_guess_scored_by_scipy(cache):
    from scipy.spatial.distance import jensenshannon
    test = run.read_jsonl(run.shapes_world(0) / "soft_cls" / "test.jsonl")[:5]
    want = np.mean([jensenshannon(np.full(len(r["probs"]), 0.25), r["probs"]) ** 2 for r in test])  # natural log
    assert tables.constant_prior(0, "soft_cls", 5) == {"JSD": approx(want)}


# ====================================================================================================
# the project's shape: one-way imports, the README's names
# ====================================================================================================
PROJECT = ["rewards", "data", "grpo", "dpo", "vlm", "run", "rise_cot", "rise_r1", "seg_rise", "visrl", "tiny",
           "convert", "tables", "bench"]


def project_imports(module):
    """The project modules `module` imports (at any depth of its code: a function's import counts)."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    found = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    found |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return found & set(PROJECT) - {module}


def test_imports_flow_one_way_and_the_losses_import_torch_alone():
    """rewards, data -> grpo, dpo -> vlm -> run -> the pipelines -> tiny, tables, bench: each module imports only
    modules of earlier layers (no cycle), grpo.py / dpo.py / rewards.py import no project module at all (copy a
    function alone), and no pipeline imports tiny.py (a real run never touches the demo's builder)."""
    layers = [{"rewards", "data"}, {"grpo", "dpo"}, {"vlm"}, {"run"}, {"rise_cot", "rise_r1", "seg_rise", "visrl"},
              {"tiny", "convert"}, {"tables", "bench"}]
    layer = {m: k for k, group in enumerate(layers) for m in group}
    for module in PROJECT:
        for imported in project_imports(module):
            assert layer[imported] < layer[module] or (module, imported) == ("convert", "data"), (module, imported)
    for module in ("grpo", "dpo", "rewards"):
        assert project_imports(module) == set(), module
    assert all("tiny" not in project_imports(m) for m in ("rise_cot", "rise_r1", "seg_rise", "visrl", "run", "vlm"))


def test_every_name_the_readme_gives_exists():
    """Each `module.name` and `module.py` the README names is there: a reader never looks for a function that is
    gone, and every script / command-line flag it quotes exists."""
    readme = (ROOT / "README.md").read_text()
    modules = {m: __import__(m) for m in PROJECT}
    named = set(re.findall(r"`(?:[^`]*?\b)?(" + "|".join(PROJECT) + r")\.([A-Za-z_]\w*)", readme))
    missing = [f"{m}.{n}" for m, n in named if n != "py" and not hasattr(modules[m], n)]
    assert named and not missing, missing
    for script in re.findall(r"\b(\w+)\.py\b", readme):
        assert (ROOT / f"{script}.py").exists() or script == "script", script          # script.py: any of them
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]+)", readme))
    accepted = {o for module in (rise_cot, rise_r1, S, visrl) for a in module.parser()._actions for o in a.option_strings}
    accepted |= {"--preset", "--sample", "--tokens", "--groups", "--num_gpus", "--hostfile", "--num_nodes", "--index-url", "--no-build-isolation", "--root", "--out",
                 "--refs", "--instances", "--images", "--split", "--json", "--test", "--memory", "--full-size",
                 "--quick", "--scaling", "--grad-ckpt", "--real-vocab", "--rows", "--seeds", "--script-args", "--jobs",
                 "--plan", "--init", "--answer-only", "--no-scores", "--n-train", "--n-test", "--seed", "--model", "--src",
                 "--targets", "--det-queries"}
    assert flags <= accepted, sorted(flags - accepted)


# ====================================================================================================
# the shipped tiny base (tiny-base/) and its recipe
# ====================================================================================================

@pytest.mark.slow
def test_tiny_base_is_shipped_small_and_the_default():
    """`--model tiny-base` loads the committed build: nothing is built at first run."""
    assert vlm.resolve_model(vlm.TINY_BASE) == str(SHIPPED_BASE)
    shipped = [f for d in (SHIPPED_BASE, S.SHAPES_CLIP) for f in d.iterdir()]
    assert sum(f.stat().st_size for f in shipped) < 40 * 2 ** 20
    assert {"model.safetensors", "config.json", "tokenizer.json", "build.json"} <= {f.name for f in shipped}
    record = json.loads((SHIPPED_BASE / "build.json").read_text())
    chain = [record]                      # a build continued with --init keeps its parent's record under "init"
    while chain[-1].get("init"):
        chain.append(chain[-1]["init"])
    curves = [r["loss_curve"] for r in chain if "loss_curve" in r]    # the oldest look stages ran as probes
    assert record["steps"] > 0 and curves[0][-1][1] < 0.5 * curves[-1][0][1]
    model, processor = vlm.load_model(vlm.TINY_BASE)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert model.config.text_config.rope_parameters["rope_theta"] == tiny_py.ROPE_THETA


@pytest.mark.slow
def test_shipped_tiny_base_scores_as_its_build_record(cache):
    """Greedy scores of the committed base on the first CHECK_N test scenes per task, recomputed here,
    equal the ones its build recorded: within 2 samples of 16 for rates, 0.05 for JSD and box IoU,
    0.05 nats for the grounding gap (float differences between machines can flip a greedy token)."""
    record = json.loads((SHIPPED_BASE / "build.json").read_text())["check"]
    model, processor = vlm.load_model(vlm.TINY_BASE)
    root = tiny_py.scores_world()
    got = tiny_py.task_scores(model, processor, root, n=tiny_py.CHECK_N)
    assert tiny_py.grounding_gap(model, processor, root, n=tiny_py.CHECK_N) == approx(
        record["grounding_gap_nats"], abs=0.05)
    for task, metrics in got.items():
        for name, value in metrics.items():
            tol = {"jsd": 0.05, "box_iou": 0.05, "unparsable": 2, "n": 0}.get(name, 2 / tiny_py.CHECK_N)
            assert value == approx(record[task][name], abs=tol), (task, name)


@pytest.mark.slow
def test_shipped_tiny_base_looks_at_the_image(cache):
    """The committed base's boxes follow the image: on 32 det test scenes the mean IoU of its box with the
    named shape's is far higher with the right image than with the next scene's (same prompts; the next
    scene's picture has the shape elsewhere or not at all), for the answer-only prompt's answer and for
    the think-first prompt's think, which is the box (tiny.pretrain_corpus), and its answer, which copies it.
    Measured: answer-only 0.73 vs 0.05, think 0.69 vs 0.06, think-first answer 0.55 vs 0.06."""
    model, processor = vlm.load_model(vlm.TINY_BASE)
    records, _ = data.read_manifest(tiny_py.scores_world() / "det" / "test.jsonl", "det")
    records = records[:32]
    images = [data.open_image(r["image_path"]) for r in records]

    def mean_iou(style, read, shown):
        prompts = [[vlm.user_turn(data.prompt(style, r, frame=tiny_py.FRAME))] for r in records]
        texts = tiny_py._greedy(model, processor, prompts, [[im] for im in shown], 48)
        boxes = [rewards.parse_boxes(read(t)) for t in texts]
        return np.mean([rewards.box_iou(vlm.from_model_frame(b[0], "qwen2_vl", im.size), r["boxes"][0]) if b
                        else 0.0 for b, r, im in zip(boxes, records, images)])

    def part(i):    # the think (0) or the answer (1) of a think-first reply; "" if the tags are broken
        return lambda text: (rewards.parse_think_answer(text) or ("", ""))[i]

    for style, read, margin in (("plain", lambda text: text, 0.15), ("r1", part(0), 0.15), ("r1", part(1), 0.1)):
        right, rolled = mean_iou(style, read, images), mean_iou(style, read, images[1:] + images[:1])
        assert right > rolled + margin, (style, right, rolled)


@pytest.mark.slow
def test_shipped_tiny_base_finds_every_shape_of_a_kind_and_the_shape_in_a_quadrant(cache):
    """On 32 test scenes each: the committed base's answer-only multi_det boxes match far more true boxes
    (IoU >= 0.5) with the right image than with the next scene's; VisRL's box turn puts its box in the quadrant
    the question names (the base without the kinds and quadrant look questions: 0.19, chance 0.25).
    Measured: recall 0.37 vs 0.04; quadrant 1.00."""
    model, processor = vlm.load_model(vlm.TINY_BASE)
    root = tiny_py.scores_world()
    multi = data.read_manifest(root / "multi_det" / "test.jsonl", "det")[0][:32]
    images = [data.open_image(r["image_path"]) for r in multi]
    prompts = [[vlm.user_turn(data.prompt("plain", r, frame=tiny_py.FRAME))] for r in multi]

    def recall(shown):
        texts = tiny_py._greedy(model, processor, prompts, [[im] for im in shown], 64)
        boxes = [[vlm.from_model_frame(b, "qwen2_vl", im.size) for b in rewards.parse_boxes(t) or []]
                 for t, im in zip(texts, images)]
        hits = sum(any(rewards.box_iou(b, g) >= 0.5 for b in bs) for bs, r in zip(boxes, multi) for g in r["boxes"])
        return hits / sum(len(r["boxes"]) for r in multi)

    right, rolled = recall(images), recall(images[1:] + images[:1])
    assert right > rolled + 0.15, (right, rolled)
    vqa = data.read_manifest(root / "vqa" / "test.jsonl", "vqa")[0][:32]
    texts = tiny_py._greedy(model, processor, [[vlm.user_turn(data.prompt("visrl", r))] for r in vqa],
                            [[data.open_image(r["image_path"])] for r in vqa], 32)
    boxes = [rewards.parse_boxes(t) for t in texts]
    side = data.IMAGE_SIZE
    inside = [b is not None and data.position_word(visrl.pixel_box(b[0], side, side), grid=2) ==
              data.position_word(r["box"], grid=2) for b, r in zip(boxes, vqa)]
    assert np.mean(inside) >= 0.75, np.mean(inside)


@pytest.mark.slow
def test_short_tiny_build_runs_stage_by_stage(cache, tmp_path):
    """`python tiny.py base` at toy size (6 scenes per task): each stage's loss falls, the build record says
    how it was made (command, plan, per-stage look scores that a fresh greedy pass reproduces), a build
    continued with --init carries its parent's record, and the saved model answers as it did when built."""
    out = tiny_py.build_tiny(tmp_path / "base", seed=0, plan=[("where_alone", 12), ("formats", 12)], n_train=6,
                             pixels=None, record_scores=False, look_n=4, log=lambda *a: None)
    record = json.loads((out / "build.json").read_text())
    assert record["steps"] == 24 and "--plan 'where_alone:12,formats:12' --n-train 6" in record["command"]
    assert record["versions"]["torch"] == torch.__version__ and [s["stage"] for s in record["stages"]] == \
        ["where_alone", "formats"]
    curve = dict(record["loss_curve"])
    assert curve[12] < curve[1] and curve[24] < curve[13]
    more = tiny_py.build_tiny(tmp_path / "more", plan=[("alone", 2)], n_train=6, init=out, pixels=224,
                              record_scores=False, look_n=4, log=lambda *a: None)
    again = json.loads((more / "build.json").read_text())
    assert again["init"]["steps"] == 24 and f"--init {out} --pixels 224" in again["command"]
    model, processor = vlm.load_model(more)
    assert tiny_py.look_scores(model, processor, tiny_py.scores_world(), 4) == \
        {k: again["stages"][-1][k] for k in ("alone", "scenes", "kinds", "quadrants")}
    batch = vlm.chat_inputs(processor, [[vlm.user_turn(tiny_py.LOOK_COLOUR.format(shape="circle"))]],
                            [[solid((220, 40, 40), 112)]])
    assert batch["image_grid_thw"].tolist() == [[1, 16, 16]]           # saved at 224 px: 64 image tokens
    with pytest.raises(ValueError, match="unknown stage"):
        tiny_py.build_tiny(tmp_path / "bad", plan=[("boxes", 1)])
    assert tiny_py.parse_plan("where_alone:3,formats:2") == [("where_alone", 3), ("formats", 2)]
    for bad in ("where_alone", "alone:x", "alone:0", "boxes:3"):
        with pytest.raises(ValueError):
            tiny_py.parse_plan(bad)


# ====================================================================================================
# the losses drive the tiny VLM: GRPO and DPO learn a task from scratch
# ====================================================================================================

def colour_scores(model, processor, images, texts):
    """Summed log-prob of each answer text to "What colour is this image?" for its image."""
    batch = vlm.chat_inputs(processor, [[vlm.user_turn("What colour is this image?")]] * len(images),
                            [[im] for im in images])
    ids, mask = vlm.completion_tensors(processor, texts)
    return sequence_logp(vlm.completion_logprobs(model, dict(batch), ids, mask), mask)


@pytest.mark.slow
def test_grpo_learns_to_name_the_colour(tiny_dir):
    """GRPO from the *random* tiny model, reward alone (grpo.colour_reward on the first word):
    held-out greedy reward on red / blue images rises from ~0 (a random model names no colour)
    to >= 0.8. Same recipe as `deepspeed grpo.py`: G 16, 8 images per step (4 per colour),
    one new token, lr 2e-3 decaying linearly to 0 over 30 steps, beta 0.05 (KL to the initial
    model keeps the groups diverse), advantages not std-scaled.
    Measured here (this recipe, seeds 0-7 of torch and the image stream): held-out 1.00 at steps 20 and 30
    in 6 of 8 seeds (seed 0: 0.50 -> 1.00 -> 1.00; ~2.4 s/step on one thread); seed 4 settled on "re" for
    red, seed 7 never sampled "blue" (0.5). With difflib-similarity credit instead of prefixes (before)
    the policy settled on near-miss tokens ("lu" for blue) in 2 of 5 seeds."""
    torch.manual_seed(0)
    rng, steps, colours = random.Random(0), 30, ["red", "blue"]
    model, processor = vlm.load_model(tiny_dir)
    ref, _ = vlm.load_model(tiny_dir)
    ref.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / steps)
    question = [vlm.user_turn("What colour is this image?")]
    held = tiny_py.colour_task(random.Random(123), 16, ["red"]) + tiny_py.colour_task(random.Random(124), 16, ["blue"])

    def held_out_reward():
        batch = vlm.chat_inputs(processor, [question] * len(held), [[im] for im, _ in held])
        texts = vlm.sample(model, processor, batch, 1, 1, do_sample=False)["texts"]
        return sum(tiny_py.colour_reward(texts, range(len(held)), [c for _, c in held])) / len(held)

    curve = [held_out_reward()]
    for step in range(steps):
        pairs = [p for c in colours for p in tiny_py.colour_task(rng, 4, [c])]
        answers = [c for _, c in pairs]
        stats, _, _ = vlm.grpo_step(model, ref, processor, [question] * len(pairs), [[im] for im, _ in pairs],
                                    lambda texts, prompt_index: tiny_py.colour_reward(texts, prompt_index, answers),
                                    optimizer=optimizer, group_size=16, max_new_tokens=1, beta=0.05,
                                    scale_rewards=False)
        schedule.step()
        if step % 10 == 9:
            curve.append(held_out_reward())
    print(f"GRPO held-out reward every 10 steps: {[round(r, 3) for r in curve]}")
    assert curve[0] < 0.2
    assert curve[-1] >= 0.8


@pytest.mark.slow
def test_dpo_learns_to_prefer_the_colour_name(tiny_dir):
    """DPO on (image, chosen = its colour, rejected = another colour) pairs: the chosen-vs-rejected
    margin grows and, on held-out images, the policy ranks the right colour above every wrong one."""
    import random
    torch.manual_seed(0)
    model, processor = vlm.load_model(tiny_dir)
    ref, _ = vlm.load_model(tiny_dir)
    ref.requires_grad_(False)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    colours, rng = list(data.COLORS), random.Random(0)
    held = tiny_py.colour_task(random.Random(7), 16)

    def held_out_accuracy():    # fraction of (image, wrong colour) ranked below the right one; mean gap (nats)
        with torch.no_grad():
            images = [im for im, c in held for _ in range(3)]
            right = colour_scores(model, processor, images, [c for _, c in held for _ in range(3)])
            wrong = colour_scores(model, processor, images, [o for _, c in held for o in colours if o != c])
        return (right > wrong).float().mean().item(), (right - wrong).mean().item()

    before, margins = held_out_accuracy(), []
    for step in range(12):
        pairs = tiny_py.colour_task(rng, 8)
        images, chosen = [im for im, _ in pairs], [c for _, c in pairs]
        rejected = [rng.choice([o for o in colours if o != c]) for c in chosen]
        with torch.no_grad():
            ref_c, ref_r = colour_scores(ref, processor, images, chosen), colour_scores(ref, processor, images, rejected)
        loss, stats = dpo_loss(colour_scores(model, processor, images, chosen),
                               colour_scores(model, processor, images, rejected), ref_c, ref_r, beta=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        margins.append(stats["margin"])
    after = held_out_accuracy()
    print(f"DPO margins per step {[round(m, 3) for m in margins]}; held-out accuracy, log-prob gap {before} -> {after}")
    assert margins[0] == pytest.approx(0.0, abs=1e-6)      # policy == reference at the start
    assert sum(margins[-3:]) / 3 > 0.3 > sum(margins[:3]) / 3      # measured: 0.47 vs 0.08
    # a random init can already rank some colours right by chance (measured 0.94 with one tokenizer), so
    # the held-out test is on the log-prob gap, which DPO must widen, and on the final ranking
    assert after[0] >= 0.9 and after[1] > before[1] + 1.0


# ====================================================================================================
# runs: the scripts as a user runs them (one and two CPU ranks, kill and resume, faults)
# ====================================================================================================

def env_for(cache):
    return dict(os.environ, PYTHONPATH=str(ROOT), RISE_CACHE=str(cache), OMP_NUM_THREADS="1")


REAL_ARCH_RUNS = """
import json, sys, time
from pathlib import Path
import data, rise_cot, rise_r1, seg_rise, visrl
world, clip, root = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
S = ["--preset", "tiny", "--batch-size", "1", "--max-new-tokens", "8", "--n-test", "2"]
G = ["-G", "2"]
det = world / "det"
def go(fn, *argv):
    fn([str(a) for a in argv])
for model in sys.argv[4:]:                  # one process for both: the imports are most of the time
  out = root / Path(model).name
  go(rise_cot.main, "--model", model, "--data", det / "train.jsonl", "--out", out / "cot", "--max-steps", "1",
     "--rec-max-new-tokens", "8", "--harvest-batch-size", "4", *G, *S[:-2])
  go(rise_r1.main, "--model", model, "--data", det / "train.jsonl", "--cots", out / "cot" / "cots.jsonl", "--tau", "0",
     "--sft-steps", "1", "--max-steps", "1", "--out", out / "r1", *G, *S[:-2])
  go(rise_r1.main, "--eval", "--model", out / "r1" / "final", "--test", det / "test.jsonl", "--out", out / "r1_eval", *S)
  go(seg_rise.main, "--model", model, "--data", world / "seg" / "train.jsonl", "--out", out / "seg", "--max-steps", "1",
     "--clip-ckpt", clip, *G, *S[:-2])
  go(seg_rise.main, "--eval", "--executor", "box", "--model", out / "seg" / "final", "--test", world / "seg" / "test.jsonl",
     "--out", out / "seg_eval", "--clip-ckpt", clip, *S)
  r = data.read_manifest(world / "vqa" / "train.jsonl", "vqa")[0][0]
  pair = {"id": r["id"], "question": r["question"], "answer": r["answer"], "image": r["image_path"], "size": [112, 112],
          "shapes": True,
          "chosen": {"box": visrl.norm_box(r["box"], 112, 112), "answer": r["answer"], "s_b": 1.0, "s_r": 1.0},
          "rejected": {"box": [0.0, 0.0, 0.1, 0.1], "answer": "x", "s_b": 0.0, "s_r": 0.0}}
  (out / "pairs.jsonl").write_text(json.dumps(pair) + "\\n")
  go(visrl.main, "--model", model, "--data", world / "vqa" / "train.jsonl", "--test", world / "vqa" / "test.jsonl",
     "--out", out / "visrl", "--iters", "1", "--pairs", out / "pairs.jsonl", "--sft-fraction", "0.5",
     "--attempts", "1", "--sft-batch-size", "1", "--dpo-epochs", "1", "--stage-eval-n", "0",
     "--answer-max-new-tokens", "4", *(["--lora-rank", "4"] if "2_5" in model else []), *S)
"""


def run_on_real_archs(script, real_arch, clip_dir, cache, tmp_path):
    """Run `script` (argv: a 2+2-scene shapes world, the CLIP folder, the output root, then each architecture's
    model folder) in one process: the imports are most of its time."""
    world = tmp_path / "world"
    data.make_shapes_world(world, n_train=2, n_test=2, seed=0)
    ok(subprocess.run([sys.executable, "-c", script, str(world), str(clip_dir), str(tmp_path),
                       *(str(p) for p in real_arch.values())], cwd=tmp_path, env=env_for(cache),
                      capture_output=True, text=True, timeout=900))


def _check_real_arch_run(family, out):
    for name in ("cot", "r1", "seg", "visrl"):
        assert json.loads((out / name / "final" / "config.json").read_text())["model_type"] == family
    assert len(run.read_jsonl(out / "cot" / "cots.jsonl")) == 2
    assert [m.get("stage") for m in run.read_jsonl(out / "r1" / "metrics.jsonl") if "loss" in m] == ["sft", "grpo"]
    assert json.loads((out / "r1_eval" / "eval.json").read_text())["n"] == 2
    assert json.loads((out / "seg_eval" / "eval.json").read_text())["n"] == 2
    stages = [m["stage"] for m in run.read_jsonl(out / "visrl" / "metrics.jsonl")]
    assert {"sft", "iter1/stage1", "iter1/stage2"} <= set(stages)
    assert json.loads((out / "visrl" / "eval.json").read_text())["n"] == 2


SMALL = ["--preset", "tiny", "-G", "2", "--batch-size", "1", "--max-new-tokens", "8", "--rec-max-new-tokens", "8"]


def launch(script, args, cwd, ranks=1, port=29541):
    """Run a pipeline script as a user would: `deepspeed --num_gpus N script.py ...` (or python)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    head = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port)] if ranks > 1 else [sys.executable]
    return subprocess.run(head + [str(ROOT / script)] + [str(a) for a in args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def kill_when(script, args, cwd, condition, env=None, timeout=600):
    """Start `python script args` and kill -9 it as soon as condition() holds; asserts it was killed."""
    env = env or dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / script)] + [str(a) for a in args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1]
    assert proc.returncode == -signal.SIGKILL, "it ended before it could be killed: " + err[-3000:]


FAULTS = """
import os, time
spec = dict(item.split("=") for item in os.environ.get("RISE_FAULTS", "").split(",") if item)
rank = int(os.environ.get("RANK", "-1"))
if spec and rank >= 0:                       # a launched rank (not the launcher itself)
    import torch
    import grpo
    if "nan_rank" in spec:                    # a non-finite loss on one rank only (a bf16 overflow on one GPU)
        real_loss, calls = grpo.grpo_loss, [0]
        def grpo_loss(*a, **k):
            loss, stats = real_loss(*a, **k)
            calls[0] += 1
            if rank == int(spec["nan_rank"]) and calls[0] == int(spec["nan_call"]):
                loss = loss * float("nan")
            return loss, stats
        grpo.grpo_loss = grpo_loss
    if "slow_rank" in spec:                   # a slow disk on one rank: its files of one checkpoint come late
        real_save = torch.save
        def save(obj, f, *a, **k):
            if rank == int(spec["slow_rank"]) and spec["slow_tag"] in str(f):
                time.sleep(float(spec["slow_seconds"]))
            return real_save(obj, f, *a, **k)
        torch.save = save
"""


def launch_with_faults(args, cwd, faults, ranks=2, port=29551):
    """Popen of `deepspeed --num_gpus N rise_cot.py ARGS` whose ranks import the FAULTS sitecustomize:
    faults = "key=value,..." (nan_rank/nan_call, slow_rank/slow_tag/slow_seconds)."""
    site = Path(cwd) / "faults"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(FAULTS)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1", RISE_FAULTS=faults)
    return subprocess.Popen(["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), str(ROOT / "rise_cot.py")]
                            + [str(a) for a in args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def rank_pid(launcher, rank):
    """The pid of one rank's worker under a deepspeed launcher process."""
    import psutil
    for child in psutil.Process(launcher.pid).children(recursive=True):
        if any(a == f"--local_rank={rank}" for a in child.cmdline()):
            return child.pid
    return None


def wait_for(proc, condition, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the fault: " + proc.communicate()[0][-3000:]


def rewards_by_step(out):
    return [(m["step"], round(m["reward"], 5), round(m["loss"], 5), m["skipped"])
            for m in run.read_jsonl(out / "metrics.jsonl")]


STAGES_SCRIPT = """
import argparse, json, sys
from pathlib import Path
import torch
import data, run, vlm, visrl
tiny, shapes, out = sys.argv[1:4]
run.init_distributed(force=True)
args = argparse.Namespace(sft_lr=1e-3, sft_batch_size=1, sft_epochs=1.0, max_steps=None, seed=0, grad_accum=2,
                          lr=1e-3, weight_decay=0.0, deepspeed=None, max_pixels=None, gradient_checkpointing=False,
                          freeze_vision=False, lora_rank=0, lr_scheduler="constant", warmup_ratio=0.0)
engine, processor = run.policy(args, tiny)
recs = data.read_manifest(Path(shapes) / "vqa" / "train.jsonl", "vqa")[0]
state = {"step": 0}
for k, lr in enumerate((1e-3, 3e-4)):          # two stages of ONE micro-step each, grad accumulation 2
    args.sft_lr = lr
    visrl.sft_stage(engine, processor, recs[k:k + 1], args, 0, 1, Path(out), state)
    torch.save({n: p.detach().clone() for n, p in engine.module.named_parameters()}, Path(out) / f"stage{k}.pt")
print(json.dumps({"updates": engine.global_steps}))
"""


KEYS = {"ours_sps", "trl_sps", "ratio_vs_trl", "ours_peak_mb", "trl_peak_mb"}


def run_bench(capsys, tiny_dir, *extra):
    """bench.main on the tiny model, one measured step, no warm-up; returns its JSON line."""
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            results = bench.main(["--model", str(tiny_dir), "--quick", "--reps", "1", "--warmup", "0", "--json", *extra])
    finally:
        torch.set_num_threads(threads)                    # bench runs torch on one CPU thread
    lines = capsys.readouterr().out.strip().splitlines()
    assert "GRPO step" in "\n".join(lines) and "DPO step" in "\n".join(lines)
    out = json.loads(lines[-1])
    assert set(out) == {"grpo", "dpo"} and all(set(v) == KEYS for v in out.values())
    for algo in ("grpo", "dpo"):
        assert out[algo]["ours_sps"] > 0 and out[algo]["ours_peak_mb"] > 0
        r = results[algo]["ours"]
        assert r["total"] > 0 and r["logp"] > 0 and r["update"] > 0 and r["length"] > 0
    assert results["grpo"]["ours"]["gen"] > 0
    return out


@pytest.mark.slow
def test_every_pipeline_trains_and_evaluates_on_both_real_architectures(real_arch, clip_dir, cache, tmp_path):
    """RISE-CoT (1 step + harvest), RISE-R1 (SFT + GRPO, then --eval), Seg-RISE (1 step, then --eval) and
    VisRL (SFT, stage 1, stage 2 on a given pair, then its evaluation) on each architecture, in one process
    (~2-4 min on 2 shared cores, mostly imports and model I/O). Detection boxes go through the model's
    frame: 0..1000 (Qwen2-VL) / resized pixels (Qwen2.5-VL)."""
    run_on_real_archs(REAL_ARCH_RUNS, real_arch, clip_dir, cache, tmp_path)
    for family, path in real_arch.items():
        _check_real_arch_run(family, tmp_path / path.name)


PAPER_PRESET_RUNS = """
import json, sys
from pathlib import Path
import data, rise_cot, rise_r1, seg_rise, visrl
world, clip, root = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
budget = ["--preset", "paper", "--batch-size", "1", "--max-new-tokens", "8", "-G", "2"]
def go(fn, *argv):
    fn([str(a) for a in argv])
r = data.read_manifest(world / "vqa" / "train.jsonl", "vqa")[0][0]
pair = {"id": r["id"], "question": r["question"], "answer": r["answer"], "image": r["image_path"], "size": [112, 112],
        "shapes": True, "chosen": {"box": visrl.norm_box(r["box"], 112, 112), "answer": r["answer"], "s_b": 1.0, "s_r": 1.0},
        "rejected": {"box": [0.0, 0.0, 0.1, 0.1], "answer": "x", "s_b": 0.0, "s_r": 0.0}}
(root / "pairs.jsonl").write_text(json.dumps(pair) + "\\n")
for model in sys.argv[4:]:
  out = root / Path(model).name
  go(rise_cot.main, "--model", model, "--data", world / "det" / "train.jsonl", "--out", out / "cot", "--max-steps", "1",
     "--rec-max-new-tokens", "8", "--harvest-batch-size", "2", *budget)
  go(rise_r1.main, "--model", model, "--data", world / "det" / "train.jsonl", "--cots", out / "cot" / "cots.jsonl",
     "--tau", "0", "--sft-steps", "1", "--max-steps", "1", "--out", out / "r1", *budget)
  go(seg_rise.main, "--model", model, "--data", world / "seg" / "train.jsonl", "--out", out / "seg", "--max-steps", "1",
     "--clip-ckpt", clip, *budget)
  go(visrl.main, "--model", model, "--data", world / "vqa" / "train.jsonl", "--test", world / "vqa" / "test.jsonl",
     "--out", out / "visrl", "--iters", "1", "--pairs", root / "pairs.jsonl", "--sft-fraction", "0.5", "--attempts", "1",
     "--sft-batch-size", "1", "--dpo-epochs", "1", "--stage-eval-n", "0", "--answer-max-new-tokens", "4",
     "--n-test", "2", *budget[:-2])
"""


@pytest.mark.slow
def test_paper_presets_start_under_zero3_on_both_real_architectures(real_arch, clip_dir, cache, tmp_path):
    """Every pipeline's --preset paper (ZeRO-3, gradient checkpointing, the papers' prompts, LoRA for VisRL) trains
    one step on each toy-depth architecture with only the budget cut (batch 1, G 2, 8 new tokens): what a user with
    a real checkpoint launches, started. The GRPO runs' checkpoints record ZeRO-3."""
    run_on_real_archs(PAPER_PRESET_RUNS, real_arch, clip_dir, cache, tmp_path)
    for family, path in real_arch.items():
        out = tmp_path / path.name
        for name, expected in (("cot", rise_cot.PAPER), ("r1", rise_r1.PAPER), ("seg", S.PAPER),
                               ("visrl", visrl.PAPER)):
            args = json.loads((out / name / "args.json").read_text())
            assert args["preset"] == "paper" and args["deepspeed"] == "ds_zero3.json" and args["gradient_checkpointing"]
            assert args["lr"] == expected["lr"] and args["lora_rank"] == expected.get("lora_rank", 0)
            assert json.loads((out / name / "final" / "config.json").read_text())["model_type"] == family
            if name != "visrl":
                assert json.loads((out / name / "ckpt" / "state.json").read_text())["zero_stage"] == 3
        assert json.loads((out / "visrl" / "eval.json").read_text())["n"] == 2


@pytest.mark.slow
def test_two_rank_zero3_step_on_cpu(tiny_dir, tmp_path):
    """`deepspeed --num_gpus 2` on CPU (gloo): two GRPO steps under ZeRO-3 leave the same
    parameters on both ranks (gradients were all-reduced) while each rank sampled its own
    completions (per-rank seeds). With sharded weights, the shared-prefix log-probs of an 8-token
    rollout and their all-reduced gradients equal the plain path's, gradient checkpointing off and on."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "new" / "run"                       # created by the script (it was not, with --model given)
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", "29533", str(ROOT / "tiny.py"), "grpo", "--model", str(tiny_dir),
           "--out", str(out), "--max-steps", "2", "--num-generations", "8", "--deepspeed",
           str(ROOT / "ds_zero3.json"), "--dump-rank-state", "--lr", "1e-2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert ranks[0]["texts"] != ranks[1]["texts"]
    assert max(r["shared_prefix_max_diff"] for r in ranks) <= 1e-5      # shared-prefix log-probs under ZeRO-3
    assert ranks[0]["grad_max"] == ranks[1]["grad_max"] > 0.1           # the all-reduced gradient, not zero
    assert max(r["shared_prefix_grad_max_diff"] for r in ranks) <= 1e-5 * ranks[0]["grad_max"]   # measured 4e-7 x
    assert max(r["checkpointed_shared_prefix_max_diff"] for r in ranks) <= 1e-5     # and under gradient checkpointing
    assert max(r["checkpointed_shared_prefix_grad_max_diff"] for r in ranks) <= 1e-5 * ranks[0]["grad_max"]
    model, _ = vlm.load_model(tiny_dir)
    initial = sum(p.detach().double().sum().item() for p in model.parameters())
    assert abs(initial - ranks[0]["checksum"]) > 1e-3           # the step really changed the weights


@pytest.mark.slow
def test_rise_cot_and_rise_r1_two_ranks(tiny_dir, rise_world, tmp_path):
    """Both stages on two ranks under ZeRO-3. RISE-CoT runs the shipped base, whose CoTs end at
    different lengths on the two ranks: with ZeRO-3's module hooks left on while generating, that
    left a parameter "in flight" and the run failed (gathered() lifts them)."""
    train = rise_world / "soft_cls" / "train.jsonl"
    ids = [json.loads(line)["id"] for line in train.read_text().splitlines()]
    cot_out, zero3 = tmp_path / "cot", ["--deepspeed", ROOT / "ds_zero3.json"]
    ok(launch("rise_cot.py", ["--model", SHIPPED_BASE, "--data", train, "--out", cot_out, "--max-steps", "1",
                              "--harvest-batch-size", "1", *zero3, *SMALL, "--max-new-tokens", "48"], tmp_path, ranks=2))
    cots = run.read_jsonl(cot_out / "cots.jsonl")
    assert sorted(c["id"] for c in cots) == sorted(ids)        # every sample exactly once, from two ranks
    assert all(0 <= c["reward"] <= 1 and set(c) >= {"id", "cot", "reconstruction", "reward"} for c in cots)
    assert len(run.read_jsonl(cot_out / "metrics.jsonl")) == 1
    assert (cot_out / "final" / "config.json").exists() and (cot_out / "args.json").exists()

    r1_out = tmp_path / "r1"
    ok(launch("rise_r1.py", ["--model", tiny_dir, "--data", train, "--cots", cot_out / "cots.jsonl", "--tau", "0",
                             "--out", r1_out, "--sft-steps", "1", "--max-steps", "1", "--preset", "tiny", "-G", "2",
                             "--batch-size", "1", "--max-new-tokens", "8", "--grad-accum", "2", *zero3],
              tmp_path, ranks=2, port=29542))
    # --sft-steps / --max-steps count optimizer updates (as TRL/HF): 1 update = 2 micro-steps with
    # --grad-accum 2; DeepSpeed's own count of applied updates is logged as "updates"
    rows = [m for m in run.read_jsonl(r1_out / "metrics.jsonl") if "loss" in m]
    assert [m["stage"] for m in rows] == ["sft", "sft", "grpo", "grpo"]
    assert [m["updates"] for m in rows] == [0, 1, 1, 2]
    assert (r1_out / "sft" / "config.json").exists() and (r1_out / "final" / "config.json").exists()

    ok(launch("rise_r1.py", ["--eval", "--model", r1_out / "final", "--test", rise_world / "soft_cls" / "test.jsonl",
                             "--out", tmp_path / "eval", "--preset", "tiny", "--max-new-tokens", "8"],
              tmp_path, ranks=2, port=29543))
    metrics = json.loads((tmp_path / "eval" / "eval.json").read_text())
    preds = run.read_jsonl(tmp_path / "eval" / "predictions.jsonl")
    assert metrics["n"] == 4 and len({p["id"] for p in preds}) == 4
    assert metrics["unparsable"] == sum(not p["parsed"] for p in preds)


@pytest.mark.slow
def test_rise_cot_kill_and_resume_loses_and_duplicates_nothing(tiny_dir, rise_world, tmp_path):
    manifest = rise_world / "det" / "train.jsonl"
    ids = sorted(json.loads(line)["id"] for line in manifest.read_text().splitlines())
    out = tmp_path / "run"
    args = ["--model", tiny_dir, "--data", manifest, "--out", out, "--max-steps", "2", "--save-every", "1",
            "--harvest-batch-size", "1", *SMALL]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "rise_cot.py")] + [str(a) for a in args], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:           # kill -9 in the middle of the harvest
        if len(run.read_jsonl(out / "cots.jsonl")) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-harvest"
    before = run.read_jsonl(out / "cots.jsonl")
    assert 2 <= len(before) < len(ids)
    ok(launch("rise_cot.py", args + ["--resume"], tmp_path))
    after = run.read_jsonl(out / "cots.jsonl")
    assert sorted(c["id"] for c in after) == ids                    # nothing lost, nothing twice
    assert after[:len(before)] == before                            # records written before the kill kept
    assert [m["step"] for m in run.read_jsonl(out / "metrics.jsonl")] == [0, 1]
    # training resumes from the checkpoint: a third step continues the log, the old two stay
    ok(launch("rise_cot.py", [a if a != "2" else "3" for a in args] + ["--resume"], tmp_path))
    assert [m["step"] for m in run.read_jsonl(out / "metrics.jsonl")] == [0, 1, 2]


@pytest.mark.slow
def test_sigterm_on_one_rank_and_nan_on_one_rank_resume_exactly(tiny_dir, rise_world, tmp_path):
    """Two ranks (ZeRO-2), RISE-CoT. A non-finite loss on rank 1 only at step 1: both ranks skip that update
    (the decision is all-reduced: a rank that skipped alone left the other waiting in backward forever).
    SIGTERM (what SLURM sends before it kills) to rank 1 only after step 2: both ranks checkpoint and exit 143.
    --resume then gives every step's reward exactly as the same run uninterrupted: each rank's own RNG comes
    back (a checkpoint that held rank 0's only made both ranks draw alike), nothing is lost or logged twice."""
    manifest = rise_world / "soft_cls" / "train.jsonl"
    args = ["--model", SHIPPED_BASE, "--data", manifest, "--max-steps", "5", "--save-every", "100",
            "--harvest-batch-size", "2", *SMALL, "--rec-max-new-tokens", "40"]   # rewards that vary: the base's
    nan = "nan_rank=1,nan_call=2"
    whole = launch_with_faults(args + ["--out", tmp_path / "whole"], tmp_path, nan)
    assert whole.wait(timeout=900) == 0, whole.communicate()[0][-3000:]
    expected = rewards_by_step(tmp_path / "whole")
    assert [s for s, _, _, skipped in expected if skipped] == [1] and len(expected) == 5
    assert len({r for _, r, _, _ in expected}) > 2                       # the rewards differ from step to step
    out = tmp_path / "stopped"
    proc = launch_with_faults(args + ["--out", out], tmp_path, nan, port=29552)
    wait_for(proc, lambda: lines(out / "metrics.jsonl") >= 2)
    os.kill(rank_pid(proc, 1), signal.SIGTERM)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode != 0 and "stopped by a signal" in log, log[-3000:]
    state = json.loads((out / "ckpt" / "state.json").read_text())
    assert 2 <= state["step"] < 5 and len(run.read_jsonl(out / "metrics.jsonl")) == state["step"]
    resumed = launch_with_faults(args + ["--out", out, "--resume"], tmp_path, "", port=29553)
    assert resumed.wait(timeout=900) == 0, resumed.communicate()[0][-3000:]
    assert rewards_by_step(out) == expected


@pytest.mark.slow
def test_a_checkpoint_counts_only_once_every_rank_has_written_it(tiny_dir, rise_world, tmp_path):
    """Two ranks (ZeRO-2), a checkpoint every step; rank 1's disk is slow for the second one and the job is
    killed while rank 0's files of it are on disk. --resume takes the last complete checkpoint (the first),
    says so, and the run ends with every step logged once."""
    manifest = rise_world / "soft_cls" / "train.jsonl"
    out = tmp_path / "run"
    args = ["--model", tiny_dir, "--data", manifest, "--out", out, "--max-steps", "3", "--save-every", "1",
            "--harvest-batch-size", "2", *SMALL, "--max-new-tokens", "4", "--rec-max-new-tokens", "4"]
    proc = launch_with_faults(args, tmp_path, "slow_rank=1,slow_tag=save2,slow_seconds=120", port=29554)
    wait_for(proc, lambda: (out / "ckpt" / "save2" / "mp_rank_00_model_states.pt").exists())
    os.killpg(proc.pid, signal.SIGKILL)                           # the whole job, as a node failure would
    proc.communicate()
    assert json.loads((out / "ckpt" / "state.json").read_text())["tag"] == "save1"
    resumed = launch_with_faults(args + ["--resume"], tmp_path, "", port=29555)
    log = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, log[-3000:]
    assert "ignoring incomplete checkpoint(s) save2: resuming from save1 (step 1)" in log
    assert [m["step"] for m in run.read_jsonl(out / "metrics.jsonl")] == [0, 1, 2]


@pytest.mark.slow
def test_resume_under_another_zero_stage_says_what_changed(tiny_dir, rise_world, tmp_path):
    out = tmp_path / "run"
    args = ["--model", tiny_dir, "--data", rise_world / "det" / "train.jsonl", "--out", out, "--max-steps", "1",
            "--harvest-batch-size", "6", *SMALL, "--max-new-tokens", "4", "--rec-max-new-tokens", "4"]
    ok(launch("rise_cot.py", args + ["--deepspeed", ROOT / "ds_zero2.json"], tmp_path))
    proc = launch("rise_cot.py", args + ["--deepspeed", ROOT / "ds_zero3.json", "--resume"], tmp_path)
    assert proc.returncode != 0
    assert "saved under ZeRO-2 and this run uses ZeRO-3: resume with --deepspeed ds_zero2.json" in proc.stderr


@pytest.mark.slow
def test_the_default_data_is_written_once_per_machine_and_never_torn(tmp_path, monkeypatch):
    """run.shapes_world: on a machine only LOCAL_RANK 0 writes the cache's shapes world (the other ranks
    wait at the barrier); two machines sharing the cache both write, each into a folder of its own renamed
    into place, so the result is the one a single writer makes, byte for byte."""
    monkeypatch.setattr(vlm, "CACHE", tmp_path / "one")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not run.shapes_world(0, n_train=2, n_test=1).exists()          # rank 1 of a machine writes nothing
    monkeypatch.setenv("LOCAL_RANK", "0")
    single = run.shapes_world(0, n_train=2, n_test=1)
    code = ("import sys, run, vlm\nfrom pathlib import Path\nvlm.CACHE = Path(sys.argv[1])\n"
            "print(run.shapes_world(0, n_train=2, n_test=1))")
    env = dict(os.environ, PYTHONPATH=str(ROOT), LOCAL_RANK="0")
    nodes = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "shared")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    paths = {n.communicate(timeout=300)[0].strip() for n in nodes}
    assert all(n.returncode == 0 for n in nodes) and len(paths) == 1
    shared = Path(paths.pop())
    assert _hashes(shared) == _hashes(single)
    assert [p.name for p in (tmp_path / "shared").iterdir()] == [shared.name]      # no temporary folder left


@pytest.mark.slow
def test_rise_r1_kill_in_sft_and_resume_logs_every_record_once(tiny_dir, rise_world, tmp_path):
    """kill -9 in the SFT after its step 2 was logged (checkpoint at step 2), then --resume: the
    D_high record, every SFT step and every GRPO step exactly once, in order."""
    train = rise_world / "soft_cls" / "train.jsonl"
    cots = tmp_path / "cots.jsonl"
    cots.write_text("".join(json.dumps({"id": json.loads(line)["id"], "cot": "A large warm round shape.",
                                        "reward": 1.0}) + "\n" for line in train.read_text().splitlines()))
    out = tmp_path / "run"
    args = ["--model", tiny_dir, "--data", train, "--cots", cots, "--tau", "0", "--out", out, "--sft-steps", "6",
            "--max-steps", "2", "--save-every", "2", "--preset", "tiny", "-G", "2", "--batch-size", "1",
            "--max-new-tokens", "8"]
    kill_when("rise_r1.py", args, tmp_path, lambda: lines(out / "metrics.jsonl") >= 4)   # D_high + SFT 0, 1, 2
    assert lines(out / "metrics.jsonl") < 1 + 6 + 2
    ok(launch("rise_r1.py", args + ["--resume"], tmp_path))
    got = [(m["stage"], m["step"], "loss" in m) for m in run.read_jsonl(out / "metrics.jsonl")]
    assert got == [("sft", 0, False)] + [("sft", k, True) for k in range(6)] + [("grpo", k, True) for k in range(2)]


@pytest.mark.slow
def test_one_rank_train_then_eval(tiny_dir, clip_dir, cache, tmp_path):
    """python seg_rise.py: one GRPO step from a random tiny model, then --eval with the box executor
    (a random model writes garbage: every answer unparsable, nothing crashes)."""
    env = env_for(cache)
    out = tmp_path / "run"
    common = ["--model", str(tiny_dir), "--clip-ckpt", str(clip_dir), "--out", str(out), "-G", "2",
              "--max-new-tokens", "8"]
    proc = subprocess.run([sys.executable, str(ROOT / "seg_rise.py"), *common, "--max-steps", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and {"step", "loss", "reward", "reward_sem", "reward_think", "reward_seg"} <= rows[0].keys()
    assert json.loads((out / "args.json").read_text())["reward"] == "sem,think,seg"
    assert (out / "final" / "config.json").exists()
    vis, evaluation = tmp_path / "vis", tmp_path / "eval"
    proc = subprocess.run([sys.executable, str(ROOT / "seg_rise.py"), *common[:2], *common[4:], "--out", str(evaluation),
                           "--model", str(out / "final"), "--eval", "--executor", "box", "--n-test", "3",
                           "--save-vis", str(vis)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((evaluation / "eval.json").read_text())
    assert {"giou", "ciou", "box_iou", "unparsable"} <= result.keys() and result["n"] == 3
    assert 0 <= result["unparsable"] <= 3 and 0.0 <= result["giou"] <= 1.0
    assert len((evaluation / "predictions.jsonl").read_text().splitlines()) == 3
    assert len(list(vis.glob("*.png"))) == 3


@pytest.mark.slow
def test_one_overlong_sample_never_aborts_training_or_evaluation(tiny, tiny_dir, clip_dir, seg_world, cache,
                                                                 tmp_path):
    """A 1024x768 photo whose prompt exceeds --max-prompt-len is skipped, counted (eval.json skipped_samples, a
    predictions row saying why, OUT/skipped.jsonl) and the three other samples are scored; training skips it too.
    Ours too: an image the processor refuses (aspect ratio 300) in the same manifest."""
    _, processor = tiny
    records = [json.loads(line) for line in (seg_world / "seg" / "test.jsonl").read_text().splitlines()][:3]
    for r in records:
        r["image"], r["mask"] = str(seg_world / "seg" / r["image"]), str(seg_world / "seg" / r["mask"])
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (768, 1024, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    Image.new("RGB", (900, 3), "white").save(tmp_path / "strip.png")
    photo = {"id": "photo", "image": "photo.jpg", "instruction": records[0]["instruction"]}
    strip = {"id": "strip", "image": "strip.png", "instruction": records[0]["instruction"]}
    manifest = _write(tmp_path, records[:2] + [photo, strip] + records[2:])

    def length(image):
        conv = [vlm.user_turn(S.prompt_text(photo["instruction"], True, True, vlm.box_frame("qwen2_vl", image.size,
                                                                                          processor)))]
        return int(vlm.chat_inputs(processor, [conv], [[image]])["attention_mask"].sum())

    limit = max(length(data.open_image(seg_world / "seg" / r["image"])) for r in records)
    assert length(data.open_image(tmp_path / "photo.jpg")) > limit           # the photo alone is over the limit
    common = ["--clip-ckpt", clip_dir, "-G", "2", "--max-new-tokens", "8", "--max-prompt-len", limit]
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "seg_rise.py"), "--model", tiny_dir, "--data", manifest,
                           "--out", out, "--max-steps", "2", "--batch-size", "2", *map(str, common)],
                          cwd=tmp_path, env=env_for(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [m["step"] for m in run.read_jsonl(out / "metrics.jsonl")] == [0, 1]
    skipped = run.read_jsonl(out / "skipped.jsonl")
    assert [(r["id"], r["split"]) for r in skipped] == [("photo", "train"), ("strip", "train")]
    assert "max_prompt_len" in skipped[0]["reason"] and "aspect ratio" in skipped[1]["reason"]
    evaluation = tmp_path / "eval"
    proc = subprocess.run([sys.executable, str(ROOT / "seg_rise.py"), "--eval", "--model", tiny_dir, "--test", manifest,
                           "--out", evaluation, "--executor", "box", *map(str, common)],
                          cwd=tmp_path, env=env_for(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((evaluation / "eval.json").read_text())
    assert result["n"] == 3 and result["skipped_samples"] == 2 and result["giou"] is not None
    rows = {r["id"]: r for r in run.read_jsonl(evaluation / "predictions.jsonl")}
    assert sorted(rows) == sorted([r["id"] for r in records] + ["photo", "strip"])
    assert "max_prompt_len" in rows["photo"]["skipped"] and "aspect ratio" in rows["strip"]["skipped"]


@pytest.mark.slow
def test_seg_rise_kill_and_resume_logs_every_step_once(tiny_dir, clip_dir, cache, tmp_path):
    """--save-every 2, kill -9 after step 2 was logged, --resume: the log is cut back to the checkpoint (steps 0,
    1) and every step appears once."""
    out = tmp_path / "run"
    args = ["--model", tiny_dir, "--clip-ckpt", clip_dir, "--out", out, "-G", "2", "--max-new-tokens", "8",
            "--max-steps", "6", "--save-every", "2"]
    kill_when("seg_rise.py", args, tmp_path, lambda: lines(out / "metrics.jsonl") >= 3, env=env_for(cache))
    before = run.read_jsonl(out / "metrics.jsonl")
    assert 3 <= len(before) < 6 and (out / "ckpt" / "state.json").exists()
    proc = subprocess.run([sys.executable, str(ROOT / "seg_rise.py"), *map(str, args), "--resume"], cwd=tmp_path,
                          env=env_for(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = run.read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in after] == [0, 1, 2, 3, 4, 5]         # nothing lost, nothing twice
    assert after[:2] == before[:2]                                   # the records before the checkpoint kept


@pytest.mark.slow
def test_seg_rise_two_rank_zero3_step_on_cpu(tiny_dir, clip_dir, cache, tmp_path):
    """deepspeed --num_gpus 2 seg_rise.py on CPU (gloo), ZeRO-3, with the reference model: two steps
    (the second is the one a stale ZeRO-3 fetch schedule broke)."""
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", "29561", str(ROOT / "seg_rise.py"),
           "--model", str(tiny_dir), "--clip-ckpt", str(clip_dir), "--out", str(tmp_path / "run"),
           "--max-steps", "2", "-G", "2", "--max-new-tokens", "8", "--deepspeed", str(ROOT / "ds_zero3.json")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env_for(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and all(math.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "run" / "final" / "config.json").exists()


@pytest.mark.slow
def test_each_stage_applies_its_own_partial_window_with_a_fresh_optimizer(tiny_dir, shapes, tmp_path):
    # Two VisRL SFT stages on one DeepSpeed engine (ZeRO-2), grad accumulation 2, one micro-step each.
    # Each stage must train as a separate run would: stage 1 = one AdamW step (lr 1e-3) on its loss;
    # stage 2 = one step of a NEW AdamW (lr 3e-4) on its own loss from stage 1's weights (a window left
    # open would apply both gradients in stage 2). Expected values: plain torch AdamW +
    # clip_grad_norm_(1.0) on the same examples.
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", STAGES_SCRIPT, str(tiny_dir), str(shapes), str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    ok(proc)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"updates": 2}
    model, processor = vlm.load_model(tiny_dir)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recs = data.read_manifest(shapes / "vqa" / "train.jsonl", "vqa")[0]
    for k, lr in enumerate((1e-3, 3e-4)):
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
        (conv, ims), = visrl.sft_examples(recs[k], data.open_image(recs[k]["image_path"]))
        vlm.sft_loss(model, processor, [conv], [ims]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        clear = {n: p.grad.abs() > 1e-7 for n, p in model.named_parameters()}   # Adam's first step divides
        opt.step()                                        # g by |g| + 1e-8: where g ~ 0, it is rounding noise
        opt.zero_grad()
        got = torch.load(tmp_path / f"stage{k}.pt")
        for name, p in model.named_parameters():
            torch.testing.assert_close(got[name][clear[name]], p.detach()[clear[name]], atol=lr * 1e-2, rtol=0,
                                       msg=f"stage {k}: {name}")
            assert (got[name] - p.detach()).abs().max() <= lr        # no step exceeds lr (Adam's bound)
    # Adam's first step moves every weight with a gradient by ~lr: stage 1 really trained
    assert (got["lm_head.weight"] - before["lm_head.weight"]).abs().max() > 1e-3


@pytest.mark.slow
def test_two_rank_iteration_on_cpu(visrl_tiny, shapes, tmp_path):
    """`deepspeed --num_gpus 2 visrl.py`: SFT, stage 1 + 2 on given pairs, then a generation round;
    every question is generated exactly once across the two ranks and everything is written."""
    path, _, _ = visrl_tiny
    recs = data.read_manifest(shapes / "vqa" / "train.jsonl", "vqa")[0]
    pairs_file = tmp_path / "given_pairs.jsonl"
    with open(pairs_file, "w") as f:
        for i, rec in enumerate(recs[:4]):
            p = make_pair(rec["image_path"], visrl.norm_box(rec["box"], 112, 112), [0.0, 0.0, 0.1, 0.1])
            f.write(json.dumps(dict(p, id=rec["id"], question=rec["question"])) + "\n")
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), RISE_CACHE=str(vlm.CACHE), OMP_NUM_THREADS="1")
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", "29571", str(ROOT / "visrl.py"), "--model", str(path),
           "--data", str(shapes / "vqa" / "train.jsonl"), "--test", str(shapes / "vqa" / "test.jsonl"),
           "--out", str(out), "--preset", "tiny", "--iters", "2", "--pairs", str(pairs_file),
           "--sft-fraction", "0.34", "--attempts", "1", "--max-new-tokens", "8", "--batch-size", "1",
           "--sft-batch-size", "1", "--dpo-epochs", "1", "--lr", "1e-3", "--stage-eval-n", "2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stages = {m["stage"] for m in metrics}
    assert {"sft", "iter1/stage1", "iter1/stage2", "iter2/generate"} <= stages
    dpo_steps = [m for m in metrics if m["stage"].startswith("iter1/stage")]
    assert len(dpo_steps) == 2 * 2 and all(math.isfinite(m["loss"]) for m in dpo_steps)  # 4 pairs / (1 x 2 ranks)
    assert all("answer_loss" in m for m in dpo_steps if m["stage"] == "iter1/stage2")
    generated = [json.loads(line)["id"] for line in (out / "iter2" / "candidates.jsonl").read_text().splitlines()]
    sft_ids = {r["id"] for r in recs} - set(generated)
    assert len(generated) == len(set(generated)) == 4 and len(sft_ids) == 2   # each RL question once
    assert (out / "iter2" / "pairs.jsonl").exists() and (out / "iter2" / "stats.json").exists()
    assert len((out / "iter1" / "pairs.jsonl").read_text().splitlines()) == 4
    for name in ("sft", "iter1/stage1", "iter1/stage2", "iter2/stage2", "final"):
        assert (out / name / "config.json").exists(), name
    result = json.loads((out / "eval.json").read_text())
    assert result["n"] == 4 and result["n_with_box"] == 4 and 0 <= result["answer_accuracy"] <= 1
    assert len(run.read_jsonl(out / "stages.jsonl")) == 1 + 5       # base, sft, 2 x (stage1, stage2)


@pytest.mark.slow
def test_visrl_kill_in_stage2_and_resume_logs_every_record_once(visrl_tiny, shapes, tmp_path):
    """kill -9 in stage 2 (stage 1 finished), then --resume: the pairs come from disk (not logged
    again), stage 2 restarts from the stage-1 model, and every metrics record appears once, in order."""
    path, _, _ = visrl_tiny
    recs = data.read_manifest(shapes / "vqa" / "train.jsonl", "vqa")[0]
    pairs_file = tmp_path / "given_pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(dict(make_pair(r["image_path"], visrl.norm_box(r["box"], 112, 112),
                                                            [0.0, 0.0, 0.1, 0.1]), id=r["id"], question=r["question"]))
                                  + "\n" for r in recs[:4]))
    out = tmp_path / "run"
    args = ["--model", path, "--data", shapes / "vqa" / "train.jsonl", "--out", out, "--preset", "tiny",
            "--iters", "1", "--pairs", pairs_file, "--sft-fraction", "0.34", "--attempts", "1",
            "--max-new-tokens", "8", "--batch-size", "1", "--sft-batch-size", "1", "--dpo-epochs", "1",
            "--lr", "1e-3", "--stage-eval-n", "0"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), RISE_CACHE=str(vlm.CACHE), OMP_NUM_THREADS="1")
    metrics = out / "metrics.jsonl"
    kill_when("visrl.py", args, tmp_path, lambda: metrics.exists() and "iter1/stage2" in metrics.read_text(), env)
    assert "iter1/stage1" in json.loads((out / "ckpt" / "state.json").read_text())["done"]
    proc = subprocess.run([sys.executable, str(ROOT / "visrl.py"), *map(str, args), "--resume"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = [(m["stage"], m["step"]) for m in run.read_jsonl(metrics)]
    # 2 SFT records (0.34 of the 6 boxed ones), batch 1: steps 0-1; 4 pairs, batch 1: 4 steps per stage
    assert got == ([("sft", 0), ("sft", 1), ("iter1/generate", 2)] + [("iter1/stage1", k) for k in range(2, 6)]
                   + [("iter1/stage2", k) for k in range(6, 10)])
    assert (out / "final" / "config.json").exists()


@pytest.mark.slow
def test_help_shows_both_presets_and_config_reruns_a_run(tiny_dir, rise_world, tmp_path, capsys):
    """--help states each preset-controlled default (paper and tiny); --config OUT/args.json takes a finished
    run's options as the defaults, so the run repeats exactly (same rewards and loss at every step)."""
    with pytest.raises(SystemExit):
        rise_cot.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "(paper: 2e-06, tiny: 0.0002)" in shown and "(paper: 200, tiny: 40)" in shown
    out = tmp_path / "run"
    args = ["--model", tiny_dir, "--data", rise_world / "det" / "train.jsonl", "--stages", "grpo", "--max-steps", "2",
            "--out", out, "--preset", "tiny", "-G", "2", "--batch-size", "1", "--max-new-tokens", "6"]
    ok(launch("rise_r1.py", args, tmp_path))
    ok(launch("rise_r1.py", ["--config", out / "args.json", "--out", tmp_path / "again"], tmp_path))
    first, again = (run.read_jsonl(d / "metrics.jsonl") for d in (out, tmp_path / "again"))
    assert [(m["reward"], m["loss"]) for m in again] == [(m["reward"], m["loss"]) for m in first] and len(first) == 2


@pytest.mark.slow
def test_tracker_schedule_and_completions(tiny_dir, rise_world, tmp_path):
    """--report-to tensorboard writes metrics.jsonl's scalars (readable by tensorboard's own reader) and, every
    --log-completions-every steps, a table of sampled completions; OUT/completions.jsonl keeps every one.
    --lr-scheduler cosine --warmup-ratio 0.5: each update's lr is transformers' get_cosine_schedule_with_warmup."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import get_cosine_schedule_with_warmup
    out = tmp_path / "run"
    ok(launch("rise_r1.py", ["--model", tiny_dir, "--data", rise_world / "det" / "train.jsonl", "--stages", "grpo",
                             "--max-steps", "4", "--lr", "1e-3", "--lr-scheduler", "cosine", "--warmup-ratio", "0.5",
                             "--report-to", "tensorboard", "--log-completions-every", "2", "--out", out,
                             "--preset", "tiny", "-G", "2", "--batch-size", "1", "--max-new-tokens", "4"], tmp_path))
    metrics = run.read_jsonl(out / "metrics.jsonl")
    reference = get_cosine_schedule_with_warmup(torch.optim.SGD([torch.zeros(1)], lr=1e-3), 2, 4)
    expected = []
    for _ in range(4):
        expected.append(reference.get_last_lr()[0])
        reference.optimizer.step(), reference.step()
    assert [m["lr"] for m in metrics] == approx(expected) and expected[0] == 0.0 and max(expected) == approx(1e-3)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    for key in ("reward", "loss", "lr", "kl"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(m["step"], approx(m[key])) for m in metrics]
    tables = events.Tensors("completions/text_summary")
    assert [e.step for e in tables] == [0, 2] and b"| id | completion | reward |" in tables[0].tensor_proto.string_val[0]
    completions = run.read_jsonl(out / "completions.jsonl")
    assert [c["step"] for c in completions] == [0, 0, 1, 1, 2, 2, 3, 3] and {"id", "completion", "reward"} <= completions[0].keys()
    assert [sum(c["reward"] for c in completions if c["step"] == k) / 2 for k in range(4)] == approx([m["reward"] for m in metrics])


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_lora_trains_only_adapters_saves_and_resumes_on_two_ranks(tiny_dir, rise_world, tmp_path, zero):
    """--lora-rank under ZeRO-2 and ZeRO-3 on two CPU ranks (RISE-R1's GRPO; the KL reference is the policy with
    its adapters off): after a --resume the run ends with each step logged once; OUT/final holds the merged
    model (loadable by --model) and OUT/final/adapter the adapters; every weight outside the adapted layers is
    the initial model's, bit for bit, and the adapted ones moved."""
    out = tmp_path / "run"                                     # the shipped base: rewards that differ in a group
    args = ["--model", SHIPPED_BASE, "--data", rise_world / "det" / "train.jsonl", "--stages", "grpo", "--lr", "1e-2",
            "--lora-rank", "4", "--save-every", "1", "--out", out, "--deepspeed", ROOT / f"ds_zero{zero}.json",
            "--preset", "tiny", "-G", "4", "--batch-size", "1", "--max-new-tokens", "64"]
    ok(launch("rise_r1.py", args + ["--max-steps", "1"], tmp_path, ranks=2, port=29560 + zero))
    ok(launch("rise_r1.py", args + ["--max-steps", "2", "--resume"], tmp_path, ranks=2, port=29570 + zero))
    assert [m["step"] for m in run.read_jsonl(out / "metrics.jsonl")] == [0, 1]
    assert (out / "final" / "adapter" / "adapter_config.json").exists()
    before, after = vlm.load_model(SHIPPED_BASE)[0].state_dict(), vlm.load_model(out / "final")[0].state_dict()
    adapted = {k for k in before if k.endswith(".weight") and re.search(vlm.LORA_TARGETS, k.rsplit(".", 1)[0])}
    assert adapted and all(torch.equal(before[k], after[k]) for k in before if k not in adapted)
    assert all(not torch.equal(before[k], after[k]) for k in adapted)


@pytest.mark.slow
def test_bench_ours_json(capsys, tiny_dir):
    out = run_bench(capsys, tiny_dir, "--skip-trl")
    assert all(out[a]["trl_sps"] is None and out[a]["ratio_vs_trl"] is None for a in out)


@pytest.mark.slow
def test_bench_scaling_json(capsys, tiny_dir):
    """`bench.py --scaling`: a row per (image tokens, G) for GRPO and per image tokens for DPO, keyed so in the
    JSON line, each measured on images that really give the processor that many image tokens."""
    threads = torch.get_num_threads()
    try:
        table = bench.main(["--model", str(tiny_dir), "--scaling", "--tokens", "16,64", "--groups", "2", "--reps", "1",
                            "--warmup", "0", "--max-new-tokens", "4", "--no-grad-ckpt", "--skip-trl", "--json"])
    finally:
        torch.set_num_threads(threads)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == table and set(out["grpo"]) == {"16x2", "64x2"} and set(out["dpo"]) == {"16", "64"}
    for algo, rows in out.items():
        for key, row in rows.items():
            assert row["image_tokens"] == int(key.split("x")[0]) and row["image_side"] in (112, 224)
            assert row["ours_sps"] > 0 and row["trl_sps"] is None and row["ratio_vs_trl"] is None


@pytest.mark.slow
def test_bench_trl_json(capsys, tiny_dir):
    pytest.importorskip("trl")
    out = run_bench(capsys, tiny_dir)
    for algo in ("grpo", "dpo"):
        assert out[algo]["trl_sps"] > 0 and out[algo]["trl_peak_mb"] > 0
        assert out[algo]["ratio_vs_trl"] == pytest.approx(out[algo]["ours_sps"] / out[algo]["trl_sps"], rel=1e-2)


@pytest.mark.slow
def test_a_table_row_runs_end_to_end_and_a_failed_job_is_reported(cache, tmp_path):
    out = tmp_path / "seg"
    summary = tables.main(["seg", "--seeds", "0", "--jobs", "1", "--rows", "tiny base", "--out", str(out),
                           "--script-args", "--n-test 3", "--script-args", "rise_r1.py --sft-steps 7"])
    # the untargeted flag reaches seg_rise.py, the one meant for rise_r1.py alone does not
    assert "--n-test 3" in (out / "seed0" / "seed0_tiny_base.log").read_text()
    assert "--sft-steps" not in (out / "seed0" / "seed0_tiny_base.log").read_text()
    eval_json = json.loads((out / "seed0" / "tiny_base" / "eval" / "eval.json").read_text())
    boxes = {tuple(p["box"]) for p in run.read_jsonl(out / "seed0" / "tiny_base" / "eval" / "predictions.jsonl")
             if p.get("box")}
    row = summary["Seg-RISE (box executor)"]["tiny base"]
    assert eval_json["n"] == 3 and row["box IoU"] == [approx(eval_json["box_iou"]), 0.0, 1]
    assert row["distinct test boxes"] == [len(boxes), 0.0, 1]
    assert "| tiny base |" in (out / "table.md").read_text() and (out / "table.png").stat().st_size > 0
    assert list(summary["Seg-RISE (box executor)"]) == ["tiny base"]        # the rows not run are absent
    # a finished job is not run again
    assert tables.run_job("seed0 tiny base", [["no_such_script.py"]], out / "seed0", {}, 1) == ("seed0 tiny base", 0.0,
                                                                                                 None)
    name, _, error = tables.run_job("seed0 broken", [["seg_rise.py", "--no-such-flag"]], out / "seed0", {}, 1)
    assert error.startswith("failed: seg_rise.py --no-such-flag") and not (out / "seed0" / "DONE_seed0_broken").exists()
    assert "unrecognized arguments: --no-such-flag" in (out / "seed0" / "seed0_broken.log").read_text()
    with pytest.raises(SystemExit):
        tables.main(["seg", "--rows", "no such row", "--out", str(out)])
