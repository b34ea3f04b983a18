"""vlm.py -- everything that touches the vision-language model, the same for the tiny base and Qwen2-VL-2B.

  1. loading        load_model(): a hub id or local dir, Qwen2-VL / Qwen2.5-VL, sdpa or flash-attn 2
  2. chat inputs    chat_inputs(): chat messages + images -> a left-padded batch; select_rows()
  3. sampling       sample(): G completions per prompt in one generate() call, each prompt prefilled once
  4. log-probs      completion_logprobs(): completion tokens only, temperature and suppression applied,
                    each prompt run once for its group (gradient checkpointing on or off)
  5. SFT            sft_loss(): next-token loss on the assistant turns only
  6. coordinates    to_model_frame() / from_model_frame(): the one place boxes change frame
  7. ZeRO-3         gathered(): full weights, module hooks lifted, while generating
  8. DPO pairs      pair_logps(): chosen and rejected summed log-probs, each prompt run once
  9. LoRA           add_lora(), merged_state_dict(), freeze_vision()
 10. the GRPO step  grpo_step() (rollout -> reward -> update), grpo_update() (advantages -> loss -> update),
                    update() (a non-finite loss skips the update on every rank)
"""
import contextlib
import importlib.util
import inspect
import json
import math
import os
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

import data
import dpo
import grpo

# Tokens that must never be sampled: a stray <|image_pad|> in a completion makes the next
# forward pass fail with "image features and image tokens do not match".
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CACHE = Path(os.environ.get("RISE_CACHE", Path.home() / ".cache" / "rise-from-scratch"))
# sample(num_generations > 1) and completion_logprobs(group_size > 1) run each prompt once (shared
# prefix); False: the plain path, every row in full (the reference; run.py --no-shared-prefix)
SHARED_PREFIX = True
TINY_BASE = "tiny-base"   # the default --model of every script: the tiny base shipped in tiny-base/


def on_gpu():
    return torch.cuda.is_available()


# ============================================================================ 1. loading
def resolve_model(name):
    """`tiny-base` -> the tiny base committed beside this file (`tiny-base/`, loaded offline);
    anything else is returned as is (a hub id or a local dir)."""
    if name != TINY_BASE:
        return name
    shipped = Path(__file__).resolve().parent / TINY_BASE
    if not (shipped / "config.json").exists():
        raise FileNotFoundError(f"{shipped} is missing: `git checkout tiny-base` or rebuild it with "
                                "`python tiny.py base --out tiny-base` (hours on a CPU, see README)")
    return str(shipped)


def is_tiny(model):
    """The tiny base, or a local dir holding a model as small as it (its config says so)."""
    if model == TINY_BASE:
        return True
    config = Path(model) / "config.json"
    if not config.is_file():
        return False
    cfg = json.loads(config.read_text())
    return cfg.get("text_config", cfg).get("hidden_size", 1e9) <= 512


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
    flash = str(device).startswith("cuda") and importlib.util.find_spec("flash_attn") is not None
    attn = "flash_attention_2" if flash else "sdpa"
    model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, attn_implementation=attn)
    processor = AutoProcessor.from_pretrained(name, padding_side="left")
    if max_pixels:
        set_pixel_limits(processor.image_processor, max_pixels=max_pixels)
    processor.tokenizer.padding_side = "left"
    return model.to(device), processor


def set_pixel_limits(image_processor, min_pixels=None, max_pixels=None):
    """Bound the pixels an image is resized to (Qwen2-VL: size's shortest_edge / longest_edge are pixel
    counts; the deprecated min_pixels / max_pixels attributes only where a version still has them)."""
    for key, name, value in (("shortest_edge", "min_pixels", min_pixels), ("longest_edge", "max_pixels", max_pixels)):
        if value is not None:
            image_processor.size[key] = value
            if getattr(image_processor, name, None) is not None:
                setattr(image_processor, name, value)


