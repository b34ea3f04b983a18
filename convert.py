"""convert.py -- the public datasets, from the layouts they are distributed in to manifests.

Each converter writes the JSONL manifests that data.read_manifest() reads (see data.py), so a
pipeline runs on the real dataset with --data OUT/<split>.jsonl:

  emotion6   Emotion6 (soft emotion labels)            -> RISE classification
  reasonseg  LISA / ReasonSeg (labelme polygons)        -> RISE detection, Seg-RISE
  coco       COCO instances                             -> COCO-Sub, RISE detection
  imagenet   ImageNet class folders                     -> ImageNet-Sub, RISE classification
  refcoco    RefCOCO / RefCOCO+ / RefCOCOg              -> Seg-RISE
  viscot     Visual CoT (VisCoT) JSON / JSONL           -> VisRL

    python convert.py reasonseg --src ReasonSeg/val --out data/reasonseg-val [--skip-bad]
    python convert.py --help                      # every dataset's options

COCO polygons and RLE are decoded by pycocotools, the reference implementation. Images are
measured as data.open_image() shows them (EXIF orientation applied), the orientation the
annotation tools display; an annotation whose stated image size disagrees is a bad record.
"""
import argparse
import json
import math
import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as coco_api

from data import (EMOTION6_CLASSES, ManifestError, UnreadableImage, box_problem, mask_box,
                  open_image, write_jsonl)
from data import _is_number, _nonempty_str, _rng      # the manifest checks and seeded streams


# ============================================================================ 1. shared helpers
# From the layouts the datasets are distributed in to data.py's manifests. Images are
# referenced where they lie (paths relative to the output manifest's folder), never copied;
# only masks are written. A bad input record raises ManifestError naming the input file and
# the line or entry; with skip_bad=True it is skipped, reported on stderr and counted. Nothing
# is dropped silently. Random choices use _rng(seed, dataset, class or split), so the same
# seed gives byte-identical files and one class's sample does not depend on the others.
# Every converter returns ({name: manifest path}, number of skipped records).
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
    """(width, height) of a readable image as displayed (data.open_image: EXIF orientation
    applied, the frame annotation tools draw in); raises _Bad saying what is wrong otherwise."""
    path = Path(path)
    if not path.is_file():
        raise _Bad(f"image file not found: {path}", "image")
    try:
        return open_image(path).size    # a full decode: a truncated file is caught here too
    except UnreadableImage as e:        # "unreadable image <path>: <PIL's error>"
        raise _Bad(str(e), "image") from None


def _check_size(stated, size, image, source, where=None):
    """Raise _Bad when an annotation's stated (width, height) is not the displayed image's:
    its coordinates would land elsewhere in the image the pipelines see."""
    if tuple(stated) != tuple(size):
        raise _Bad(f"{source} says the image is {stated[0]}x{stated[1]}, but {image} is "
                   f"{size[0]}x{size[1]} as displayed (EXIF orientation applied): the annotation "
                   "was made on another image or orientation", where)


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


def _xywh_box(bbox):
    """COCO [x, y, w, h] -> [x1, y1, x2, y2], to COCO's own 2 decimals; raises _Bad."""
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(map(_is_number, bbox)):
        raise _Bad(f"bbox {bbox!r} is not 4 numbers")
    x, y, w, h = bbox
    box = [round(x, 2), round(y, 2), round(x + w, 2), round(y + h, 2)]
    if box_problem(box):
        raise _Bad(f"bbox {bbox!r}: {box_problem(box)}")
    return box


