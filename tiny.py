"""tiny.py -- the embedded default's models: small enough for a laptop CPU, built offline.

Why a file of its own: every pipeline runs on any Qwen2-VL / Qwen2.5-VL checkpoint through
vlm.py; this file builds the small stand-ins that let the default run work with nothing
downloaded, and no pipeline code depends on them:

  1. tokenizer and model  build_tokenizer(), tiny_model(), tiny_processor(): a ~2M-parameter
                          Qwen2VLForConditionalGeneration (the classes of Qwen2-VL-2B) with a BPE
                          tokenizer trained on shapes-world text
  2. the tiny base        look questions (probe_pools(): one shape, two, whole scenes; every shape of a
                          kind, the shape in a quadrant), pretrain_corpus()
                          (every prompt the pipelines use, targets with label noise), pretrain_sft(),
                          build_tiny() with BASE_PLAN: the model every script starts from (--model tiny-base)
  3. scores               task_scores(): greedy scores of a model on every shapes-world test task
  4. the shapes CLIP      build_shapes_clip(): the semantic scorer of Seg-RISE on shapes-world data
                          (seg_rise.load_clip loads it), a small open_clip CLIP trained on shapes-world crops
  5. GRPO from scratch    grpo_colour(): a random tiny model learns to name an image's colour

    python tiny.py base --out DIR [--seed S]               # the tiny base (the shipped recipe, BASE_PLAN)
    python tiny.py base --out DIR --plan where_alone:300,alone:1000 --no-scores   # try a curriculum
    python tiny.py clip [--out DIR] [--seed S]             # the shapes CLIP and its accuracy report
    python tiny.py scores [--model M] [--n N] [--json] [--answer-only]   # greedy scores per shapes-world task
    deepspeed tiny.py grpo                                 # GRPO from scratch: a random model learns colour names
"""
import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

import data
import rewards
import run
import seg_rise
import visrl
import vlm
from vlm import (TINY_BASE, VISION_TOKENS, assistant_turn, box_frame, chat_inputs,
                 from_model_frame, load_model, sample, sft_loss, to_model_frame, user_turn)


# ============================================================================ 1. tokenizer and model
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + VISION_TOKENS
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
# The Qwen2-VL chat format without its default system prompt (shorter sequences on CPU), with one
# change: a user message's images come AFTER its text. Rotary positions are relative, so the answer
# then sits at a fixed distance from the image whatever the prompt's length, and the image tokens
# can attend to the question's words: the tiny model learns to look far faster (tiny-base/README.md).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(texts, vocab_size=1024):
    """A byte-level BPE tokenizer trained on `texts`, with the Qwen chat special tokens and
    the <think>/<answer> tags as single (non-special, so they survive decoding) tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([    # Qwen2's: digits are split one by one
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    tok = Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=merges, unk_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", model_max_length=4096)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return tok


# Rotary settings that let a 4-layer model tell image rows and columns apart. Qwen2-VL's own
# (theta 1e6, sections [16,24,24] of head_dim 128) give the 4x4 image grid of a 112-px image
# almost the same angle everywhere: width takes the lowest frequencies. Theta 10 with sections
# [2,7,7] gives height 0.3-0.75 and width 0.1-0.3 radians per row / column.
ROPE_THETA = 10.0
MROPE_SECTION = [2, 7, 7]


def tiny_model(tokenizer, seed=0):
    """A randomly initialised Qwen2VLForConditionalGeneration of ~3M parameters."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    hidden, heads = 192, 6                      # head_dim 32: mrope sections must sum to 32 / 2
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=heads, num_key_value_heads=2,
                         max_position_embeddings=4096, rope_scaling={"type": "mrope", "mrope_section": MROPE_SECTION},
                         rope_theta=ROPE_THETA, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=hidden, num_heads=4, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


def tiny_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor
    # 112x112 shapes-world images become 8x8 patches -> 16 tokens; crops are upscaled to >= 56x56.
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=224 * 224)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