# ============================================================================ 2. chat inputs
def user_turn(text, n_images=1):
    """One user message: `n_images` image placeholders, then the text."""
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def assistant_turn(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def chat_inputs(processor, conversations, images, add_generation_prompt=True, max_prompt_len=None):
    """Render chat conversations with the processor's template and batch them, left-padded.

    conversations: list of message lists; images: per conversation, its PIL images in placeholder
    order. Returns the processor's BatchFeature (input_ids, attention_mask, pixel_values,
    image_grid_thw, mm_token_type_ids). Raises PromptTooLong for a prompt over `max_prompt_len`
    tokens: it is never cut (that could split its image tokens, which crashes Qwen-VL)."""
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt)
             for c in conversations]
    flat = [data.open_image(im) for ims in images for im in ims]     # alpha on white, as opened
    batch = processor(text=texts, images=flat or None, padding=True, return_tensors="pt")
    too_long = [f"prompt {i} has {n} tokens" for i, n in enumerate(batch["attention_mask"].sum(1).tolist())
                if max_prompt_len is not None and n > max_prompt_len]
    if too_long:
        raise PromptTooLong(f"{', '.join(too_long)} > max_prompt_len={max_prompt_len}; shorten the text or lower "
                            "max_pixels (a prompt is never cut: that could split its image tokens)")
    return batch


class PromptTooLong(ValueError):
    """A prompt over max_prompt_len tokens (chat_inputs)."""


def prompt_problem(processor, conversation, images, max_prompt_len=None):
    """Why one chat prompt cannot be processed, or None: a prompt over max_prompt_len tokens, an
    image that cannot be opened or that the processor refuses. For run.usable's pre-scan."""
    try:
        chat_inputs(processor, [conversation], [images], max_prompt_len=max_prompt_len)
    except (ValueError, OSError) as e:                     # PromptTooLong is a ValueError
        return f"{type(e).__name__}: {e}"
    return None


