"""vlm.py -- everything that touches the vision-language model (SPEC sections 3, 4.1, 4.4).

  1. loading       load_model(): a hub id or local dir, Qwen2-VL / Qwen2.5-VL, sdpa or flash-attn 2
  2. chat inputs   chat_inputs(): chat messages + images -> a left-padded batch
  3. sampling      sample(): G completions per prompt in one generate() call
  4. log-probs     completion_logprobs(): completion tokens only, temperature applied, masked
  5. SFT           sft_loss(): next-token loss on the assistant turns only
  6. coordinates   to_model_frame() / from_model_frame(): the one place boxes change frame
  7. DeepSpeed     init_distributed(), deepspeed_engine(), gathered() for ZeRO-3 generation
  8. tiny model    build_tiny(): a Qwen2-VL-architecture model small enough for a laptop CPU,
                   with its own tokenizer, optionally SFT-"pretrained" on shapes world
  9. command line  python vlm.py tiny --out DIR [--pretrain] [--seed S]

The tiny model uses the same classes as Qwen2-VL-2B (Qwen2VLForConditionalGeneration,
Qwen2VLProcessor), so every pipeline runs the same code on both.
"""
import argparse
import contextlib
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import rewards

# Tokens that must never be sampled: a stray <|image_pad|> in a completion makes the next
# forward pass fail with "image features and image tokens do not match".
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CACHE = Path(os.environ.get("RISE_CACHE", Path.home() / ".cache" / "rise-from-scratch"))
TINY_BASE = "tiny-base"   # the default --model of every script: built (and cached) on first use


def on_gpu():
    return torch.cuda.is_available()


# ============================================================================ 1. loading
def resolve_model(name):
    """`tiny-base` -> the cached pretrained tiny model (built if missing); anything else as is."""
    if name != TINY_BASE:
        return name
    path = CACHE / "tiny-base"
    if not (path / "config.json").exists():
        print(f"[vlm] building the tiny base model in {path} (once; a few CPU minutes)")
        build_tiny(path, seed=0, pretrain=True)
    return str(path)


def default_shapes_world(seed=0):
    """The default data of every script: shapes world in the cache, made once (~2 s)."""
    root = CACHE / f"shapes-{seed}"
    if not (root / "vqa" / "test.jsonl").exists():
        data.make_shapes_world(root, seed=seed)
    return root