# ---- the real architectures at toy depth: random weights, published configs, nothing downloaded.
# Values from the published Hugging Face files of Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2.5-VL-3B-Instruct:
# config.json (text: hidden/intermediate sizes, heads, KV heads, rms eps, rope theta, M-RoPE sections,
# tied embeddings; vision: the listed fields, the rest being the transformers defaults the checkpoints
# load with), preprocessor_config.json (min_pixels 3136 = 56*56, max_pixels 12845056 = 28*28*16384,
# patch 14, merge 2, temporal patch 2, CLIP mean/std = Qwen2VLImageProcessor's defaults),
# chat_template.json (the default system prompt) and generation_config.json (both ship do_sample,
# repetition_penalty 1.05, temperature 0.1, top_k 1, top_p 0.001). Depth is cut to `layers` text and
# vision blocks and the vocabulary is the tiny tokenizer's; `narrow` divides the widths (and head
# counts, head_dim kept: M-RoPE sections must sum to head_dim / 2) to keep CPU tests fast.
REAL_ARCH = {
    "qwen2_vl": dict(          # Qwen/Qwen2-VL-2B-Instruct
        text=dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, mrope_section=[16, 24, 24], tie_word_embeddings=True),
        vision=dict(embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_act="quick_gelu", patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2)),
    "qwen2_5_vl": dict(        # Qwen/Qwen2.5-VL-3B-Instruct
        text=dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, mrope_section=[16, 24, 24], tie_word_embeddings=True),
        vision=dict(hidden_size=1280, intermediate_size=3420, num_heads=16, hidden_act="silu", patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112, tokens_per_second=2)),
}
QWEN_IMAGE_PIXELS = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 16384)
QWEN_GENERATION = dict(do_sample=True, repetition_penalty=1.05, temperature=0.1, top_k=1, top_p=0.001)
# Qwen2-VL's (and Qwen2.5-VL's) chat template: a default system prompt unless the chat starts with one.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_real_arch(out, family, tokenizer_dir, layers=2, narrow=1, seed=0):
    """A random-weight Qwen2-VL-2B / Qwen2.5-VL-3B architecture (`family` "qwen2_vl" / "qwen2_5_vl")
    with `layers` text and vision blocks, the tokenizer of `tokenizer_dir` (a tiny model), the
    published processor settings, chat template and generation config; save_pretrained to `out`.
    Qwen2.5-VL keeps both kinds of vision block: window attention, then full attention in the last
    block (the published model has full attention in blocks 7, 15, 23, 31)."""
    from transformers import (AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)
    spec = REAL_ARCH[family]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    t = dict(spec["text"])
    section = t.pop("mrope_section")
    tie = t.pop("tie_word_embeddings")
    groups = t["num_attention_heads"] // t["num_key_value_heads"]       # query heads per KV head, kept
    for key in ("hidden_size", "intermediate_size", "num_attention_heads"):
        t[key] //= narrow
    t["num_key_value_heads"] = max(1, t["num_attention_heads"] // groups)
    text = dict(t, vocab_size=len(tokenizer), num_hidden_layers=layers, max_position_embeddings=32768,
                rope_scaling={"type": "mrope", "mrope_section": section}, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    v = dict(spec["vision"], depth=layers)
    width = "embed_dim" if family == "qwen2_vl" else "hidden_size"
    v[width] //= narrow
    v["num_heads"] //= narrow
    if family == "qwen2_vl":
        v["hidden_size"] = text["hidden_size"]            # the merger projects to the text width
        config_cls, model_cls, processor_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    else:
        v.update(intermediate_size=v["intermediate_size"] // narrow, out_hidden_size=text["hidden_size"],
                 fullatt_block_indexes=[layers - 1])
        config_cls, model_cls, processor_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, \
            Qwen2_5_VLProcessor
    config = config_cls(text_config=text, vision_config=v, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config.update(**QWEN_GENERATION, eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                                   pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"])
    processor = processor_cls(image_processor=Qwen2VLImageProcessor(**QWEN_IMAGE_PIXELS), tokenizer=tokenizer,
                              video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_CHAT_TEMPLATE)
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    publish_dir(tmp, Path(out))
    return Path(out)


# ============================================================================ 2. the tiny base
# The shipped base's recipe (tiny-base/README.md), stage for stage as its chain of resumed builds ran
# (tiny-base/build.json; each stage restarts AdamW with warm-up + cosine). Images at 224 px: 64 image tokens
# instead of 16 (at 112 px even one shape's position was found only by chance, after 300-1250 steps). Look
# questions first, from one shape drawn alone to two shapes to whole scenes (the box of a named shape among
# others came only after ~3000 pair steps), then every pipeline format with look questions a quarter of each
# batch. Then "mixed" stages of every look question, with those the format stages never ask alone: every shape
# of a kind (multi_det) and the shape in a quadrant (VisRL's box turn), each followed by format stages (a
# mixed stage costs soft_cls; the format stages bring it back).
BASE_PLAN = (("where_alone", 300), ("where_pairs_colour", 600), ("where_pairs", 400), ("where_scenes", 400),
             ("alone", 1000), ("pairs", 4000), ("scenes", 2000), ("formats", 3000)) + (("formats", 1500),) * 4 + (
             ("mixed", 2000), ("formats", 1500), ("mixed", 2500), ("formats", 1500), ("formats", 1500))
BASE_PIXELS = 224
LOOK_LR, FORMATS_LR = 1e-3, 5e-4
BOX_THINK_COPIES = 3     # think-first box targets per corpus (pretrain_corpus)


def build_tiny(out, seed=0, plan=BASE_PLAN, n_train=400, init=None, pixels=BASE_PIXELS, record_scores=True,
               look_n=48, log=print):
    """Build the tiny model + processor in `out` (save_pretrained: loadable offline by path).

    plan: [(stage, steps)], each stage trained as a run of its own (fresh AdamW, warm-up + cosine):
    a PROBE_POOLS name (look questions only, lr LOOK_LR; look_scores() on `look_n` targets after it,
    in the build record) or "formats" (pretrain_corpus(): every pipeline format, a quarter of each
    batch look questions (look_mix), lr FORMATS_LR). plan=(): random weights. From scratch (a tokenizer trained
    on the corpus text) or from `init`, a saved model. pixels: set_image_pixels() (None: the
    processor's 112 px, 16 image tokens, what the random test models use). Raises ValueError for an
    unknown stage.
    """
    check_plan(plan)
    out, t0 = Path(out), time.time()
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    world = pretrain_world(seed, n_train)
    examples, pools = pretrain_corpus(world, seed), probe_pools(world, seed)
    look = pools["mixed"]
    if init:
        model, processor = load_model(init)
    else:
        processor = tiny_processor(build_tokenizer(corpus_text(examples + look + pools["where_pairs_colour"])))
        model = tiny_model(processor.tokenizer, seed)
    if pixels:
        set_image_pixels(processor, pixels)
    curve, stages = [], []
    root = scores_world() if any(name != "formats" for name, _ in plan) else None
    for i, (name, steps) in enumerate(plan):
        done = curve[-1][0] if curve else 0
        stage_data, mixed_in, lr = (examples, look, FORMATS_LR) if name == "formats" else (pools[name], (), LOOK_LR)
        part = pretrain_sft(model, processor, stage_data, mixed_in, seed + i, steps, lr=lr, log=log)
        curve += [(done + step, loss) for step, loss in part]
        stages.append({"stage": name, "steps": steps, "loss": part[-1][1]})
        if name != "formats":
            stages[-1].update(look_scores(model, processor, root, look_n))
        log(f"[tiny] {json.dumps(stages[-1])}")
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    record = build_record(seed, plan, n_train, init, pixels, t0, curve, stages)
    (tmp / "build.json").write_text(json.dumps(record, indent=1))
    publish_dir(tmp, out)
    if plan and record_scores:
        record_build_scores(out, log=log)
    log(f"[tiny] tiny model ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"{len(plan)} stages) written to {out} in {time.time() - t0:.0f}s")
    return out


def pretrain_world(seed=0, n_train=400):
    """The shapes world the tiny base is pretrained on (cached): `n_train` training scenes per task."""
    world = vlm.CACHE / f"shapes-pretrain-{seed}-{n_train}"
    if not (world / "vqa" / "test.jsonl").exists():
        data.make_shapes_world(world, n_train=n_train, n_test=1, seed=1000 + seed)
    return world


def format_plan(plan):
    return ",".join(f"{name}:{steps}" for name, steps in plan)


def check_plan(plan):
    """The plan if every stage is a PROBE_POOLS name or "formats" with steps >= 1; else ValueError."""
    stages = PROBE_POOLS + ("formats",)
    bad = [f"{name}:{steps}" for name, steps in plan if name not in stages or steps < 1]
    if bad:
        raise ValueError(f"unknown stage or steps < 1 in {bad}: stages are {', '.join(stages)}")
    return plan


def parse_plan(text):
    """"STAGE:STEPS,STAGE:STEPS,..." -> [(stage, steps)], checked (check_plan); "" -> []. Raises ValueError."""
    try:
        plan = [(name, int(steps)) for name, steps in (part.split(":") for part in text.split(",") if part)]
    except ValueError:
        raise ValueError(f"expected STAGE:STEPS,STAGE:STEPS,... ; got {text!r}") from None
    return check_plan(plan)


def build_record(seed, plan, n_train, init, pixels, t0, curve, stages):
    """What rebuilds this model and what it took: command, seed, versions, plan, time, loss curve, and per
    stage its last loss and look scores; from `init`, that model's own build record under "init"."""
    import platform
    import transformers
    command = f"python tiny.py base --out DIR --seed {seed} --plan '{format_plan(plan)}' --n-train {n_train}"
    command += (f" --init {init}" if init else "") + (f" --pixels {pixels}" if pixels else " --pixels 0")
    init_record = Path(init or "", "build.json")
    return {"command": command, "seed": seed, "plan": [list(p) for p in plan], "steps": sum(n for _, n in plan),
            "pixels": pixels, "seconds": round(time.time() - t0, 1), "built_on": f"{platform.machine()} CPU, "
            f"torch threads {torch.get_num_threads()}", "versions": {
                "python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "numpy": np.__version__},
            "loss_curve": curve, "stages": stages,
            "init": json.loads(init_record.read_text()) if init and init_record.exists() else init}


CHECK_N = 16   # test scenes per task that test_all.py re-scores to check a shipped build


def record_build_scores(out, log=print):
    """Add to OUT/build.json the model's greedy scores on 128 test scenes per task (think-first prompts, and
    answer-only), the grounding gap, and the first on the first CHECK_N scenes (what the tests compare a
    shipped build with)."""
    model, processor = load_model(out)
    root = scores_world()
    record = json.loads((Path(out) / "build.json").read_text())
    record["scores"] = task_scores(model, processor, root)
    record["scores"]["grounding_gap_nats"] = grounding_gap(model, processor, root)
    record["scores_answer_only"] = task_scores(model, processor, root, answer_only=True)
    record["check"] = task_scores(model, processor, root, n=CHECK_N)
    record["check"]["grounding_gap_nats"] = grounding_gap(model, processor, root, n=CHECK_N)
    (Path(out) / "build.json").write_text(json.dumps(record, indent=1))
    log(f"[tiny] scores: {json.dumps(record['scores'])}")
    return record


def publish_dir(tmp, out):
    """Replace `out` by the finished build in `tmp`: the rename is the last step, so a killed
    build never looks finished (a cache is "built" iff its folder exists)."""
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    Path(tmp).rename(out)


def _jitter_box(box, rng, px=3, size=data.IMAGE_SIZE):
    """Label noise for the pretraining targets, so the tiny base is imperfect by design."""
    b = [v + int(rng.integers(-px, px + 1)) for v in box]
    b = [min(max(v, 0), size) for v in b]
    return [b[0], b[1], max(b[2], b[0] + 2), max(b[3], b[1] + 2)]


def _noisy_probs(probs, rng, scale=0.05):
    p = np.clip(np.array(probs) + rng.normal(0, scale, len(probs)), 0, None) + 1e-3
    return (p / p.sum()).tolist()


FRAME = (1000, 1000)    # the tiny model is a Qwen2-VL: its box prompts state the 0..1000 frame


def to_frame(box):
    """A shapes-world pixel box in the tiny model's (Qwen2-VL) 0..1000 frame."""
    return to_model_frame(box, "qwen2_vl", (data.IMAGE_SIZE, data.IMAGE_SIZE))


def train_records(root):
    """(shapes-world task, record) for every training record of the shapes world at `root`, task by task."""
    for task in data.SHAPE_TASKS:
        for rec in data.read_manifest(Path(root) / task / "train.jsonl", data.MANIFEST_SCHEMA[task])[0]:
            yield task, rec


def short_think(task, rec):
    """The think of the tiny base's think-first classification targets: one sentence with what the answer
    needs (which colours cover most, the big shape's kind), in the words the look questions ground.
    (A box task's think is its answer's box: pretrain_corpus.)"""
    if task == "soft_cls":
        order = [c for c, p in sorted(zip(rec["classes"], rec["probs"]), key=lambda cp: -cp[1]) if p > 0]
        return "The shapes are mostly " + ", then ".join(order) + "."
    return f"The large shape is a {rec['classes'][int(np.argmax(rec['probs']))]}."


def pretrain_corpus(root, seed=0):
    """SFT examples (conversation, images) in every prompt format the pipelines use.

    Targets carry deliberate noise (jittered boxes, perturbed distributions), so the tiny base
    answers in the right format but imperfectly: RL has room to improve it.

    A think-first box target's think is its answer's box, written the same way
    (`<think>[62,339,330,670]</think><answer>[62,339,330,670]</answer>`): the box is read from the image
    at the first generated token, right after the prompt's "the box of the green square." as in the look
    question, where the tiny base can read it, and the answer copies it. Measured (tiny-base/README.md):
    a box written after any think stayed blind (think-first det mAP@0.5 0.003-0.005 after a scene
    description, a sentence, a constant preamble); a think that opens with the box reads it (mean IoU
    0.39-0.41 on 32 det test scenes) but the answer does not copy it across a sentence (0.14-0.24); with
    nothing after the box the copy is learnt faster (answer 0.35 after 300 det-only steps). These targets
    come BOX_THINK_COPIES times (appended after the shuffled corpus): 1500 format steps with 3 copies took
    think-first det mAP@0.5 0.07 -> 0.32 and seg box IoU 0.26 -> 0.38 (the same steps with 1 copy: 0.16, 0.32).
    """
    rng = np.random.default_rng(seed)
    examples, box_thinks = [], set()          # box_thinks: indices of the think-first box targets
    for task, rec in train_records(root):
        image = data.open_image(rec["image_path"])
        scene = rec["scene"]

        def add(prompt, answer, extra_turns=(), extra_images=(), box_think=False):
            if box_think:
                box_thinks.add(len(examples))
            conv = [user_turn(prompt), assistant_turn(answer)] + list(extra_turns)
            examples.append((conv, [image] + list(extra_images)))

        if task in ("soft_cls", "onehot_cls"):
            classes = rec["classes"]
            mask_names = task == "soft_cls" and bool(rng.integers(2))
            desc = data.describe_scene(scene, rng, with_names=not mask_names)
            noisy = data.format_probs(classes, _noisy_probs(rec["probs"], rng))
            add(data.prompt("cot", rec, mask_names=mask_names), desc)
            add(data.prompt("rec", rec, cot=desc), noisy)
            add(data.prompt("r1", rec), f"<think>{short_think(task, rec)}</think><answer>{noisy}</answer>")
            add(data.prompt("plain", rec), noisy)
        elif task in ("det", "multi_det"):
            boxes = [to_frame(b) for b in rec["boxes"]]
            noisy = [to_frame(_jitter_box(b, rng)) for b in rec["boxes"]]
            answer = data.format_annotation(rec, noisy)
            target_shape = None if rec.get("multi") else next(s for s in scene if s["box"] == rec["boxes"][0])
            desc = data.describe_scene(scene, rng, target=target_shape)
            add(data.prompt("cot", rec, boxes=boxes, frame=FRAME), desc)
            add(data.prompt("rec", rec, cot=desc, frame=FRAME), answer)
            add(data.prompt("r1", rec, frame=FRAME), f"<think>{answer}</think><answer>{answer}</answer>",
                box_think=True)
            add(data.prompt("plain", rec, frame=FRAME), answer)
        elif task == "seg":
            fb = to_frame(_jitter_box(rec["box"], rng))
            answer = seg_answer(fb, rec["box"])
            add(data.prompt("seg", rec, frame=FRAME), f"<think>{data.format_box(fb)}</think><answer>{answer}</answer>",
                box_think=True)
            add(data.prompt("seg_no_cot", rec, frame=FRAME), f"<answer>{answer}</answer>")
        elif task == "vqa":
            q, a = rec["question"], rec["answer"]
            box = _jitter_box(rec["box"], rng)
            crop = image.crop(box)
            add(data.prompt("visrl", rec), data.format_norm_box(box, *image.size),
                [user_turn(data.VISRL_ANSWER_PROMPT.format(question=q)), assistant_turn(a)], [crop])
            examples.extend(_critic_examples(q, a, scene, image, rng))
    order = rng.permutation(len(examples))
    copies = [examples[i] for i in order if i in box_thinks] * (BOX_THINK_COPIES - 1)
    return [examples[i] for i in order] + copies


def seg_answer(frame_box, box):
    """The tiny base's Seg-RISE answer: `frame_box` (0..1000 frame) and two points inside the shape whose pixel
    box is `box` (the lower third, a third in from each side), as JSON the way the prompt shows it, the box
    written as in a think-first target's think (data.format_box: the copy is token for token)."""
    x1, y1, x2, y2 = box
    points = [[(x1 * 2 + x2) / 3, (y1 + y2 * 2) / 3], [(x1 + x2 * 2) / 3, (y1 + y2 * 2) / 3]]
    frame_points = [to_frame(p + p)[:2] for p in points]
    return f'{{"bbox": {data.format_box(frame_box)}, "points": {data.format_boxes(frame_points)}}}'


# Short questions about what is where, used only to pretrain the tiny base (the pipelines never ask
# them): a one-word answer from the image is the fastest way for a model trained from scratch to
# start using its image tokens, before the long formats above (tiny-base/README.md).
LOOK_COLOUR = "What colour is the {shape}?"
LOOK_WHERE = "Where is the {color} {shape}?"
LOOK_BOX = "Give the box of the {color} {shape}."
LOOK_KIND = "What kind is the {color} shape?"


def look_examples(scene, image):
    """One-word / one-box questions about the shapes of a scene whose (colour, kind) is unique;
    LOOK_COLOUR only when the kind alone is unique, LOOK_KIND only when the colour alone is. Boxes are exact
    (0..1000 frame). LOOK_KIND is the one question a shape drawn alone answers only by its outline: what
    multi_det (all shapes of a kind) and onehot_cls (the large shape's kind) need."""
    examples = []
    for shape in scene:
        same = [s for s in scene if s["color"] == shape["color"] and s["shape"] == shape["shape"]]
        if len(same) > 1:
            continue
        if sum(s["shape"] == shape["shape"] for s in scene) == 1:
            examples.append(([user_turn(LOOK_COLOUR.format(shape=shape["shape"])),
                              assistant_turn(shape["color"])], [image]))
        if sum(s["color"] == shape["color"] for s in scene) == 1:
            examples.append(([user_turn(LOOK_KIND.format(color=shape["color"])),
                              assistant_turn(shape["shape"])], [image]))
        examples.append(([user_turn(LOOK_WHERE.format(**shape)), assistant_turn(data.position_word(shape["box"]))],
                         [image]))
        examples.append(([user_turn(LOOK_BOX.format(**shape)), assistant_turn(data.format_box(to_frame(shape["box"])))],
                         [image]))
    return examples


# Look questions for what the pipelines ask besides one named shape: the boxes of every shape of a kind
# (multi_det's "...: the boxes of all circles."; the list in its answer's order, top to bottom) and the shape in a
# quadrant (VisRL's "What colour is the shape in the top-left?": its colour, kind, and box in VisRL's 0..1 frame).
# Each ends with what to look for, as the pipeline prompts do.
LOOK_ALL = "Give the boxes of all {kinds}."
LOOK_IN_COLOUR = "What colour is the shape in the {where}?"       # the VQA questions' words (data._gen_vqa)
LOOK_IN_KIND = "What shape is in the {where}?"
LOOK_IN_BOX = "Give the box in 0..1 of the shape in the {where}."
LOOK_LARGE = "What kind is the large shape?"                      # onehot_cls's think: "The large shape is a ..."


def kind_examples(scene, image):
    """LOOK_ALL for every kind in the scene: all its boxes (0..1000 frame), sorted top to bottom as
    multi_det's records are (data._gen_multi_det), written as its answers are (data.format_boxes); and
    LOOK_LARGE when one shape is at least 1.5 times as wide as every other (as in onehot_cls's scenes)."""
    examples = []
    sides = sorted(((s["box"][2] - s["box"][0], i) for i, s in enumerate(scene)), reverse=True)
    if len(sides) > 1 and sides[0][0] >= 1.5 * sides[1][0]:
        examples.append(([user_turn(LOOK_LARGE), assistant_turn(scene[sides[0][1]]["shape"])], [image]))
    for kind in data.SHAPES:
        boxes = sorted((s["box"] for s in scene if s["shape"] == kind), key=lambda b: (b[1], b[0]))
        if boxes:
            examples.append(([user_turn(LOOK_ALL.format(kinds=data.PLURAL[kind])),
                              assistant_turn(data.format_boxes([to_frame(b) for b in boxes]))], [image]))
    return examples


def quadrant_examples(scene, image):
    """For each quadrant (data.position_word, grid 2) that holds the centre of exactly one shape: that
    shape's colour, kind and box in VisRL's 0..1 frame (data.format_norm_box)."""
    examples = []
    for where in ("top-left", "top-right", "bottom-left", "bottom-right"):
        inside = [s for s in scene if data.position_word(s["box"], grid=2) == where]
        if len(inside) != 1:
            continue
        shape = inside[0]
        for question, answer in ((LOOK_IN_COLOUR, shape["color"]), (LOOK_IN_KIND, shape["shape"]),
                                 (LOOK_IN_BOX, data.format_norm_box(shape["box"], *image.size))):
            examples.append(([user_turn(question.format(where=where)), assistant_turn(answer)], [image]))
    return examples


def look_scenes(root, rng):
    """Per training scene of the shapes world at `root`: ("scenes", its look_examples()), then
    ("alone", those of one of its shapes, picked by `rng`, drawn alone on a random grey)."""
    for _, rec in train_records(root):
        yield "scenes", look_examples(rec["scene"], data.open_image(rec["image_path"]))
        shape = rec["scene"][int(rng.integers(len(rec["scene"])))]
        yield "alone", look_examples([shape], data.render([shape], int(rng.integers(200, 246))))


def _critic_examples(question, answer, scene, image, rng, n=2):
    """VisRL critic skills, labelled by the scene: s_b (does this crop show a shape with the
    answer's colour / kind? 1 iff one has at least half of its box inside the crop) and s_r
    (is the candidate answer the reference? 1 iff equal; wrong candidates are the same kind of word)."""
    kind = "color" if answer in data.COLORS else "shape"
    values = list(data.COLORS) if kind == "color" else data.SHAPES
    examples = []
    for _ in range(n):
        pick = rng.random()
        if pick < 0.8:                  # the target (the shape with the answer) or another shape
            pool = [s for s in scene if s[kind] == answer] if pick < 0.4 else scene
            crop = _jitter_box(pool[int(rng.integers(len(pool)))]["box"], rng)
        else:                           # a random small square, mostly background
            side = int(rng.integers(12, 31))
            x, y = (int(v) for v in rng.integers(0, data.IMAGE_SIZE - side, 2))
            crop = [x, y, x + side, y + side]
        hit = any(s[kind] == answer and rewards.covers(crop, s["box"]) for s in scene)
        conv = [user_turn(data.CRITIC_BOX_PROMPT.format(question=question, answer=answer)),
                assistant_turn(json.dumps({"score": 1.0 if hit else 0.0}))]
        examples.append((conv, [image.crop(crop)]))
    for _ in range(n):
        cand = answer if rng.random() < 0.5 else str(rng.choice([v for v in values if v != answer]))
        conv = [user_turn(data.CRITIC_ANSWER_PROMPT.format(question=question, reference=answer, answer=cand)),
                assistant_turn(json.dumps({"score": 1.0 if cand == answer else 0.0}))]
        examples.append((conv, [image]))
    return examples


def corpus_text(examples):
    """Every text of the corpus, for training the tokenizer."""
    return [part["text"] for conv, _ in examples for msg in conv for part in msg["content"] if part["type"] == "text"]


def sft_step(model, processor, optimizer, schedule, batch):
    """One SFT update on a batch of (conversation, images): clipped at norm 1; returns the loss."""
    convs, ims = zip(*batch)
    loss = sft_loss(model, processor, list(convs), list(ims))
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    return loss.item()


def pretrain_sft(model, processor, examples, look=(), seed=0, steps=100, lr=1e-3, batch_size=16, look_share=0.25,
                 log=print):
    """Plain SFT (AdamW, warm-up + cosine) on the assistant tokens of `examples`, a `look_share` of
    each batch drawn from `look` (if given). Returns the loss curve [(step, mean loss since the last
    point)], a point every 50 steps (fewer for short runs)."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(50, max(1, steps // 10)), steps)
    model.train()
    curve, recent, every = [], [], max(1, min(50, steps // 8))
    n_look = round(look_share * batch_size) if look else 0
    bar = tqdm(range(steps), desc="pretrain tiny base", mininterval=10)
    for step in bar:
        batch = [look[i] for i in torch.randint(len(look), (n_look,), generator=g).tolist()] if n_look else []
        batch += [examples[i] for i in torch.randint(len(examples), (batch_size - n_look,), generator=g).tolist()]
        recent.append(sft_step(model, processor, optimizer, schedule, batch))
        if (step + 1) % every == 0 or step + 1 == steps:
            curve.append((step + 1, round(float(np.mean(recent)), 4)))
            recent = []
            bar.set_postfix(loss=f"{curve[-1][1]:.3f}")
            log(f"[tiny] step {step + 1}/{steps} loss {curve[-1][1]:.3f}")
    model.eval()
    return curve


# ============================================================================ 3. scores
def _greedy(model, processor, conversations, images, max_new_tokens):
    batch = chat_inputs(processor, conversations, images)
    return sample(model, processor, batch, 1, max_new_tokens, do_sample=False)["texts"]


def scores_world(n_test=128, seed=0):
    """The default test set of `python tiny.py scores`: shapes world seed 0 with 128 test scenes per task
    (its first 32 are the pipelines' default test split, the same stream)."""
    root = vlm.CACHE / f"shapes-scores-{seed}-{n_test}"
    if not (root / "vqa" / "test.jsonl").exists():
        data.make_shapes_world(root, n_train=1, n_test=n_test, seed=seed)
    return root


def grounding_examples(root, n=None, split="test"):
    """(conversation, images) per record of every shapes-world task: the task's answer-only prompt
    and its exact answer (0..1000 frame for boxes), for measuring how much the answer needs the image."""
    examples = []
    for task in data.SHAPE_TASKS:
        records, _ = data.read_manifest(Path(root) / task / f"{split}.jsonl", data.MANIFEST_SCHEMA[task])
        for rec in records[:n]:
            if task in ("soft_cls", "onehot_cls"):
                prompt, answer = data.prompt("plain", rec), data.format_probs(rec["classes"], rec["probs"])
            elif task in ("det", "multi_det"):
                prompt = data.prompt("plain", rec, frame=FRAME)
                answer = data.format_annotation(rec, [to_frame(b) for b in rec["boxes"]])
            elif task == "seg":      # the tags and points the prompt asks for, as the tiny base writes them
                prompt = data.prompt("seg_no_cot", rec, frame=FRAME)
                answer = f"<answer>{seg_answer(to_frame(rec['box']), rec['box'])}</answer>"
            else:
                prompt, answer = data.prompt("visrl", rec), data.format_norm_box(rec["box"], data.IMAGE_SIZE, data.IMAGE_SIZE)
            examples.append(([user_turn(prompt), assistant_turn(answer)], [data.open_image(rec["image_path"])]))
    return examples


@torch.no_grad()
def grounding_gap(model, processor, root, n=None, batch_size=16):
    """Mean answer-token loss (nats/token) with each batch's images rolled by one sample, minus the
    loss with the right images: 0 for a model that ignores its images."""
    model.eval()
    examples = grounding_examples(root, n)
    right, shuffled = [], []
    for start in range(0, len(examples), batch_size):
        convs, images = zip(*examples[start:start + batch_size])
        if len(convs) < 2:
            continue
        right.append(sft_loss(model, processor, list(convs), list(images)).item())
        shuffled.append(sft_loss(model, processor, list(convs), list(images[1:] + images[:1])).item())
    return float(np.mean(shuffled) - np.mean(right))


# data.prompt() style per shapes-world task: the pipelines' think-first prompts, or the same without the think
PIPELINE_STYLES = {"soft_cls": "r1", "onehot_cls": "r1", "det": "r1", "multi_det": "r1", "seg": "seg", "vqa": "visrl"}
ANSWER_ONLY_STYLES = {**PIPELINE_STYLES, **{t: "plain" for t in ("soft_cls", "onehot_cls", "det", "multi_det")},
                      "seg": "seg_no_cot"}


@torch.no_grad()
def task_scores(model, processor, root, n=None, batch_size=16, max_new_tokens=128, answer_only=False):
    """Greedy scores of a model on every shapes-world test task, with the pipelines' prompts: think-first
    (RISE-R1's "r1", Seg-RISE's "seg"), or with answer_only the same tasks without the think ("plain",
    "seg_no_cot": the SFT / Visual-RFT rows' prompts). VisRL's box-then-crop prompt either way.

    soft_cls: mean JSD (unparsable = ln 2); onehot_cls: accuracy; det / multi_det: mAP@0.5;
    seg: mean IoU of the predicted box with the GT box; vqa: answer accuracy after the box +
    crop turns, and box accuracy (IoU >= 0.5). `unparsable` counts answers that did not parse.
    max_new_tokens 128: a think-first multi_det answer writes its boxes twice (think, then answer).
    """
    model.eval()
    model_type, scores = model.config.model_type, {}
    for task in data.SHAPE_TASKS:
        records, _ = data.read_manifest(Path(root) / task / "test.jsonl", data.MANIFEST_SCHEMA[task])
        records = records[:n]
        results, bad = [], 0
        style = (ANSWER_ONLY_STYLES if answer_only else PIPELINE_STYLES)[task]
        tagged = style in ("r1", "seg", "seg_no_cot")         # the answer comes in <answer></answer>
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            images = [data.open_image(r["image_path"]) for r in chunk]
            prompts = [data.prompt(style, r, frame=box_frame(model_type, im.size, processor))
                       for r, im in zip(chunk, images)]
            texts = _greedy(model, processor, [[user_turn(p)] for p in prompts], [[im] for im in images],
                            max_new_tokens)
            for r, im, text in zip(chunk, images, texts):
                answer = rewards.answer_text(text) if tagged else text
                if task in ("soft_cls", "onehot_cls"):
                    pred = rewards.parse_class_probs(answer or "")
                    bad += pred is None
                    q = rewards.probs_vector(pred, r["classes"]) if pred else None
                    results.append((q, r))
                elif task in ("det", "multi_det", "seg"):
                    if task == "seg":
                        parsed = rewards.parse_seg_answer(answer or "")
                        boxes = [parsed[0]] if parsed else None
                    else:
                        boxes = rewards.parse_boxes(answer or "")
                    bad += boxes is None
                    boxes = [from_model_frame(b, model_type, im.size, processor) for b in boxes or []]
                    results.append((boxes, r))
                else:
                    box = rewards.parse_boxes(text)
                    bad += box is None
                    w, h = im.size
                    box = [box[0][0] * w, box[0][1] * h, box[0][2] * w, box[0][3] * h] if box else None
                    results.append((box, r, im))
        if task == "soft_cls":
            scores[task] = {"jsd": float(np.mean([rewards.jsd(r["probs"], q) if q else math.log(2)
                                                  for q, r in results]))}
        elif task == "onehot_cls":
            scores[task] = {"accuracy": rewards.accuracy(
                [r["classes"][int(np.argmax(q))] if q and sum(q) > 0 else None for q, r in results],
                [r["classes"][int(np.argmax(r["probs"]))] for _, r in results])}
        elif task in ("det", "multi_det"):
            preds = [{"boxes": b, "labels": [r["target"]] * len(b)} for b, r in results]
            gts = [{"boxes": r["boxes"], "labels": [r["target"]] * len(r["boxes"])} for _, r in results]
            scores[task] = {"map50": rewards.map50(preds, gts)}
        elif task == "seg":
            scores[task] = {"box_iou": float(np.mean([rewards.box_iou(b[0], r["box"]) if b else 0.0
                                                      for b, r in results]))}
        else:
            answered = [(b, r, im) for b, r, im in results if b and rewards.crop_box(im, b) is not None]
            convs = [[user_turn(data.VISRL_BOX_PROMPT.format(question=r["question"])),
                      assistant_turn(data.format_norm_box(b, *im.size)),
                      user_turn(data.VISRL_ANSWER_PROMPT.format(question=r["question"]))] for b, r, im in answered]
            crops = [[im, data.fit_image(rewards.crop_box(im, b))] for b, r, im in answered]   # thin strips padded
            replies = []
            for start in range(0, len(convs), batch_size):
                replies += _greedy(model, processor, convs[start:start + batch_size], crops[start:start + batch_size], 8)
            correct = sum(reply.strip().lower().strip(".") == r["answer"] for reply, (_, r, _) in zip(replies, answered))
            scores[task] = {"answer_accuracy": correct / max(len(results), 1),
                            "box_accuracy": sum(rewards.box_iou(b, r["box"]) >= 0.5 for b, r, _ in answered)
                            / max(len(results), 1)}
        scores[task]["unparsable"] = bad
        scores[task]["n"] = len(results)
    return scores


# ---- look probes: is a curriculum teaching the tiny model to look? Minutes, not a full build.
PROBE_POOLS = ("where_alone", "alone", "where_pairs_colour", "where_pairs", "pairs", "where_scenes", "scenes",
               "kinds", "quadrants", "mixed")
LOOK_WHERE_COLOUR = "Where is the {color} shape?"


def _is_where(example):
    return example[0][0]["content"][-1]["text"].startswith("Where")


def probe_pools(root, seed=0):
    """Look questions about the training scenes at `root`, by difficulty: one shape of each scene drawn
    alone ("alone", look_scenes); two of its shapes with different colours drawn together ("pairs"; the
    target named by colour only in "where_pairs_colour"); the whole scene ("scenes"). "where_...":
    position-word questions only. "kinds": the boxes of all shapes of a kind (kind_examples), in the whole scene
    and, where it has two or more of a kind among others, those drawn alone; "quadrants": the shape in a quadrant
    (quadrant_examples), in the whole scenes. "mixed": all of them (look_mix)."""
    pools = {name: [] for name in PROBE_POOLS}
    for kind, examples in look_scenes(root, np.random.default_rng(seed + 1)):
        pools[kind] += examples
        pools["where_" + kind] += [ex for ex in examples if _is_where(ex)]
    rng = np.random.default_rng(seed + 2)
    for _, rec in train_records(root):
        first = rec["scene"][0]
        others = [s for s in rec["scene"][1:] if s["color"] != first["color"]]
        if not others:
            continue
        pair = [first, others[int(rng.integers(len(others)))]]
        image, target = data.render(pair, int(rng.integers(200, 246))), pair[int(rng.integers(2))]
        pools["where_pairs_colour"].append(([user_turn(LOOK_WHERE_COLOUR.format(**target)),
                                             assistant_turn(data.position_word(target["box"]))], [image]))
        examples = look_examples(pair, image)
        pools["pairs"] += examples
        pools["where_pairs"] += [ex for ex in examples if _is_where(ex)]
    rng = np.random.default_rng(seed + 3)
    for _, rec in train_records(root):
        image = data.open_image(rec["image_path"])
        pools["kinds"] += kind_examples(rec["scene"], image)
        pools["quadrants"] += quadrant_examples(rec["scene"], image)
        for kind in data.SHAPES:         # a list without distractors: the shapes of one kind drawn alone
            same = [s for s in rec["scene"] if s["shape"] == kind]
            if 1 < len(same) < len(rec["scene"]):
                pools["kinds"] += kind_examples(same, data.render(same, int(rng.integers(200, 246))))
    pools["mixed"] = look_mix(pools)
    return pools


def look_mix(pools):
    """Every look question of probe_pools(): one shape, pairs, whole scenes twice (the pipelines' images), the
    kinds questions three times and the quadrant ones twice (learnt slowest). What the "formats" stage mixes into
    each batch, and the "mixed" stage's questions: a stage of only new questions unlearns the old ones."""
    return pools["alone"] + pools["pairs"] + pools["scenes"] * 2 + pools["kinds"] * 3 + pools["quadrants"] * 2


def set_image_pixels(processor, pixels):
    """Resize every image to about pixels x pixels (the 112-px shapes world upscaled: 224 gives 64 image
    tokens instead of 16, more tokens per shape)."""
    ip = processor.image_processor
    vlm.set_pixel_limits(ip, min_pixels=pixels * pixels, max_pixels=max(pixels * pixels, ip.size["longest_edge"]))
    return processor


@torch.no_grad()
def look_scores(model, processor, root, n=48):
    """Greedy look answers for the first `n` det test targets at `root`, each drawn alone and in its
    scene: {"alone" | "scenes": {"box_iou": mean IoU, "acc50": share with IoU >= 0.5, "where":
    position-word accuracy}}, and on the first `n` multi_det and vqa test scenes those of look_scores_more().
    Boxes are read in the 0..1000 frame; unparsable counts IoU 0."""
    records = data.read_manifest(Path(root) / "det" / "test.jsonl", "det")[0][:n]
    model.eval()
    result = {}
    for kind in ("alone", "scenes"):
        targets = [next(s for s in r["scene"] if s["box"] == r["boxes"][0]) for r in records]
        images = [[data.render([t], 230) if kind == "alone" else data.open_image(r["image_path"])]
                  for t, r in zip(targets, records)]
        boxes = _greedy(model, processor, [[user_turn(LOOK_BOX.format(**t))] for t in targets], images, 24)
        words = _greedy(model, processor, [[user_turn(LOOK_WHERE.format(**t))] for t in targets], images, 8)
        ious = []
        for text, t in zip(boxes, targets):
            parsed = rewards.parse_boxes(text)
            ious.append(rewards.box_iou(from_model_frame(parsed[0], "qwen2_vl", (data.IMAGE_SIZE,) * 2), t["box"])
                        if parsed else 0.0)
        result[kind] = {"box_iou": round(float(np.mean(ious)), 3),
                        "acc50": round(float(np.mean([v >= 0.5 for v in ious])), 3),
                        "where": round(float(np.mean([w.strip() == data.position_word(t["box"])
                                                      for w, t in zip(words, targets)])), 3)}
    return {**result, **look_scores_more(model, processor, root, n)}


def look_scores_more(model, processor, root, n=48):
    """Greedy answers to the "kinds" and "quadrants" look questions on the first `n` multi_det / vqa test
    scenes at `root`. "kinds" (LOOK_ALL for the record's target kind): "recall50" / "precision50", the share of
    true / answered boxes matched with IoU >= 0.5, "count" the share of answers with as many boxes as the
    truth. "quadrants" (the record's question, and LOOK_IN_BOX for its quadrant): "answer" accuracy, "box_iou"
    and "acc50" of the 0..1 box. Unparsable answers count as wrong / IoU 0."""
    size = (data.IMAGE_SIZE,) * 2
    multi = data.read_manifest(Path(root) / "multi_det" / "test.jsonl", "det")[0][:n]
    images = [[data.open_image(r["image_path"])] for r in multi]
    texts = _greedy(model, processor, [[user_turn(LOOK_ALL.format(kinds=r["target"]))] for r in multi], images, 64)
    hits_true = hits_said = n_said = n_true = right_count = 0
    for text, r in zip(texts, multi):
        said = [from_model_frame(b, "qwen2_vl", size) for b in rewards.parse_boxes(text) or []]
        hits_true += sum(any(rewards.box_iou(b, g) >= 0.5 for b in said) for g in r["boxes"])
        hits_said += sum(any(rewards.box_iou(b, g) >= 0.5 for g in r["boxes"]) for b in said)
        n_said, n_true, right_count = n_said + len(said), n_true + len(r["boxes"]), right_count + (
            len(said) == len(r["boxes"]))
    result = {"kinds": {"recall50": round(hits_true / max(n_true, 1), 3),
                        "precision50": round(hits_said / max(n_said, 1), 3),
                        "count": round(right_count / max(len(multi), 1), 3)}}
    vqa = data.read_manifest(Path(root) / "vqa" / "test.jsonl", "vqa")[0][:n]
    images = [[data.open_image(r["image_path"])] for r in vqa]
    answers = _greedy(model, processor, [[user_turn(r["question"])] for r in vqa], images, 8)
    wheres = [data.position_word(r["box"], grid=2) for r in vqa]
    texts = _greedy(model, processor, [[user_turn(LOOK_IN_BOX.format(where=w))] for w in wheres], images, 32)
    ious = []
    for text, r in zip(texts, vqa):
        parsed = rewards.parse_boxes(text)
        ious.append(rewards.box_iou(visrl.pixel_box(parsed[0], *size), r["box"]) if parsed else 0.0)
    result["quadrants"] = {"answer": round(float(np.mean([a.strip() == r["answer"] for a, r in zip(answers, vqa)])), 3),
                           "box_iou": round(float(np.mean(ious)), 3),
                           "acc50": round(float(np.mean([v >= 0.5 for v in ious])), 3)}
    return result


# ============================================================================ 4. the shapes CLIP
# The shapes-world CLIP: open_clip's CLIP class with a small ModifiedResNet image tower (the
# architecture of CLIP RN50, one block per stage), a transformer text tower and open_clip's own BPE
# tokenizer (bundled with the package: nothing is downloaded). Why a ResNet: on one CPU a 3-layer
# ViT reached 65% zero-shot accuracy on held-out tight crops after 200 steps (5 minutes), the ResNet
# 95% after 60 steps; colour is easy for both, the convolutions learn shape far faster.
SHAPES_CLIP = dict(embed_dim=64,
                   vision_cfg=dict(image_size=64, layers=(1, 1, 1, 1), width=16, head_width=32),
                   text_cfg=dict(context_length=16, vocab_size=49408, width=128, heads=4, layers=3))
CAPTIONS = [f"the {c} {s}" for c in data.COLORS for s in data.SHAPES]   # the 12 instructions
BACKGROUND = "the background"                                          # crops with no shape


def clip_scenes(seed, n):
    """n shapes-world scenes (every task's generator in turn) as (image, shapes), in memory."""
    rng, tasks, out = np.random.default_rng(seed), data.SHAPE_TASKS, []
    for i in range(n):
        scene, _, _ = data.GENERATORS[tasks[i % len(tasks)]](rng)
        out.append((data.render(scene, int(rng.integers(200, 246))), scene))
    return out


def jitter_box(box, rng, lo=-0.12, hi=0.2, size=data.IMAGE_SIZE):
    """Each side moved outwards by U(lo, hi) x the shape's size (negative: into the shape)."""
    s = max(box[2] - box[0], box[3] - box[1])
    d = rng.uniform(lo, hi, 4) * s
    b = [box[0] - d[0], box[1] - d[1], box[2] + d[2], box[3] + d[3]]
    return [max(0, math.floor(b[0])), max(0, math.floor(b[1])), min(size, math.ceil(b[2])), min(size, math.ceil(b[3]))]


def background_box(scene, rng, tries=20, size=data.IMAGE_SIZE):
    """A random square crop that touches no shape's box, or None."""
    for _ in range(tries):
        s = int(rng.integers(10, 41))
        x, y = (int(v) for v in rng.integers(0, size - s + 1, 2))
        b = [x, y, x + s, y + s]
        if all(b[2] <= t["box"][0] or t["box"][2] <= b[0] or b[3] <= t["box"][1] or t["box"][3] <= b[1]
               for t in scene):
            return b
    return None


def clip_batch(scenes, rng, n):
    """n (crop tensor, caption index) pairs: jittered crops of random shapes, ~1 in 13 a background crop."""
    crops, labels = [], []
    while len(crops) < n:
        image, scene = scenes[int(rng.integers(len(scenes)))]
        if rng.random() < 1 / (len(CAPTIONS) + 1):
            box, label = background_box(scene, rng), len(CAPTIONS)
            if box is None:
                continue
        else:
            shape = scene[int(rng.integers(len(scene)))]
            box, label = jitter_box(shape["box"], rng), CAPTIONS.index(f"the {shape['color']} {shape['shape']}")
        crops.append(seg_rise.shapes_clip_preprocess(image.crop(box)))
        labels.append(label)
    return torch.stack(crops), torch.tensor(labels)


def clip_loss(logits, labels):
    """CLIP's symmetric contrastive loss when many images share a caption.

    logits [B, C]: scaled cosines of B crops against the C distinct captions. Image -> text: the
    crop's own caption among the C. Text -> image: for each caption in the batch, all crops
    carrying it are positives (one log of their summed softmax), the rest of the batch negatives.
    """
    i2t = F.cross_entropy(logits, labels)
    positives = F.one_hot(labels, logits.shape[1]).T.bool()             # [C, B]
    present = positives.any(1)
    t2i = -torch.logsumexp(logits.T.log_softmax(-1).masked_fill(~positives, -1e9), -1)[present].mean()
    return (i2t + t2i) / 2


@torch.no_grad()
def shapes_clip_accuracy(model, tokenizer, seed=1, n_scenes=200):
    """Zero-shot accuracy on held-out tight crops (exact boxes of unseen scenes), 12 classes."""
    model.eval()
    txt = F.normalize(model.encode_text(tokenizer(CAPTIONS)), dim=-1)
    crops, labels = [], []
    for image, scene in clip_scenes(10_000 + seed, n_scenes):
        for shape in scene:
            crops.append(seg_rise.shapes_clip_preprocess(image.crop(shape["box"])))
            labels.append(CAPTIONS.index(f"the {shape['color']} {shape['shape']}"))
    img = F.normalize(model.encode_image(torch.stack(crops)), dim=-1)
    pred, labels = (img @ txt.T).argmax(1), torch.tensor(labels)
    return {"zero_shot_accuracy": (pred == labels).float().mean().item(),
            "colour_accuracy": (pred // len(data.SHAPES) == labels // len(data.SHAPES)).float().mean().item(),
            "shape_accuracy": (pred % len(data.SHAPES) == labels % len(data.SHAPES)).float().mean().item(),
            "n_crops": len(labels)}


def build_shapes_clip(out, seed=0, steps=120, batch_size=128, n_scenes=1500, lr=1e-3, log=print):
    """Train the shapes-world CLIP from scratch and save it to `out` (model.safetensors + config.json).

    Deterministic for a seed (on one thread count). The training scenes come from their own
    seed, so they are neither the pipelines' training nor their test images.
    """
    import open_clip
    out, t0 = Path(out), time.time()
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**SHAPES_CLIP)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=SHAPES_CLIP["text_cfg"]["context_length"])
    texts = tokenizer(CAPTIONS + [BACKGROUND])
    scenes, rng = clip_scenes(5_000 + seed, n_scenes), np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    schedule = get_cosine_schedule_with_warmup(optimizer, 20, steps)
    model.train()
    bar = tqdm(range(steps), desc="shapes CLIP", mininterval=5)
    for step in bar:
        crops, labels = clip_batch(scenes, rng, batch_size)
        img = F.normalize(model.encode_image(crops), dim=-1)
        txt = F.normalize(model.encode_text(texts), dim=-1)
        loss = clip_loss(model.logit_scale.exp() * img @ txt.T, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))     # as CLIP: temperature >= 0.01
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    report = shapes_clip_accuracy(model, tokenizer, seed)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    # fp16 on disk (the text tower's 49k-token embedding dominates: 33 MB in fp32), fp32 when loaded
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()},
              tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(
        {"model": SHAPES_CLIP, "captions": CAPTIONS + [BACKGROUND], "seed": seed, "steps": steps,
         "batch_size": batch_size, "seconds": round(time.time() - t0, 1), **report}, indent=1))
    publish_dir(tmp, out)
    log(f"[tiny] shapes CLIP written to {out} in {time.time() - t0:.0f}s: zero-shot accuracy "
        f"{report['zero_shot_accuracy']:.3f} on {report['n_crops']} held-out crops (12 classes)")
    return out


def enlarge(box, factor, size):
    cx, cy, w, h = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]
    return [max(0, cx - w * factor / 2), max(0, cy - h * factor / 2),
            min(size[0], cx + w * factor / 2), min(size[1], cy + h * factor / 2)]


def scorer_profile(clip, records, seed=0):
    """Mean R_sem of typical boxes on segmentation records (a check that the reward ranks boxes
    sensibly): the GT box, the GT box grown 1.5x and 2x, the whole image, another shape's box
    (shapes world), and a random box."""
    rng, rows = np.random.default_rng(seed), {}
    for rec in records:
        image = data.open_image(rec["image_path"])
        gt = rec["box"]
        boxes = {"gt_box": gt, "gt_x1.5": enlarge(gt, 1.5, image.size), "gt_x2": enlarge(gt, 2, image.size),
                 "whole_image": [0, 0, *image.size]}
        others = [s["box"] for s in rec.get("scene", []) if s["box"] != gt]
        if others:
            boxes["other_shape"] = others[int(rng.integers(len(others)))]
        w, h = image.size
        x1, y1 = rng.uniform(0, w * 0.8), rng.uniform(0, h * 0.8)
        boxes["random_box"] = [x1, y1, rng.uniform(x1 + 4, w), rng.uniform(y1 + 4, h)]
        scores = rewards.clip_semantic_reward(*clip, image, list(boxes.values()), rec["instruction"])
        for key, s in zip(boxes, scores):
            rows.setdefault(key, []).append(s)
    return {k: round(float(np.mean(v)), 4) for k, v in rows.items()}


# ============================================================================ 5. GRPO from scratch
def colour_task(rng, n, colours=None, size=224):
    """n (image, colour) pairs: a plain size x size image of one colour (from `colours`, default
    every shapes-world colour), shade jittered. 224 px = 64 image tokens for the tiny model; with
    fewer (56 px = 1 token) the random model learns the same task several times slower."""
    names = list(colours or data.COLORS)
    out = []
    for _ in range(n):
        name = names[rng.randrange(len(names))]
        rgb = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in data.COLORS[name])
        out.append((Image.new("RGB", (size, size), rgb), name))
    return out