def select_rows(batch, rows, vision_start_id):
    """The samples `rows` (indices, repeats allowed) of a processor batch, in that order.

    pixel_values is a flat [sum of patches, D] tensor: the rows of image k are
    image_grid_thw[k].prod() rows. Repeating it wholesale is only right for batch 1 (a bug in
    several public GRPO repos), so each sample's own image rows go with it.
    """
    index = torch.as_tensor(rows, dtype=torch.long)
    out = {k: v[index.to(v.device)] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    if "pixel_values" in batch:
        per_image = torch.split(batch["pixel_values"], batch["image_grid_thw"].prod(-1).tolist())
        counts = (batch["input_ids"] == vision_start_id).sum(1).tolist()       # images per sample
        starts = [sum(counts[:i]) for i in range(len(counts))]
        images = [k for r in index.tolist() for k in range(starts[r], starts[r] + counts[r])]
        out["pixel_values"] = torch.cat([per_image[k] for k in images])
        out["image_grid_thw"] = batch["image_grid_thw"][images]
    return out


def repeat_batch(batch, repeats, vision_start_id):
    """Repeat every sample `repeats` times in place order (s0,s0,..,s1,s1,..): select_rows()."""
    n = batch["input_ids"].shape[0]
    return select_rows(batch, [i for i in range(n) for _ in range(repeats)], vision_start_id)


# ============================================================================ 3. sampling
def suppressed_ids(processor):
    tok = processor.tokenizer
    return [i for i in tok.convert_tokens_to_ids(VISION_TOKENS) if i is not None and i != tok.unk_token_id]


def eos_ids(processor, model=None):
    """The token ids that end a completion, sorted: the tokenizer's eos, <|im_end|> (a chat turn's end)
    and, given the model, every id of its generation_config's and config's eos_token_id (an int or a
    list: Qwen's instruct checkpoints list <|im_end|> and <|endoftext|>, and generate() with their own
    config stops at either). sample() stops at each; its completion mask ends at the first."""
    tok = processor.tokenizer
    ids = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    if model is not None:
        module = hf_model(model)
        for config in (getattr(module, "generation_config", None), module.config.get_text_config()):
            declared = getattr(config, "eos_token_id", None)
            ids.update(declared if isinstance(declared, (list, tuple)) else [declared])
    return sorted(ids - {None})


def completion_mask_from_ids(completion_ids, eos):
    """1 for every token up to and including the first of any EOS id in `eos` (eos_ids()), 0 after
    it (and for padding). completion_ids [N, T] -> [N, T] long."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0          # strictly after the first EOS
    return (~after_eos).long()


def hf_model(model):
    """The Hugging Face model inside a DeepSpeed engine (.module) and/or a peft LoRA wrapper
    (get_base_model(): its LoRA layers live inside the HF model, so they still apply)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def sample(model, processor, batch, num_generations=1, max_new_tokens=64, temperature=1.0,
           do_sample=True, return_scores=False, repetition_penalty=None):
    """Sample `num_generations` (G) completions for every prompt of `batch` in ONE generate() call.

    Returns a dict: prompt tensors repeated per completion (prompt-major), completion_ids [B*G, T],
    completion_mask [B*G, T] (0 after EOS), texts (special tokens dropped), and with return_scores
    the per-token log-probs generate sampled from. Pure sampling (greedy: argmax) at `temperature`
    with only the vision tokens suppressed, the two changes completion_logprobs() applies, so the
    policy's log-probs are exact. The checkpoint's generation_config (Qwen's repetition_penalty,
    top_k, top_p...) would fill every option left unset: it is swapped for a blank one meanwhile.
    repetition_penalty (None or 1.0: none): transformers' penalty on every token already in the prompt
    or the completion (RISE-CoT's reconstruction uses 1.2, as its authors' code). The completions then
    come from the penalised distribution while completion_logprobs() scores the policy's own: GRPO's
    log-probs and KL for such tokens are the un-penalised policy's.
    With G > 1 each prompt is prefilled once (shared_prefix_cache), not G times."""
    tok = processor.tokenizer
    eos = eos_ids(processor, model)          # before the checkpoint's generation_config is swapped out
    expanded = repeat_batch(batch, num_generations, tok.convert_tokens_to_ids("<|vision_start|>"))
    expanded = {k: v.to(model.device) for k, v in expanded.items()}
    pure = dict(temperature=temperature, top_k=0, top_p=1.0) if do_sample else dict(temperature=None, top_k=None,
                                                                                      top_p=None)
    gen = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, suppress_tokens=suppressed_ids(processor),
               eos_token_id=eos, pad_token_id=tok.pad_token_id, output_scores=return_scores,
               return_dict_in_generate=True, **pure)
    if repetition_penalty not in (None, 1.0):
        gen["repetition_penalty"] = float(repetition_penalty)
    from transformers import GenerationConfig
    target = hf_model(model)            # a LoRA (peft) wrapper forwards generate() to the HF model
    if (num_generations > 1 and SHARED_PREFIX and "pixel_values" in batch
            and not (target.training and is_checkpointing(target))):
        # each prompt prefilled once (text-only prompts, cheap, and checkpointed training, no cache: plain path)
        gen[cache_argument(target)] = shared_prefix_cache(target, batch, num_generations)
        inputs = {k: v for k, v in expanded.items() if k not in ("pixel_values", "image_grid_thw")}
    else:
        inputs = expanded
    saved = target.generation_config
    target.generation_config = GenerationConfig(bos_token_id=saved.bos_token_id)
    try:
        out = model.generate(**inputs, **gen)
    finally:
        target.generation_config = saved
    prompt_len = expanded["input_ids"].shape[1]
    completion_ids = out.sequences[:, prompt_len:]
    if completion_ids.shape[1] == 0:                      # max_new_tokens=0: keep shapes valid
        completion_ids = completion_ids.new_full((completion_ids.shape[0], 1), tok.pad_token_id)
    completion_mask = completion_mask_from_ids(completion_ids, eos)
    result = {"prompt": expanded, "completion_ids": completion_ids, "completion_mask": completion_mask,
              "texts": tok.batch_decode(completion_ids * completion_mask + tok.pad_token_id * (1 - completion_mask),
                                        skip_special_tokens=True)}
    if return_scores:
        scores = torch.stack(out.scores, 1).float().log_softmax(-1)        # [N, T, V], temperature applied
        result["sampled_logp"] = scores.gather(-1, completion_ids[:, :scores.shape[1], None]).squeeze(-1)
    return result


# transformers 5.24 renamed the KV cache `past_key_values` -> `cache` (output field and forward() argument)
def output_cache(output):
    return output.past_key_values if getattr(output, "cache", None) is None else output.cache


def cache_argument(module):
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def shared_prefix_cache(module, batch, group_size):
    """The KV cache of every prompt of `batch` but its last token, each prompt run ONCE, repeated to
    `group_size` rows per prompt (sample()'s order). generate() runs the last prompt token on it and
    decodes: the plain path's distribution. The M-RoPE offsets (rope_deltas) are repeated too."""
    prefix = {k: v[:, :-1] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
              for k, v in batch.items()}
    cache = output_cache(module.model(**{k: v.to(module.device) for k, v in prefix.items()}, use_cache=True))
    cache.batch_repeat_interleave(group_size)
    module.model.rope_deltas = module.model.rope_deltas.repeat_interleave(group_size, 0)
    return cache


def is_checkpointing(model):
    """Whether gradient (activation) checkpointing is on (the attribute's name changed in transformers 5)."""
    new = hasattr(type(model), "is_activation_checkpointing")      # the old name warns that it is deprecated
    return bool(getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False))