def load_model(name, device=None, dtype=None, max_pixels=None):
    """Load (model, processor) from a hub id or local dir. trust_remote_code stays off.

    flash-attention 2 when it is importable and a GPU is present, else PyTorch sdpa;
    bf16 on GPU, fp32 on CPU. `max_pixels` caps the image size the processor feeds the model
    (the RISE paper uses 401,408).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor
    name = resolve_model(name)
    device = device or ("cuda" if on_gpu() else "cpu")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    attn = "sdpa"
    if str(device).startswith("cuda"):
        try:
            import flash_attn  # noqa: F401
            attn = "flash_attention_2"
        except ImportError:
            pass
    model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, attn_implementation=attn)
    processor = AutoProcessor.from_pretrained(name, padding_side="left")
    if max_pixels:
        processor.image_processor.max_pixels = max_pixels
        processor.image_processor.size["longest_edge"] = max_pixels
    processor.tokenizer.padding_side = "left"
    return model.to(device), processor


# ============================================================================ 2. chat inputs
def user_turn(text, n_images=1):
    """One user message: `n_images` image placeholders, then the text."""
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def assistant_turn(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def chat_inputs(processor, conversations, images, add_generation_prompt=True, max_prompt_len=None):
    """Render chat conversations with the processor's template and batch them, left-padded.

    conversations: list of message lists; images: list (per conversation) of PIL images, in the
    order their placeholders appear. Returns the processor's BatchFeature (input_ids,
    attention_mask, pixel_values, image_grid_thw, mm_token_type_ids).
    A prompt longer than `max_prompt_len` tokens is rejected, never cut: cutting could split
    its image tokens, which crashes Qwen-VL.
    """
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt)
             for c in conversations]
    flat = [im.convert("RGB") for ims in images for im in ims]
    batch = processor(text=texts, images=flat or None, padding=True, return_tensors="pt")
    if max_prompt_len is not None:
        lengths = batch["attention_mask"].sum(1)
        too_long = [i for i, n in enumerate(lengths.tolist()) if n > max_prompt_len]
        if too_long:
            detail = ", ".join(f"prompt {i} has {lengths[i].item()} tokens" for i in too_long)
            raise PromptTooLong(f"{detail} > max_prompt_len={max_prompt_len}; shorten the text or lower "
                                "max_pixels (a prompt is never cut: that could split its image tokens)")
    return batch


class PromptTooLong(ValueError):
    pass


def images_per_sample(input_ids, vision_start_id):
    """How many images each row holds: one <|vision_start|> per image."""
    return (input_ids == vision_start_id).sum(1).tolist()


def repeat_batch(batch, repeats, vision_start_id):
    """Repeat every sample `repeats` times in place order (s0,s0,..,s1,s1,..).

    pixel_values is a flat [sum of patches, D] tensor: the rows of image k are
    image_grid_thw[k].prod() rows. Repeating it wholesale is only right for batch 1 (a bug in
    several public GRPO repos), so each sample's own image rows are repeated with it.
    """
    out = {k: v.repeat_interleave(repeats, 0) for k, v in batch.items()
           if k not in ("pixel_values", "image_grid_thw")}
    if "pixel_values" in batch:
        rows = batch["image_grid_thw"].prod(-1).tolist()
        per_image = list(torch.split(batch["pixel_values"], rows))
        counts = images_per_sample(batch["input_ids"], vision_start_id)
        pixels, grids, k = [], [], 0
        for n in counts:
            for _ in range(repeats):
                pixels += per_image[k:k + n]
                grids.append(batch["image_grid_thw"][k:k + n])
            k += n
        out["pixel_values"] = torch.cat(pixels)
        out["image_grid_thw"] = torch.cat(grids)
    return out


# ============================================================================ 3. sampling
def suppressed_ids(processor):
    tok = processor.tokenizer
    return [i for i in tok.convert_tokens_to_ids(VISION_TOKENS) if i is not None and i != tok.unk_token_id]


def eos_ids(processor):
    tok = processor.tokenizer
    return sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id} - {None})


def completion_mask_from_ids(completion_ids, eos):
    """1 for every token up to and including the first EOS, 0 after it (and for padding)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0          # strictly after the first EOS
    return (~after_eos).long()


@torch.no_grad()
def sample(model, processor, batch, num_generations=1, max_new_tokens=64, temperature=1.0,
           do_sample=True, return_scores=False):
    """Sample `num_generations` completions for every prompt of `batch` in ONE generate() call.

    Returns a dict: prompt tensors repeated per completion (prompt-major: prompt 0's G samples
    first), completion_ids [B*G, T], completion_mask [B*G, T] (0 after EOS), texts (decoded,
    special tokens dropped), and with return_scores the per-token log-probs generate sampled
    from (for tests). Pure sampling: no top-k/top-p, so the log-probs of the policy are exact.
    """
    vision_start = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    expanded = repeat_batch(batch, num_generations, vision_start)
    expanded = {k: v.to(model.device) for k, v in expanded.items()}
    tok = processor.tokenizer
    gen = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, top_k=0, top_p=1.0,
               suppress_tokens=suppressed_ids(processor), eos_token_id=eos_ids(processor),
               pad_token_id=tok.pad_token_id, output_scores=return_scores, return_dict_in_generate=True)
    if do_sample:
        gen["temperature"] = temperature
    else:
        gen.update(temperature=None, top_k=None, top_p=None)
    out = model.generate(**expanded, **gen)
    prompt_len = expanded["input_ids"].shape[1]
    completion_ids = out.sequences[:, prompt_len:]
    if completion_ids.shape[1] == 0:                      # max_new_tokens=0: keep shapes valid
        completion_ids = completion_ids.new_full((completion_ids.shape[0], 1), tok.pad_token_id)
    completion_mask = completion_mask_from_ids(completion_ids, eos_ids(processor))
    result = {"prompt": expanded, "completion_ids": completion_ids, "completion_mask": completion_mask,
              "texts": tok.batch_decode(completion_ids * completion_mask + tok.pad_token_id * (1 - completion_mask),
                                        skip_special_tokens=True)}
    if return_scores:
        scores = torch.stack(out.scores, 1).float().log_softmax(-1)        # [N, T, V], temperature applied
        result["sampled_logp"] = scores.gather(-1, completion_ids[:, :scores.shape[1], None]).squeeze(-1)
    return result