# ============================================================================ 2. converters
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
def lisa_regions(shapes, width, height):
    """The pixels of a LISA annotation, by LISA's own rule (get_mask_from_json): shapes labelled "flag"
    are dropped; the others are drawn largest first, so a smaller shape drawn later wins where they
    overlap; a label containing "ignore" marks pixels to leave out of the evaluation (LISA writes 255
    there, which its intersectionAndUnionGPU removes from both the intersection and the union), any
    other label marks target pixels. As LISA's cv2.fillPoly on int32 points, the points are truncated
    to integers and the polygon is filled with its boundary (PIL does too).
    Returns (mask, ignore, regions): mask = LISA's target mask, ignore = its ignored pixels (HxW bool
    each); regions = [(i, region_mask)], one per target shape in file order (i: its index in shapes),
    each that polygon's pixels less those an ignore shape drawn after it takes (another target drawn
    over it takes nothing: both are targets). A region can be empty. Raises _Bad naming the shape for
    a malformed one."""
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
    layers.sort(key=lambda t: t[:2])                      # LISA's drawing order
    canvas = np.zeros((height, width), np.uint8)          # 0 background, 1 target, 2 ignore
    for _, _, ignore, layer in layers:
        canvas[layer] = 2 if ignore else 1
    regions = []
    for k, (_, i, ignore, layer) in enumerate(layers):
        if not ignore:
            later = [lay for _, _, ign, lay in layers[k + 1:] if ign]
            regions.append((i, layer & ~np.logical_or.reduce(later) if later else layer))
    return canvas == 1, canvas == 2, sorted(regions, key=lambda r: r[0])


def lisa_mask(shapes, width, height):
    """The target mask of a LISA annotation (lisa_regions' first value)."""
    return lisa_regions(shapes, width, height)[0]