def colour_reward(texts, prompt_index, colours, partial=0.1):
    """1.0 when the completion's first word is the image's colour name; `partial` x the matched fraction when
    it is a prefix of it ("bl" for blue: 0.05); else 0. The small graded part gives a random policy's group
    of answers different rewards (a 0/1 reward gives all-zero groups: no signal). Prefixes only: a credit for
    any similar string (difflib's ratio) lets the policy settle on a near miss such as "lu" for blue."""
    rewards = []
    for text, i in zip(texts, prompt_index):
        words = text.strip().lower().split()
        first = words[0].strip(".,!:;\"'") if words else ""
        colour = colours[i]
        prefix = bool(first) and colour.startswith(first)
        rewards.append(1.0 if first == colour else partial * len(first) / len(colour) if prefix else 0.0)
    return rewards


def grpo_colour(argv=None):
    """GRPO from scratch: a random tiny model learns to name an image's colour from the reward alone
    (colour_reward on its first word), one new token per completion. deepspeed tiny.py grpo."""
    parser = argparse.ArgumentParser(prog="tiny.py grpo", description="GRPO demo: learn to name an image's colour "
                                                                     "from reward alone")
    parser.add_argument("--model", default=None, help="model dir (default: a fresh random tiny model)")
    parser.add_argument("--out", default="runs/grpo_colour")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (colours in turn)")
    parser.add_argument("--num-generations", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="decays linearly to 0")
    parser.add_argument("--beta", type=float, default=0.05, help="KL to the initial model (keeps groups diverse)")
    parser.add_argument("--colours", default="red,blue", help="colours of the images (data.COLORS names)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deepspeed", default=None, help="ZeRO config JSON (default ds_zero2.json)")
    parser.add_argument("--dump-rank-state", action="store_true", help="write OUT/rank{r}.json (tests)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.set_defaults(grad_accum=1, weight_decay=0.0, max_pixels=None, gradient_checkpointing=False,
                        freeze_vision=False, lora_rank=0, lr_scheduler="linear", warmup_ratio=0.0)
    args = parser.parse_args(argv)

    rank, world = run.init_distributed(force=True)
    random.seed(args.seed + rank)                  # each rank samples its own prompts
    torch.manual_seed(args.seed + rank)            # ... and its own completions
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model
    if model_dir is None:
        model_dir = out / "random-tiny"
        if rank == 0 and not (model_dir / "config.json").exists():
            build_tiny(model_dir, seed=args.seed, plan=(), pixels=None)
        run.barrier()
    engine, processor = run.policy(args, model_dir, micro_batch=args.batch_size)
    run.new_stage(engine, args.lr, args.max_steps, args)           # linear decay to 0
    ref = run.reference_model(model_dir, args, engine.device) if args.beta else None
    rng, names = random.Random(args.seed + rank), args.colours.split(",")
    question = [vlm.user_turn("What colour is this image?")]
    log = open(out / "metrics.jsonl", "a") if rank == 0 else None
    for step in range(args.max_steps):
        pairs = [p for k in range(args.batch_size) for p in colour_task(rng, 1, [names[k % len(names)]])]
        colours = [c for _, c in pairs]
        stats, _, _ = vlm.grpo_step(engine, ref, processor, [question] * len(pairs), [[im] for im, _ in pairs],
                                    lambda t, i: colour_reward(t, i, colours), group_size=args.num_generations,
                                    max_new_tokens=1, beta=args.beta, scale_rewards=False)
        if log:
            log.write(json.dumps({"step": step, **stats}) + "\n")
            log.flush()
            print(f"step {step} reward {stats['reward']:.3f} zero-std {stats['zero_std_fraction']:.2f}")
    if args.dump_rank_state:
        with vlm.gathered(engine.module):
            checksum = sum(p.detach().double().sum().item() for p in engine.module.parameters())
        from deepspeed.utils import safe_get_full_grad   # the all-reduced gradient, gathered from its shards
        batch = vlm.chat_inputs(processor, [question] * len(pairs), [[im] for im, _ in pairs])
        with vlm.generation_mode(engine.module):      # 8 tokens, so that the shared cache is differentiated
            rollout = vlm.sample(engine.module, processor, batch, args.num_generations, max_new_tokens=8)
        logp, grads = {}, {}                           # scored both ways, under this run's ZeRO stage,
        for ckpt in (False, True):                     # gradient checkpointing off, then on
            if ckpt:
                engine.module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for on in (True, False):
                vlm.SHARED_PREFIX = on
                logp[ckpt, on] = vlm.completion_logprobs(
                    engine, rollout["prompt"], rollout["completion_ids"], rollout["completion_mask"],
                    suppress=vlm.suppressed_ids(processor), group_size=args.num_generations)
                engine.backward(logp[ckpt, on].sum())
                grads[ckpt, on] = torch.cat([safe_get_full_grad(p).flatten() for p in engine.module.parameters()])
                engine.optimizer.zero_grad()
        vlm.SHARED_PREFIX = True
        (out / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "world": world, "checksum": checksum, "texts": rollout["texts"],
            "grad_max": grads[False, False].abs().max().item(), **{
                f"{name}shared_prefix{what}": (value[ckpt, True] - value[ckpt, False]).abs().max().item()
                for ckpt, name in ((False, ""), (True, "checkpointed_"))
                for what, value in (("_max_diff", logp), ("_grad_max_diff", grads))}}))