@contextlib.contextmanager
def generation_mode(model):
    """Eval mode, gradient checkpointing off and (ZeRO-3) full weights while generating."""
    was_training, checkpointing = model.training, getattr(model, "is_gradient_checkpointing", False)
    model.eval()
    if checkpointing:
        model.gradient_checkpointing_disable()
    try:
        with gathered(model):
            yield
    finally:
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train(was_training)


# ============================================================================ 4. log-probs
def completion_logprobs(model, prompt, completion_ids, completion_mask, temperature=1.0, suppress=None,
                        chunk_rows=8, one_piece_bytes=2 ** 28):
    """Per-token log-probs [N, T] of `completion_ids` given the (already repeated) prompt tensors.

    One forward over prompt + completion, but logits only for the T completion positions, and
    only `chunk_rows` rows at a time: Qwen's vocabulary has 151k entries, so [N, T, V] fp32
    logits for a whole GRPO batch (8 x 8 x 256) would be ~10 GB per copy. Each chunk's logits are
    recomputed in backward (checkpoint) instead of kept; a batch whose logits fit in 256 MB is
    scored in one piece (recomputing would only cost time). Logits are divided by the sampling
    temperature and the `suppress` ids masked exactly as in sampling, so these are the log-probs
    of the distribution we sampled from. Positions after EOS (mask 0) are set to 0.
    """
    module = getattr(model, "module", model)                      # a DeepSpeed engine -> the HF model
    input_ids = torch.cat([prompt["input_ids"], completion_ids], 1)
    attention_mask = torch.cat([prompt["attention_mask"], completion_mask.to(prompt["attention_mask"].dtype)], 1)
    extra = {k: v for k, v in prompt.items() if k in ("pixel_values", "image_grid_thw")}
    if "mm_token_type_ids" in prompt:                     # completion tokens are text (type 0)
        extra["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion_ids)], 1)
    T = completion_ids.shape[1]
    hidden = module.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                          **extra).last_hidden_state[:, -(T + 1):-1]    # [N, T, H]: position t predicts token t
    head, rows = module.get_output_embeddings(), []
    if hidden.shape[0] * T * head.out_features * 4 <= one_piece_bytes:   # small fp32 logits: one piece
        return _token_logp(head, hidden, completion_ids, temperature, suppress) * completion_mask
    for i in range(0, len(hidden), chunk_rows):
        args = (head, hidden[i:i + chunk_rows], completion_ids[i:i + chunk_rows], temperature, suppress)
        rows.append(torch.utils.checkpoint.checkpoint(_token_logp, *args, use_reentrant=False)
                    if torch.is_grad_enabled() else _token_logp(*args))
    return torch.cat(rows) * completion_mask


def _token_logp(head, hidden, ids, temperature, suppress):
    """log p(ids) = logit(ids) - logsumexp(logits): the [.., V] log-softmax is never stored."""
    logits = head(hidden).float() / temperature                   # [n, T, V]
    if suppress:
        logits[..., suppress] = float("-inf")
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def completion_tensors(processor, texts, device=None):
    """Given completion texts -> (completion_ids, completion_mask) [N, T], each ending in
    <|im_end|> and right-padded: the form completion_logprobs() scores (DPO's chosen/rejected)."""
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    seqs = [tok.encode(t, add_special_tokens=False) + [end] for t in texts]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return ids.to(device or "cpu"), mask.to(device or "cpu")