@contextlib.contextmanager
def generation_mode(model):
    """Eval mode, gradient checkpointing off and (ZeRO-3) full weights while generating."""
    was_training, checkpointing = model.training, is_checkpointing(model)
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
                        group_size=1, chunk_rows=None, one_piece_bytes=2 ** 28):
    """Per-token log-probs [N, T] (nats) of `completion_ids` given the (already repeated) prompt tensors.

    One forward over prompt + completion; logits only for the T completion positions, in one piece when
    their fp32 [N, T, V] fit in `one_piece_bytes`, else `chunk_rows` rows at a time (default: as many as fit
    in one_piece_bytes, at least 1) recomputed in backward: Qwen's 151k-entry vocabulary makes the fp32
    logits of a GRPO batch (8 x 8 x 256) ~10 GB, one row of 256 tokens 156 MB. Logits are divided
    by the sampling temperature and the `suppress` ids masked as in sampling: the log-probs of the
    distribution sampled from. Positions after EOS (mask 0) are 0. group_size > 1: rows come in
    groups of copies of one prompt (sample()'s order) and each prompt runs once (shared_prefix_hidden;
    same values and gradients, with or without gradient checkpointing)."""
    module = hf_model(model)                                      # a DeepSpeed engine / LoRA -> the HF model
    T = completion_ids.shape[1]
    if group_size > 1 and SHARED_PREFIX and cache_survives_checkpointing(module):
        hidden = shared_prefix_hidden(module, prompt, completion_ids, completion_mask, group_size)
    else:
        full = dict(full_sequence(prompt, completion_ids, completion_mask),
                    **{k: v for k, v in prompt.items() if k in ("pixel_values", "image_grid_thw")})
        hidden = module.model(**full, use_cache=False).last_hidden_state[:, -(T + 1):-1]   # [N, T, H]: t predicts t
    head, rows = module.get_output_embeddings(), []
    row_bytes = T * head.out_features * 4                                 # one row's fp32 logits
    if hidden.shape[0] * row_bytes <= one_piece_bytes:                    # small logits: one piece
        return _token_logp(head, hidden, completion_ids, temperature, suppress) * completion_mask
    chunk_rows = chunk_rows or max(1, one_piece_bytes // row_bytes)
    for i in range(0, len(hidden), chunk_rows):
        args = (head, hidden[i:i + chunk_rows], completion_ids[i:i + chunk_rows], temperature, suppress)
        rows.append(torch.utils.checkpoint.checkpoint(_token_logp, *args, use_reentrant=False)
                    if torch.is_grad_enabled() else _token_logp(*args))
    return torch.cat(rows) * completion_mask


def full_sequence(prompt, completion_ids, completion_mask):
    """input_ids, attention_mask and mm_token_type_ids (completion tokens are text: type 0) of the
    prompts followed by their completions, [N, P + T] each."""
    tails = {"input_ids": completion_ids, "attention_mask": completion_mask, "mm_token_type_ids": 0 * completion_ids}
    return {k: torch.cat([prompt[k], tail.to(prompt[k].dtype)], 1) for k, tail in tails.items() if k in prompt}


def shared_prefix_hidden(module, prompt, completion_ids, completion_mask, group_size):
    """The hidden states [N, T, H] that predict each completion token, each distinct prompt run ONCE.

    Rows come in groups of `group_size` copies of one prompt (sample()'s order). The distinct prompts
    are prefilled once (with gradients) into a PrefixCache, the completions run on its GroupCache view
    (each prompt's K/V serves its group_size rows); autograd sums a group's gradients through the shared
    prefix, so values and gradients equal the full forward's while a prompt's image tokens pass the model
    once, not G times. Under gradient checkpointing both passes are checkpointed layer by layer, the
    decoder layers keeping the cache meanwhile (cache_under_checkpointing): the recomputation in backward
    neither stores the prefix twice nor sees the completion's K/V. M-RoPE positions come from the whole
    sequences. Raises ValueError unless each group holds copies of one prompt."""
    P, N = prompt["input_ids"].shape[1], completion_ids.shape[0]
    full = full_sequence(prompt, completion_ids, completion_mask)
    positions, _ = module.model.get_rope_index(input_ids=full["input_ids"], attention_mask=full["attention_mask"],
                                               mm_token_type_ids=full.get("mm_token_type_ids"),
                                               image_grid_thw=prompt.get("image_grid_thw"))   # [3, N, P + T]
    first = list(range(0, N, group_size))
    unique = select_rows(prompt, first, module.config.vision_start_token_id)
    again = select_rows(unique, [i for i in range(len(first)) for _ in range(group_size)],
                        module.config.vision_start_token_id)
    if N % group_size or any(not torch.equal(again[k], prompt[k]) for k in prompt):
        raise ValueError(f"group_size {group_size}: every group of rows must hold copies of one prompt")
    argument, cache = cache_argument(module.model), PrefixCache()
    with cache_under_checkpointing(module):
        prefix = module.model(**unique, position_ids=positions[:, first, :P], use_cache=False, **{argument: cache})
        rest = module.model(input_ids=completion_ids, attention_mask=full["attention_mask"], use_cache=False,
                            position_ids=positions[:, :, P:],
                            **{argument: GroupCache(cache, group_size)}).last_hidden_state    # [N, T, H]
    last = prefix.last_hidden_state[:, -1:].repeat_interleave(group_size, 0)      # predicts completion token 0
    return torch.cat([last, rest[:, :-1]], 1)


class PrefixCache(DynamicCache):
    """The KV cache of shared_prefix_hidden's prefix pass, safe to replay: a layer's first forward stores
    its K/V [B, heads, P, head_dim]; a replay of it (gradient checkpointing's recomputation in backward)
    gets its fresh K/V back and stores nothing. Either way update() returns the fresh K/V, as a
    DynamicCache does on an empty layer."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.get_seq_length(layer_idx) == 0:
            super().update(key_states, value_states, layer_idx, *args, **kwargs)
        return key_states, value_states


class GroupCache(DynamicCache):
    """A read-only view of a PrefixCache for `group_size` rows per prefix row (the completion pass):
    update() returns cat(the prefix's K/V repeated to the group, the new K/V) along the sequence and
    stores nothing, so a replay in backward computes exactly what the forward did. The repeat happens
    inside the (checkpointed) layer: only the prefix's B rows are kept, never its N = B x G copies."""

    def __init__(self, prefix, group_size):
        super().__init__()
        self.layers, self.group_size = prefix.layers, group_size      # sequence lengths, masks: the prefix's

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        return tuple(torch.cat([past.repeat_interleave(self.group_size, 0), new], -2)
                     for past, new in ((layer.keys, key_states), (layer.values, value_states)))


def checkpointed_layers(module):
    """The text decoder's layers that gradient checkpointing wraps (GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    return [m for m in module.model.language_model.modules() if isinstance(m, GradientCheckpointingLayer)]


def cache_survives_checkpointing(module):
    """Whether shared_prefix_hidden can run: always without checkpointing (or without gradients); under it,
    when the transformers version lets a layer keep a read-only cache (`_can_checkpoint_with_cache`)."""
    if not (is_checkpointing(module) and module.training and torch.is_grad_enabled()):
        return True
    layers = checkpointed_layers(module)
    return bool(layers) and all(hasattr(m, "_can_checkpoint_with_cache") for m in layers)


@contextlib.contextmanager
def cache_under_checkpointing(module):
    """The text decoder's layers keep the KV cache under gradient checkpointing meanwhile (transformers'
    GradientCheckpointingLayer drops it otherwise, since a replay would write a growing cache twice; the
    PrefixCache / GroupCache replays are idempotent). Set per layer instance and restored after."""
    layers = checkpointed_layers(module)
    saved = [m.__dict__.get("_can_checkpoint_with_cache") for m in layers]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m, old in zip(layers, saved):
            if old is None:
                del m._can_checkpoint_with_cache
            else:
                m._can_checkpoint_with_cache = old


def _token_logp(head, hidden, ids, temperature, suppress):
    """log p(ids) = logit(ids) - logsumexp(logits): the [.., V] log-softmax is never stored."""
    logits = head(hidden).float() / temperature                   # [n, T, V]
    if suppress:
        logits[..., suppress] = float("-inf")
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


# ============================================================================ 5. SFT
def assistant_mask(input_ids, processor):
    """1 on the tokens of every assistant turn (its text and closing <|im_end|>), 0 elsewhere."""
    tok = processor.tokenizer
    header = tok.convert_tokens_to_ids(["<|im_start|>"]) + tok.encode("assistant\n", add_special_tokens=False)
    end, n = tok.convert_tokens_to_ids("<|im_end|>"), len(header)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(input_ids.tolist()):
        inside = False
        for t in range(len(ids)):
            if t >= n - 1 and ids[t - n + 1:t + 1] == header:     # a header ends here: the reply starts next
                inside = True
            elif inside:
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
        if processor is None:
            raise ValueError("Qwen2.5-VL boxes are pixels of the processor's resized input: pass the processor")
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
        ip = processor.image_processor
        factor = ip.patch_size * ip.merge_size
        rh, rw = smart_resize(h, w, factor=factor, min_pixels=ip.size["shortest_edge"],
                              max_pixels=ip.size["longest_edge"])
        return rw / w, rh / h
    return 1000.0 / w, 1000.0 / h


def box_frame(model_type, image_size, processor=None):
    """(width, height) of the frame the model writes boxes in, as its prompt states it:
    (1000, 1000) for Qwen2-VL, the resized input's pixels for Qwen2.5-VL."""
    sx, sy = coord_scale(model_type, image_size, processor)
    return round(image_size[0] * sx), round(image_size[1] * sy)


def to_model_frame(box, model_type, image_size, processor=None):
    """Original-image pixels -> the model's coordinate frame (integers)."""
    sx, sy = coord_scale(model_type, image_size, processor)
    return [round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)]