def _read_targets(path):
    """A target-description file -> {det record id: (description or None, line)}: JSON lines
    {"id": ..., "target": "..." or null} (the needs_target.jsonl convert_reasonseg writes, filled
    in), or one JSON object {id: description}. Raises ManifestError naming the file and line."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and "id" not in whole:
        items = [(1, {"id": k, "target": v}) for k, v in whole.items()]
    else:
        items = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ManifestError(path, lineno,
                                        f"invalid JSON ({e.msg}, column {e.colno})") from None
    targets = {}
    for lineno, item in items:
        target = item.get("target") if isinstance(item, dict) else None
        if not isinstance(item, dict) or not _nonempty_str(item.get("id")) or not (
                target is None or _nonempty_str(target)):
            raise ManifestError(path, lineno,
                                'expected {"id": "<det record id>", "target": "<description>"}')
        targets[item["id"]] = (target.strip() if target else None, lineno)
    return targets


def convert_reasonseg(src, out, targets=None, queries="all", skip_bad=False):
    """One LISA / ReasonSeg split folder (<name>.jpg + <name>.json, the JSON holding "text":
    [queries], "is_sentence" and labelme "shapes") -> OUT/det.jsonl, OUT/seg.jsonl, OUT/masks/.

    det.jsonl, RISE's LISA detection (arXiv 2508.13229, "Datasets"): "(1) extracting a single target
    per question, (2) converting masks to bounding boxes, and (3) splitting images with multiple
    question-specific targets into single-target samples". One record per (query, target shape), id
    "<name>-<query k>-<target shape j>", boxes = [the tight box of that shape's region]
    (lisa_regions), "question" = the query. queries="first" takes each image's first query only (the
    paper's 239 training samples are as many as ReasonSeg's training images). "target" is the
    target's description, never the question: from `targets` (a file of {"id", "target"}, see
    _read_targets) when it names the record, else the query itself when the annotation's queries are
    phrases ("is_sentence": false, e.g. "the bowl"). The paper's descriptions of the questions are
    not released, so a question without one is written to OUT/needs_target.jsonl ({"id", "image",
    "question", "boxes", "target": null}; fill in "target" and pass the file as `targets`), not to
    det.jsonl, and counted in the returned paths ("needs_target").
    seg.jsonl (Seg-RISE): one record per query, id "<name>-<k>", instruction = the query, with the
    mask PNG masks/<name>.png (0/255) and its box; where the annotation has "ignore" shapes, also
    "ignore_mask": masks/ignore/<name>.png (0/255), the pixels LISA's evaluation leaves out of both
    the intersection and the union (rewards.mask_counts). Run once per split folder (train, val, test).
    Polygons are drawn on the image as displayed (EXIF orientation applied, as labelme shows it); a
    stated imageWidth / imageHeight that is not that size is a bad record (file:line).
    """
    if queries not in ("all", "first"):
        raise ValueError(f"queries must be 'all' or 'first', got {queries!r}")
    src, out, skip = Path(src), Path(out), _Skips(skip_bad)
    described = _read_targets(targets) if targets else {}
    det, seg, todo = [], [], []
    known = set()                 # every (query, target) id of the folder, whatever `queries`
    for js in sorted(src.glob("*.json")):
        name = js.stem
        try:
            try:
                text = js.read_text(encoding="utf-8")
                ann = json.loads(text)
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
            size = _image_size(image)
            if "imageWidth" in ann or "imageHeight" in ann:     # labelme states the size it drew on
                key = '"imageWidth"' if '"imageWidth"' in text else '"imageHeight"'
                _check_size((ann.get("imageWidth"), ann.get("imageHeight")), size, image,
                            "imageWidth/imageHeight", text[:text.find(key)].count("\n") + 1)
            mask, ignore, regions = lisa_regions(ann["shapes"], *size)
            box = mask_box(mask)
            if box is None:
                raise _Bad("no target pixels (every shape is ignore/flag or off the image)",
                           "shapes")
        except _Bad as e:
            skip(js, e.where or "json", e.reason)
            continue
        _save_mask(mask, out / "masks" / f"{name}.png")
        extra = {"is_sentence": ann["is_sentence"]} if "is_sentence" in ann else {}
        phrases = ann.get("is_sentence") is False
        known.update(f"{name}-{k}-{j}" for k in range(len(texts)) for j in range(len(regions)))
        for k, query in enumerate(texts[:1] if queries == "first" else texts):
            for j, (i, region) in enumerate(regions):
                region_box = mask_box(region)
                if region_box is None:           # wholly covered by ignore shapes: no sample
                    print(f"note: {js}: shapes[{i}] has no target pixels left; no detection sample",
                          file=sys.stderr)
                    continue
                rec = {"id": f"{name}-{k}-{j}", "image": _rel(image, out)}
                target = described.get(rec["id"], (None,))[0] or (query.strip() if phrases
                                                                   else None)
                fields = {"question": query.strip(), "boxes": [region_box], **extra}
                if target:
                    det.append({**rec, "target": target, **fields})
                else:
                    todo.append({**rec, **fields, "target": None})
        if ignore.any():
            _save_mask(ignore, out / "masks" / "ignore" / f"{name}.png")
        left_out = {"ignore_mask": f"masks/ignore/{name}.png"} if ignore.any() else {}
        seg += [{"id": f"{name}-{k}", "image": _rel(image, out), "instruction": t.strip(),
                 "mask": f"masks/{name}.png", **left_out, "box": box, **extra} for k, t in enumerate(texts)]
    unknown = sorted(set(described) - known, key=lambda i: described[i][1])
    if unknown:
        raise ManifestError(targets, described[unknown[0]][1],
                            f"{len(unknown)} id(s) name no LISA question of {src}: "
                            + ", ".join(unknown[:5]))
    paths = {"det": out / "det.jsonl", "seg": out / "seg.jsonl"}
    write_jsonl(paths["det"], det)
    write_jsonl(paths["seg"], seg)
    if todo:
        paths["needs_target"] = out / "needs_target.jsonl"
        write_jsonl(paths["needs_target"], todo)
        print(f"note: {len(todo)} LISA question(s) have no target description (RISE detects the "
              f"target a question asks for, described): they are in {paths['needs_target']}, not "
              "in det.jsonl; fill in their \"target\" and pass the file with --targets",
              file=sys.stderr)
    elif (out / "needs_target.jsonl").exists():
        (out / "needs_target.jsonl").unlink()
    return paths, skip.count


# --------------------------------------------------------------------- COCO masks (pycocotools)
def coco_mask(segmentation, height, width):
    """HxW bool mask of a COCO annotation's "segmentation": polygons [[x1, y1, x2, y2, ...], ...]
    (their union) or RLE {"size": [h, w], "counts": runs or compressed string}, decoded by
    pycocotools (frPyObjects / merge / decode). Raises _Bad for a malformed one: pycocotools
    itself does not check that the runs cover the image."""
    if isinstance(segmentation, dict):
        if list(segmentation.get("size", [])) != [height, width]:
            raise _Bad(f"RLE size {segmentation.get('size')} is not the image's {[height, width]}")
        counts = segmentation.get("counts")
        if isinstance(counts, list):                     # uncompressed runs
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                raise _Bad("bad RLE: counts are not non-negative integers")
            if sum(counts) != height * width:
                raise _Bad(f"bad RLE: runs cover {sum(counts)} pixels, not {height}x{width}")
            rle = coco_api.frPyObjects(segmentation, height, width)
        elif isinstance(counts, (str, bytes)):           # compressed, as pycocotools writes it
            rle = {"size": [height, width],
                   "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        else:
            raise _Bad("bad RLE: counts are neither a list nor a string")
        try:
            mask = coco_api.decode(rle)
        except (ValueError, UnicodeEncodeError) as e:   # runs past the image
            raise _Bad(f"bad RLE: {e}") from None
        # Runs that stop short leave the rest of decode's buffer as it was (any bytes): the
        # object pixels must be exactly the 1-runs, whose total area() reads from the counts.
        if mask.max(initial=0) > 1 or int(mask.sum()) != int(coco_api.area(rle)):
            raise _Bad(f"bad RLE: the runs do not cover the {height}x{width} image")
        return mask.astype(bool)
    if not isinstance(segmentation, list) or not segmentation:
        raise _Bad("segmentation is neither polygons nor RLE")
    for poly in segmentation:
        if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2
                or not all(map(_is_number, poly)) or not all(map(math.isfinite, poly))):
            raise _Bad("a polygon is not a list of 3 or more x, y pairs")   # 4 numbers: a box
    rle = coco_api.merge(coco_api.frPyObjects(segmentation, height, width))
    return coco_api.decode(rle).astype(bool)


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
                    size = _image_size(image)
                    if "width" in images[im] or "height" in images[im]:
                        _check_size((images[im].get("width"), images[im].get("height")), size,
                                    image, f"{inst.name} width/height")
                    checked[image] = None
                except _Bad as e:
                    checked[image] = e.reason
            if checked[image]:
                skip(inst, f"image id {im}", checked[image])
                continue
            records.append({"id": f"coco-{im}-{c}", "image": _rel(image, out),
                            "target": categories[c], "boxes": boxes[im, c], "category_id": c,
                            "multi": True})
        paths[name] = out / f"{name}.jsonl"
        write_jsonl(paths[name], records)
    return paths, skip.count


# ------------------------------------------------ ImageNet-Sub (RISE cls., Seg-RISE ClsOnly)
# The RISE authors' 20 ImageNet-Sub classes (HSH55/RISE, dataset_generate.py, object_classes, in
# its order: their ImageNet-1k folders sorted), keyed by that folder (wnid).
IMAGENET_SUB = {"n02708093": "analog clock", "n02769748": "backpack", "n02783161": "ballpoint",
                "n02786058": "Band Aid", "n02790996": "barbell", "n02791124": "barber chair",
                "n02823428": "beer bottle", "n02823750": "beer glass", "n02841315": "binoculars",
                "n02865351": "bolo tie", "n02870880": "bookcase", "n02877765": "bottlecap",
                "n02892767": "brassiere", "n02906734": "broom", "n02909870": "bucket",
                "n02910353": "buckle", "n02948072": "candle", "n02951585": "can opener",
                "n02971356": "carton", "n02992529": "cellular telephone"}


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


def convert_imagenet(root, out, classes=None, names=None, n_classes=None, n_train=25, n_test=10,
                     seed=0, as_seg=False, skip_bad=False):
    """ROOT/<class folder>/*.JPEG -> OUT/{train,test}.jsonl of ImageNet-Sub.

    Classes: `classes` (folder names or, with `names`, class names); else with n_classes a seeded
    choice of n_classes folders (all of them if there are no more); else the RISE authors' 20
    (IMAGENET_SUB: their folders, in their order; ValueError naming those missing). Per class, a
    seeded permutation of its image files (sorted): the first n_test to test, the next n_train to
    train. Records are one-hot over the chosen classes' names: the `names` file's, else the authors'
    name of an IMAGENET_SUB folder, else the folder name (a name shared by two chosen classes gets
    its folder in brackets). as_seg=True writes Seg-RISE "ClsOnly" records {id, image, instruction:
    class name} instead.
    """
    root, out, skip = Path(root), Path(out), _Skips(skip_bad)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    label = {**IMAGENET_SUB, **(_read_names(names) if names else {})}
    if classes:
        by_label = {label.get(f, f): f for f in folders}
        unknown = [c for c in classes if c not in folders and c not in by_label]
        if unknown:
            raise ValueError(f"{root}: no class folder for {', '.join(map(repr, unknown))}")
        chosen = [c if c in folders else by_label[c] for c in classes]
    elif n_classes is not None and len(folders) > n_classes:
        pick = _rng(seed, "imagenet", "classes").choice(len(folders), n_classes, replace=False)
        chosen = [folders[i] for i in sorted(pick)]
    elif n_classes is not None:
        chosen = folders
    else:
        missing = [f"{w} ({n})" for w, n in IMAGENET_SUB.items() if w not in folders]
        if missing:
            more = " ..." if len(missing) > 4 else ""
            raise ValueError(f"{root}: no folder for {len(missing)} of the RISE authors' 20 "
                             f"ImageNet-Sub classes: {', '.join(missing[:4])}{more} (choose "
                             "classes with --classes, or a seeded --n-classes N)")
        chosen = list(IMAGENET_SUB)
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
                _check_size((im.get("width"), im.get("height")), size, image,
                            f"{inst.name} width/height")
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


# ============================================================================ 3. command line
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
    p.add_argument("--targets", help='target descriptions of det records: JSON lines {"id", '
                                     '"target"} (OUT/needs_target.jsonl filled in)')
    p.add_argument("--det-queries", default="all", choices=["all", "first"],
                   help="det.jsonl: a sample per query (all) or per image's first query (first)")
    p = command("coco", "COCO instances -> COCO-Sub OUT/{train,test}.jsonl (detection)")
    p.add_argument("--instances", required=True, help="instances_*.json")
    p.add_argument("--images", required=True, help="the folder of its images")
    p.add_argument("--classes", help='comma-separated category names (default: all)')
    sampling(p)
    p = command("imagenet", "class-folder tree -> ImageNet-Sub OUT/{train,test}.jsonl")
    p.add_argument("--root", required=True, help="folder of class folders")
    p.add_argument("--names", help='file of "<folder> <class name>" lines (LOC_synset_mapping.txt)')
    p.add_argument("--classes", help="comma-separated folder or class names (default: the RISE "
                                     "authors' 20 ImageNet-Sub classes, convert.IMAGENET_SUB)")
    p.add_argument("--n-classes", type=int, help="a seeded choice of N class folders instead")
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
            paths, skipped = convert_reasonseg(args.src, args.out, args.targets, args.det_queries,
                                               args.skip_bad)
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


def main(argv=None):
    parser = argparse.ArgumentParser(description="Public datasets -> manifests for the RISE / "
                                                 "Seg-RISE / VisRL pipelines.")
    _add_converter_commands(parser.add_subparsers(dest="command", required=True))
    _run_converter(parser.parse_args(argv))


if __name__ == "__main__":
    main()