# ============================================================================ 5. SFT
def assistant_mask(input_ids, processor):
    """1 on the tokens of every assistant turn (its text and closing <|im_end|>), 0 elsewhere."""
    tok = processor.tokenizer
    start = tok.convert_tokens_to_ids("<|im_start|>")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    header = tok.encode("assistant\n", add_special_tokens=False)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(input_ids.tolist()):
        inside = False
        for t in range(len(ids)):
            if ids[t] == start and ids[t + 1:t + 1 + len(header)] == header:
                inside, skip = True, len(header) + 1
            if inside:
                if skip > 0:
                    skip -= 1
                else:
                    mask[row, t] = 1
                    inside = ids[t] != end
    return mask


def sft_loss(model, processor, conversations, images):
    """Mean next-token cross-entropy over the assistant tokens only (prompt tokens masked)."""
    batch = chat_inputs(processor, conversations, images, add_generation_prompt=False)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    target_mask = assistant_mask(batch["input_ids"], processor) * batch["attention_mask"]
    logits = model(**batch, use_cache=False).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    mask = target_mask[:, 1:].float()
    loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1)


# ============================================================================ 6. coordinates
def coord_scale(model_type, image_size, processor=None):
    """(sx, sy) such that model_coord = pixel * s.

    Qwen2-VL writes boxes in a 0..1000 frame normalised to the image; Qwen2.5-VL writes
    absolute pixels of the *resized* input the processor made (smart_resize).
    """
    w, h = image_size
    if model_type == "qwen2_5_vl":
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
        ip = processor.image_processor
        factor = ip.patch_size * ip.merge_size
        rh, rw = smart_resize(h, w, factor=factor, min_pixels=ip.size["shortest_edge"],
                              max_pixels=ip.size["longest_edge"])
        return rw / w, rh / h
    return 1000.0 / w, 1000.0 / h


def to_model_frame(box, model_type, image_size, processor=None):
    """Original-image pixels -> the model's coordinate frame (integers)."""
    sx, sy = coord_scale(model_type, image_size, processor)
    return [round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)]


def from_model_frame(box, model_type, image_size, processor=None):
    """The model's coordinate frame -> original-image pixels (floats)."""
    sx, sy = coord_scale(model_type, image_size, processor)
    return [box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy]


# ============================================================================ 7. DeepSpeed
def init_distributed(force=False):
    """Start torch.distributed; returns (rank, world_size).

    Under the `deepspeed` launcher (or torchrun) the environment names the rank and world size.
    With `force`, a plain `python script.py` becomes a one-rank world, so the same DeepSpeed
    code path runs everywhere. On CPU, DeepSpeed's CPU accelerator talks gloo: this is how
    `deepspeed --num_gpus 2 script.py` runs two real ranks on a laptop (and in CI).
    """
    if "WORLD_SIZE" not in os.environ:
        if not force:
            return 0, 1
        import socket
        with socket.socket() as s:                 # a free port for the one-rank group
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    import atexit
    import deepspeed
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu() else "gloo")
        # tear the process group down before the interpreter does: otherwise its threads can
        # abort the exit ("terminate called without an active exception", exit code 250)
        atexit.register(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())
    if on_gpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def deepspeed_config(path, lr, weight_decay=0.1, grad_accum=1, micro_batch=1, grad_clip=1.0):
    """Read a ZeRO JSON config and fill the fields our command-line arguments own."""
    cfg = json.loads(Path(path).read_text())
    cfg.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=grad_accum,
               gradient_clipping=grad_clip)
    cfg.pop("train_batch_size", None)
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay,
                                                     "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True}}
    cfg.setdefault("bf16", {})["enabled"] = on_gpu()
    return cfg


def deepspeed_engine(model, cfg):
    """Wrap the policy in a DeepSpeed engine (optimizer included); returns the engine."""
    import deepspeed
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                      if p.requires_grad], config=cfg)
    return engine