# ============================================================================ 6. command line
def main(argv=None):
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]  # deepspeed's
    if argv[:1] == ["grpo"]:
        grpo_colour(argv[1:])
        return run.exit_finished()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    base = sub.add_parser("base", help="build the tiny base: the tiny model SFT-trained on shapes world, stage by stage")
    base.add_argument("--out", required=True)
    base.add_argument("--plan", default=format_plan(BASE_PLAN),
                      help="stages as STAGE:STEPS,... with STAGE one of " + ", ".join(PROBE_POOLS) + " (look "
                           "questions) or formats (every pipeline format); '' for random weights. Default: the "
                           "shipped base's recipe")
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--n-train", type=int, default=400, help="shapes-world training scenes per task")
    base.add_argument("--init", default=None, help="continue from this saved model (default: from scratch)")
    base.add_argument("--pixels", type=int, default=BASE_PIXELS,
                      help="resize every image to about PIXELS x PIXELS (224: 64 image tokens; 0: the processor's 112)")
    base.add_argument("--no-scores", action="store_true",
                      help="skip the greedy scores on 128 test scenes per task (a quick curriculum probe)")
    record = sub.add_parser("record", help="(re)compute the scores in a built base's build.json")
    record.add_argument("dir")
    clip = sub.add_parser("clip", help="build the shapes CLIP (Seg-RISE's default scorer) and report it")
    clip.add_argument("--out", default=str(seg_rise.SHAPES_CLIP), help="folder (default: shapes-clip/, where "
                                                                       "seg_rise.py looks)")
    clip.add_argument("--seed", type=int, default=0)
    clip.add_argument("--test", default=None, help="seg manifest for the reward profile (default: shapes world)")
    scores = sub.add_parser("scores", help="greedy scores of a model on every shapes-world test task")
    scores.add_argument("--model", default=TINY_BASE)
    scores.add_argument("--data", default=None, help="shapes-world root (default: 128 test scenes per task, "
                                                     "seed 0, made once in the cache)")
    scores.add_argument("--n", type=int, default=None, help="test samples per task (default all)")
    scores.add_argument("--json", action="store_true", help="print only the JSON line")
    scores.add_argument("--answer-only", action="store_true",
                        help="the answer-only prompts (plain, seg_no_cot) instead of the think-first ones")
    args = parser.parse_args(argv)
    if args.command == "base":
        try:
            plan = parse_plan(args.plan)
        except ValueError as e:
            parser.error(f"--plan: {e}")
        build_tiny(args.out, seed=args.seed, plan=plan, n_train=args.n_train, init=args.init,
                   pixels=args.pixels or None, record_scores=not args.no_scores)
    elif args.command == "record":
        record_build_scores(args.dir)
    elif args.command == "clip":
        torch.manual_seed(args.seed)
        folder = build_shapes_clip(args.out, seed=args.seed)
        test, _ = data.read_manifest(args.test or run.shapes_world(0) / "seg" / "test.jsonl", "seg")
        print(json.dumps({**json.loads((folder / "config.json").read_text()),
                          "reward_profile_on_seg_test": scorer_profile(seg_rise.load_clip("shapes", folder), test)},
                         indent=1))
    else:
        model, processor = load_model(args.model)
        root = args.data or scores_world()
        result = task_scores(model, processor, root, n=args.n, answer_only=args.answer_only)
        result["grounding_gap_nats"] = grounding_gap(model, processor, root, n=args.n)
        if not args.json:
            for task, values in result.items():
                if isinstance(values, dict):
                    print(f"{task:11s} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in values.items()))
            print(f"grounding: answer loss with shuffled images minus with the right ones "
                  f"{result['grounding_gap_nats']:.3f} nats/token")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