def from_model_frame(box, model_type, image_size, processor=None):
    """The model's coordinate frame -> original-image pixels (floats)."""
    sx, sy = coord_scale(model_type, image_size, processor)
    return [box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy]


# ============================================================================ 7. ZeRO-3 generation
ZERO3_HOOKS = weakref.WeakKeyDictionary()      # HF model -> the DeepSpeed object owning its ZeRO-3 hooks


def zero3_hooks(engine):
    """Note who owns the ZeRO-3 module hooks of `engine`'s model, for gathered(); returns the engine."""
    owner = getattr(engine.optimizer, "parameter_offload", engine.optimizer)   # no optimizer: the offload itself
    if hasattr(owner, "forward_hooks"):
        ZERO3_HOOKS[hf_model(engine.module)] = owner          # keyed as gathered() looks it up (peft: the base)
    return engine


@contextlib.contextmanager
def gathered(model):
    """Full parameters for generation under ZeRO-3 (sharded generation gathers every layer at every
    decoding step: unusably slow); a no-op otherwise. The ZeRO-3 module hooks are lifted meanwhile
    (as TRL does): left on, they ran DeepSpeed's fetch schedule on the gathered weights and left a
    parameter "in flight" (the second GRPO step failed, and RISE-CoT's first on two ranks)."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed
    owner = ZERO3_HOOKS.get(hf_model(model))
    with deepspeed.zero.GatheredParameters(params):
        if owner is not None:
            for p in params:
                p.ds_active_sub_modules.clear()
            for hook in owner.forward_hooks + owner.backward_hooks:
                hook.remove()
            owner.forward_hooks, owner.backward_hooks = [], []
        try:
            yield
        finally:
            if owner is not None:                      # hooks back (the name before DeepSpeed 0.16.4: the second)
                register = getattr(owner, "_register_deepspeed_module", None) or owner._register_hooks_recursively
                register(owner.module)


# ============================================================================ 8. preference pairs (DPO)
def completion_tensors(processor, texts, device=None):
    """Completion texts -> (completion_ids, completion_mask) [N, T], each ending in <|im_end|> and
    right-padded: the form completion_logprobs() scores (DPO's chosen and rejected responses)."""
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    seqs = [tok.encode(t, add_special_tokens=False) + [end] for t in texts]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return ids.to(device or "cpu"), mask.to(device or "cpu")


def response_logps(model, processor, convs, images, responses, device, max_prompt_len=None, group_size=1):
    """logp(y|x) in nats of each response y (its <|im_end|> included) after its conversation x, one
    forward: N conversations, N image lists, N response texts -> [N]. The vision tokens are suppressed
    as in sampling, so these are the policy's own log-probs. group_size > 1: rows come in groups of that
    many copies of one conversation, run once (completion_logprobs)."""
    prompt = chat_inputs(processor, convs, images, max_prompt_len=max_prompt_len)
    prompt = {k: v.to(device) for k, v in prompt.items()}
    ids, mask = completion_tensors(processor, responses, device)          # [N, T]
    token_logp = completion_logprobs(model, prompt, ids, mask, suppress=suppressed_ids(processor),
                                     group_size=group_size)
    return dpo.sequence_logp(token_logp, mask)                            # [N]


def pair_logps(model, ref, processor, convs, images, chosen, rejected, device, max_prompt_len=None):
    """(chosen, rejected, ref_chosen, ref_rejected) summed log-probs of N preference pairs, [N] each:
    the inputs of dpo.dpo_loss. Rows go chosen 0, rejected 0, chosen 1, ...: one forward, each prompt
    run once for its two responses (group_size 2). The reference runs under no_grad; ref None: the
    policy with its LoRA adapters off (peft), i.e. the model they started from."""
    args = (processor, [c for c in convs for _ in range(2)], [im for im in images for _ in range(2)],
            [y for pair in zip(chosen, rejected) for y in pair], device, max_prompt_len, 2)
    logp = response_logps(model, *args)
    adapters_off = getattr(model, "module", model).disable_adapter() if ref is None else contextlib.nullcontext()
    with torch.no_grad(), adapters_off:
        ref_logp = response_logps(model if ref is None else ref, *args)
    return logp[0::2], logp[1::2], ref_logp[0::2], ref_logp[1::2]


# ============================================================================ 9. LoRA and frozen parts
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def add_lora(model, rank, seed=0):
    """The model with fresh LoRA adapters of `rank` (alpha 2 rank, no dropout: LLaMA-Factory's defaults,
    which VisRL's released configs use with lora_target all) on every linear layer of the language
    model, everything else frozen: a peft model (TRL's peft_config does the same). peft is imported only
    here: it is needed only with --lora-rank."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise SystemExit("--lora-rank needs peft: pip install peft") from e
    torch.manual_seed(seed)                    # the same adapters on every rank
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules=LORA_TARGETS))


def merged_state_dict(model):
    """{name: tensor} of the plain HF model with every LoRA delta folded into its base weight
    (W + B A alpha / r, peft's get_delta_weight), named as the model without adapters names them; a model
    without adapters: its own state dict. Needs whole weights: call it inside gathered() under ZeRO-3."""
    wrapper, base = getattr(model, "module", model), hf_model(model)
    if not hasattr(wrapper, "peft_config"):
        return base.state_dict()
    from peft.tuners.lora import LoraLayer
    state = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.base_layer.weight
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
            state[f"{name}.weight"] = (weight + delta.to(weight.dtype)).detach().clone()
    for name, tensor in base.state_dict().items():
        if "lora_" not in name:
            state.setdefault(name.replace(".base_layer.", "."), tensor.detach().clone())
    return state


def freeze_vision(model):
    """Freeze the vision tower (patch embedding and blocks); its merger, the projection into the language
    model, stays trainable (ms-swift's freeze_vit; VLM-R1's freeze_vision_modules). Returns the model."""
    visual = hf_model(model).model.visual
    for name, child in visual.named_children():
        if name != "merger":
            child.requires_grad_(False)
    return model


# ============================================================================ 10. the GRPO step on a model
# grpo.py holds the math (advantages, loss); these run it on a model: rollout -> reward -> log-probs ->
# loss -> one guarded update, with a DeepSpeed engine (or a plain module and its torch optimizer).
def any_rank(flag):
    """True on every rank if `flag` is true on any: decisions that change what ranks do next (skip an
    update, stop) must be the same everywhere, or one rank waits forever in a collective."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([float(flag)], device="cuda" if on_gpu() else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def accumulation(micro, total, grad_accum):
    """(boundary, loss_scale) of micro-step `micro` (0-based) of a stage of `total` micro-steps.

    A stage is cut into windows of grad_accum micro-steps, one optimizer update each; its last window
    may be shorter (size m) and is applied too, at the stage's end, never left pending for the next.
    DeepSpeed divides every loss by grad_accum, so loss_scale = grad_accum / m makes the update the
    mean over the window's micro-batches (1.0 for a full window)."""
    begin = micro - micro % grad_accum
    size = min(grad_accum, total - begin)
    return micro - begin == size - 1, grad_accum / size


def update(model, loss, window=None, optimizer=None, max_grad_norm=1.0):
    """Backward + optimizer step of `loss`, unless it is NaN or infinite on any rank (then no rank
    updates: the decision is shared, any_rank). A DeepSpeed engine (optimizer None) scales, accumulates,
    clips and steps itself; window = (boundary, loss_scale) from accumulation(). A plain module steps
    its torch optimizer at every call. Returns True when the update was skipped."""
    if any_rank(not math.isfinite(loss.item())):
        return True
    if optimizer is None:
        if window is not None:
            model.set_gradient_accumulation_boundary(window[0])
            loss = loss * window[1]
        model.backward(loss)
        model.step()
        return False
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return False


def reward_tensor(results):
    """reward_fn results (floats, or dicts with "reward" and components) -> ([N] tensor, component means)."""
    if results and isinstance(results[0], dict):
        totals = torch.tensor([float(r["reward"]) for r in results])
        parts = {f"reward_{k}": sum(float(r[k]) for r in results) / len(results)
                 for k in results[0] if k != "reward" and isinstance(results[0][k], (int, float, bool))}
        return totals, parts
    return torch.tensor([float(r) for r in results]), {}


def grpo_update(model, ref, segments, rewards, group_size, beta=0.04, norm="seq", scale_rewards=True,
                eps_low=0.2, eps_high=0.2, suppress=None, window=None, optimizer=None):
    """Advantages (grpo.group_advantages) -> log-probs of the policy and, under no_grad, of the reference
    -> grpo.grpo_loss -> one guarded update, for completions made of one or more segments.

    segments: dicts {prompt, completion_ids [N, T_k], completion_mask [N, T_k], temperature,
    max_new_tokens (the segment's budget), group_size (optional: rows come in groups of that many copies
    of one prompt, each run once by vlm.completion_logprobs)}: one segment for a prompt -> answer rollout,
    two for RISE-CoT's trajectory (the CoT, then its reconstruction). Their tokens are concatenated along
    T, so every token of completion i shares advantage A_i and "seq" normalises over the trajectory.
    Each batch is used once (num_iterations 1): old_logp = logp.detach(), the ratio is 1 in value.
    ref None with beta > 0: the policy with its LoRA adapters off. norm "fixed" (Dr. GRPO) divides by
    N x the sum of the segments' max_new_tokens. Returns the loss statistics ("skipped": no update)."""
    advantages = grpo.group_advantages(rewards, group_size, scale=scale_rewards)
    model.train()            # from_pretrained leaves eval mode, where gradient checkpointing is off

    def logprobs(m):
        return torch.cat([completion_logprobs(m, s["prompt"], s["completion_ids"], s["completion_mask"],
                                                  s["temperature"], suppress, s.get("group_size", 1))
                          for s in segments], 1)
    logp, ref_logp = logprobs(model), None
    if beta != 0:
        off = getattr(model, "module", model).disable_adapter() if ref is None else contextlib.nullcontext()   # peft
        with torch.no_grad(), off:
            ref_logp = logprobs(model if ref is None else ref)
    mask = torch.cat([s["completion_mask"] for s in segments], 1)
    budget = None
    if norm == "fixed":
        if any(s.get("max_new_tokens") is None for s in segments):
            raise ValueError("norm='fixed' (Dr. GRPO) needs every segment's max_new_tokens (its generation budget)")
        budget = sum(s["max_new_tokens"] for s in segments)
    loss, stats = grpo.grpo_loss(logp, logp.detach(), ref_logp, advantages.to(logp.device), mask, beta=beta,
                                 eps_low=eps_low, eps_high=eps_high, norm=norm, max_len=budget)
    stats["skipped"] = update(model, loss, window, optimizer)
    stats.update(loss=loss.item(), completion_len=mask.sum(1).float().mean().item(),
                 entropy=(-(logp.detach() * mask).sum() / mask.sum().clamp(min=1)).item())
    return stats


def grpo_step(model, ref, processor, conversations, images, reward_fn, group_size=8, max_new_tokens=64,
              temperature=1.0, max_prompt_len=None, **loss_options):
    """One GRPO step: rollout (vlm.sample, G completions per prompt) -> reward -> grpo_update.

    model: the policy (a DeepSpeed engine, or a plain module with optimizer= in loss_options).
    conversations/images: B prompts (vlm.chat_inputs). reward_fn(texts, prompt_index) gets the B*G
    completions (prompt-major: text i answers prompt i // G) and returns one float, or one dict with
    "reward" and its components, per text. Returns (stats, rollout, rewards [B*G])."""
    module = getattr(model, "module", model)
    batch = chat_inputs(processor, conversations, images, max_prompt_len=max_prompt_len)
    with generation_mode(module):          # full weights under ZeRO-3, no gradient checkpointing
        rollout = sample(module, processor, batch, group_size, max_new_tokens, temperature)
    n = len(rollout["texts"])
    rewards, parts = reward_tensor(reward_fn(rollout["texts"], [i // group_size for i in range(n)]))
    segment = dict(rollout, temperature=temperature, max_new_tokens=max_new_tokens, group_size=group_size)
    stats = grpo_update(model, ref, [segment], rewards, group_size, suppress=suppressed_ids(processor),
                        **loss_options)
    stats.update(grpo.reward_stats(rewards, group_size), **parts)
    return stats, rollout, rewards