def reference_model(name, cfg, device=None, max_pixels=None):
    """The frozen reference policy for the KL term (SPEC 4.4).

    Under ZeRO-3 it is wrapped as an optimizer-less DeepSpeed engine, so it is sharded like the
    policy; otherwise each rank keeps a full frozen copy.
    """
    model, _ = load_model(name, device=device, max_pixels=max_pixels)
    model.requires_grad_(False).eval()
    if cfg.get("zero_optimization", {}).get("stage", 0) == 3:
        import deepspeed
        inference_cfg = {k: v for k, v in cfg.items() if k not in ("optimizer", "scheduler")}
        model = deepspeed.initialize(model=model, config=inference_cfg)[0]
        model.eval()
    return model


def training_models(args, lr=None):
    """The policy as a DeepSpeed engine (optimizer inside) and, when args.beta > 0, its frozen
    reference; returns (engine, processor, ref, cfg). Shared by every GRPO pipeline."""
    model, processor = load_model(args.model, max_pixels=args.max_pixels)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = deepspeed_config(args.deepspeed or Path(__file__).with_name("ds_zero2.json"), lr=lr or args.lr,
                           weight_decay=args.weight_decay, grad_accum=args.grad_accum)
    engine = deepspeed_engine(model, cfg)
    ref = reference_model(args.model, cfg, device=engine.device, max_pixels=args.max_pixels) if args.beta else None
    return engine, processor, ref, cfg


@contextlib.contextmanager
def gathered(model):
    """Full parameters for generation under ZeRO-3; a no-op otherwise.

    Sharded generation works but gathers every layer at every decoding step (unusably slow),
    so the whole model is gathered once for the rollout and re-partitioned afterwards.
    """
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(params):
        yield


# ============================================================================ 8. tiny model
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + VISION_TOKENS
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
# The Qwen2-VL chat format without its default system prompt (shorter sequences on CPU).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
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


def tiny_model(tokenizer, seed=0):
    """A randomly initialised Qwen2VLForConditionalGeneration of ~3M parameters."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    hidden, heads = 192, 6                      # head_dim 32: mrope sections must sum to 32 / 2
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=heads, num_key_value_heads=2,
                         max_position_embeddings=4096, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
                         rope_theta=10000.0, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
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


def build_tiny(out, seed=0, pretrain=False, steps=None, log=print):
    """Build the tiny model + processor in `out` (save_pretrained: loadable offline by path).

    The tokenizer is trained on shapes-world text (the pretraining corpus below), so it is
    the same whether or not the model is pretrained. With `pretrain`, the model is SFT-trained
    from scratch on that corpus: the "tiny base" every pipeline starts from.
    """
    out = Path(out)
    t0 = time.time()
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    world = CACHE / f"shapes-pretrain-{seed}"
    if not (world / "vqa" / "test.jsonl").exists():
        data.make_shapes_world(world, n_train=400, n_test=1, seed=1000 + seed)
    examples = pretrain_corpus(world, seed)
    tokenizer = build_tokenizer(corpus_text(examples))
    processor = tiny_processor(tokenizer)
    model = tiny_model(tokenizer, seed)
    if pretrain:
        pretrain_sft(model, processor, examples, seed, steps=steps, log=log)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "build.json").write_text(json.dumps({"seed": seed, "pretrain": pretrain, "examples": len(examples),
                                                "seconds": round(time.time() - t0, 1)}))
    publish_dir(tmp, out)
    log(f"[vlm] tiny model ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"pretrain={pretrain}) written to {out} in {time.time() - t0:.0f}s")
    return out


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


def pretrain_corpus(root, seed=0):
    """SFT examples (conversation, images) in every prompt format the pipelines use.

    Targets carry deliberate noise (jittered boxes, perturbed distributions), so the tiny base
    answers in the right format but imperfectly: RL has room to improve it.
    """
    rng = np.random.default_rng(seed)
    frame = lambda box: to_model_frame(box, "qwen2_vl", (data.IMAGE_SIZE, data.IMAGE_SIZE))  # noqa: E731
    examples = []
    for task in data.SHAPE_TASKS:
        records, _ = data.read_manifest(Path(root) / task / "train.jsonl", data.MANIFEST_TASK[task])
        for rec in records:
            image = Image.open(rec["image_path"]).convert("RGB")
            scene = rec["scene"]

            def add(prompt, answer, extra_turns=(), extra_images=()):
                conv = [user_turn(prompt), assistant_turn(answer)] + list(extra_turns)
                examples.append((conv, [image] + list(extra_images)))

            if task in ("soft_cls", "onehot_cls"):
                classes = rec["classes"]
                mask_names = task == "soft_cls" and bool(rng.integers(2))
                desc = data.describe_scene(scene, rng, with_names=not mask_names)
                noisy = data.format_probs(classes, _noisy_probs(rec["probs"], rng))
                add(data.cot_prompt_cls(classes, rec["probs"], mask_names=mask_names), desc)
                add(data.REC_PROMPT_CLS.format(cot=desc, class_list=data.class_list(classes)), noisy)
                add(data.R1_PROMPT_CLS.format(class_list=data.class_list(classes)),
                    f"<think>{data.describe_scene(scene, rng)}</think><answer>{noisy}</answer>")
                add(data.PLAIN_PROMPT_CLS.format(class_list=data.class_list(classes)), noisy)
            elif task in ("det", "multi_det"):
                multi = task == "multi_det"
                target = rec["target"]
                boxes = [frame(b) for b in rec["boxes"]]
                noisy = [frame(_jitter_box(b, rng)) for b in rec["boxes"]]
                answer = data.format_boxes(noisy) if multi else data.format_box(noisy[0])
                target_shape = None if multi else next(s for s in scene if s["box"] == rec["boxes"][0])
                desc = data.describe_scene(scene, rng, target=target_shape)
                add(data.cot_prompt_det(target, boxes, multi=multi), desc)
                rec_prompt = data.REC_PROMPT_MULTI_DET if multi else data.REC_PROMPT_DET
                add(rec_prompt.format(cot=desc, target=target), answer)
                r1 = data.R1_PROMPT_MULTI_DET if multi else data.R1_PROMPT_DET
                add(r1.format(target=target), f"<think>{desc}</think><answer>{answer}</answer>")
                plain = data.PLAIN_PROMPT_MULTI_DET if multi else data.PLAIN_PROMPT_DET
                add(plain.format(target=target), answer)
            elif task == "seg":
                box = _jitter_box(rec["box"], rng)
                x1, y1, x2, y2 = rec["box"]
                points = [[(x1 * 2 + x2) / 3, (y1 + y2 * 2) / 3], [(x1 + x2 * 2) / 3, (y1 + y2 * 2) / 3]]
                fb = frame(box)
                fp = [frame(p + p)[:2] for p in points]
                target_shape = next(s for s in scene if s["box"] == rec["box"])
                answer = json.dumps({"bbox": fb, "points": fp})
                add(data.SEG_PROMPT.format(instruction=rec["instruction"]),
                    f"<think>{data.describe_scene(scene, rng, target=target_shape)}</think><answer>{answer}</answer>")
                add(data.SEG_PROMPT_NO_COT.format(instruction=rec["instruction"]), f"<answer>{answer}</answer>")
            elif task == "vqa":
                q, a = rec["question"], rec["answer"]
                box = _jitter_box(rec["box"], rng)
                crop = image.crop(box)
                add(data.VISRL_BOX_PROMPT.format(question=q), data.format_norm_box(box, *image.size),
                    [user_turn(data.VISRL_ANSWER_PROMPT.format(question=q)), assistant_turn(a)], [crop])
                examples.extend(_critic_examples(q, a, scene, image, rng))
    order = rng.permutation(len(examples))
    return [examples[i] for i in order]


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


def warmup_cosine(optimizer, steps, warmup):
    """lr x min(1, (s+1)/warmup) x (1 + cos(pi s / steps)) / 2: linear warm-up, then cosine to 0."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))


def pretrain_sft(model, processor, examples, seed=0, steps=None, batch_size=16, lr=3e-3, log=print):
    """Plain SFT from scratch (AdamW, cosine schedule) on the assistant tokens of `examples`."""
    steps = steps or int(os.environ.get("RISE_TINY_STEPS", 2400))
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, steps, warmup=50)
    model.train()
    bar = tqdm(range(steps), desc="pretrain tiny base", mininterval=5)
    for step in bar:
        idx = torch.randint(len(examples), (batch_size,), generator=g).tolist()
        convs, ims = zip(*[examples[i] for i in idx])
        loss = sft_loss(model, processor, list(convs), list(ims))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def _greedy(model, processor, conversations, images, max_new_tokens):
    batch = chat_inputs(processor, conversations, images)
    return sample(model, processor, batch, 1, max_new_tokens, do_sample=False)["texts"]


@torch.no_grad()
def task_scores(model, processor, root, n=None, batch_size=16, max_new_tokens=96):
    """Greedy scores of a model on every shapes-world test task, with the pipelines' prompts.

    soft_cls: mean JSD (unparsable = ln 2); onehot_cls: accuracy; det / multi_det: mAP@0.5;
    seg: mean IoU of the predicted box with the GT box; vqa: answer accuracy after the box +
    crop turns, and box accuracy (IoU >= 0.5). `unparsable` counts answers that did not parse.
    """
    model.eval()
    model_type, scores = model.config.model_type, {}
    for task in data.SHAPE_TASKS:
        records, _ = data.read_manifest(Path(root) / task / "test.jsonl", data.MANIFEST_TASK[task])
        records = records[:n]
        results, bad = [], 0
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            images = [Image.open(r["image_path"]).convert("RGB") for r in chunk]
            if task in ("soft_cls", "onehot_cls"):
                prompt = lambda r: data.R1_PROMPT_CLS.format(class_list=data.class_list(r["classes"]))  # noqa: E731
            elif task in ("det", "multi_det"):
                tmpl = data.R1_PROMPT_MULTI_DET if task == "multi_det" else data.R1_PROMPT_DET
                prompt = lambda r: tmpl.format(target=r["target"])  # noqa: E731
            elif task == "seg":
                prompt = lambda r: data.SEG_PROMPT.format(instruction=r["instruction"])  # noqa: E731
            else:
                prompt = lambda r: data.VISRL_BOX_PROMPT.format(question=r["question"])  # noqa: E731
            texts = _greedy(model, processor, [[user_turn(prompt(r))] for r in chunk], [[im] for im in images],
                            max_new_tokens)
            for r, im, text in zip(chunk, images, texts):
                answer = rewards.answer_text(text) if task != "vqa" else text
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
            crops = [[im, rewards.crop_box(im, b)] for b, r, im in answered]
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


# ============================================================================ 9. command line
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="build the tiny Qwen2-VL-architecture model")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--pretrain", action="store_true", help="SFT it on shapes world (the tiny base)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--steps", type=int, default=None, help="pretraining steps (default 2400, or RISE_TINY_STEPS)")
    scores = sub.add_parser("scores", help="greedy scores of a model on every shapes-world test task")
    scores.add_argument("--model", default=TINY_BASE)
    scores.add_argument("--data", default=None, help="shapes-world root (default: built in the cache)")
    scores.add_argument("--n", type=int, default=None, help="test samples per task (default all)")
    args = parser.parse_args(argv)
    if args.command == "tiny":
        build_tiny(args.out, seed=args.seed, pretrain=args.pretrain, steps=args.steps)
    else:
        model, processor = load_model(args.model)
        result = task_scores(model, processor, args.data or default_shapes_world(), n=args.n)
        for task, values in result.items():
            print(f"{task:11s} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in values.items()))
        print(json.dumps(result))


if __name__ == "__main__":
    main()
