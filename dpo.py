"""DPO and VisRL's step-level DPO.

Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290, eq. 7) and VisRL's
two-step version (VisRL, arXiv 2503.07523, section 3.2). The losses import only torch, so each
can be copied alone; pair_logps() and step_dpo_batch() at the end run a model (vlm.py).
Everything is computed in float32, whatever dtype (bf16 on GPU) the inputs come in.
"""

import torch
import torch.nn.functional as F


def sequence_logp(token_logp, mask):
    """logp(y|x) = sum_t mask_t * logp(y_t | x, y_<t).   token_logp/mask: [N, T] -> [N].

    Uses where() rather than a multiply so that padding holding -inf gives 0, not NaN.
    Summed in float32: a bf16 sum over hundreds of tokens loses several digits.
    """
    return torch.where(mask.bool(), token_logp.float(), 0.0).sum(dim=-1)  # [N]


def dpo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta=0.1):
    """L = -mean_n log sigmoid( beta [ (logp_w - ref_w) - (logp_l - ref_l) ] )   (Rafailov et al. 2023).

    All inputs [N]: summed completion log-probs (see sequence_logp) of the chosen (w) and
    rejected (l) completion under the policy and under the frozen reference.
    beta * (logp - ref) is the "implicit reward"; margin = chosen reward - rejected reward.
    F.logsigmoid is used because log(sigmoid(x)) underflows to log(0) = -inf for x << 0.
    stats: reward_accuracy (fraction with margin > 0), margin, chosen_reward and
    rejected_reward (means over N), python floats.
    """
    chosen_reward = beta * (chosen_logp.float() - ref_chosen_logp.detach().float())  # [N]
    rejected_reward = beta * (rejected_logp.float() - ref_rejected_logp.detach().float())  # [N]
    margin = chosen_reward - rejected_reward  # [N]
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        stats = {"reward_accuracy": (margin > 0).float().mean().item(),
                 "margin": margin.mean().item(),
                 "chosen_reward": chosen_reward.mean().item(),
                 "rejected_reward": rejected_reward.mean().item()}
    return loss, stats


def step_dpo_loss(box_logps, answer_logps, beta=0.1, box_weight=0.5):
    """L = box_weight * DPO(box step) + (1 - box_weight) * DPO(answer step)   (VisRL stage 2).

    box_logps / answer_logps: (chosen, rejected, ref_chosen, ref_rejected), each [N].
    The box step is y = box text given image + question; the answer step is the answer
    given image, question, winning box and its crop (same context for both answers).
    A part with weight 0 is not computed at all (so box_weight=1, VisRL stage 1, accepts
    answer_logps=None): multiplying a NaN part by 0 would still give NaN.
    stats: dpo_loss's stats and the part's loss, prefixed "box_" / "answer_".
    """
    if not 0.0 <= box_weight <= 1.0:
        raise ValueError(f"box_weight must be in [0, 1], got {box_weight}")
    loss, stats = 0.0, {}
    for prefix, logps, weight in (("box_", box_logps, box_weight),
                                  ("answer_", answer_logps, 1.0 - box_weight)):
        if weight == 0:
            continue
        part_loss, part_stats = dpo_loss(*logps, beta=beta)
        loss = loss + weight * part_loss
        stats.update({prefix + k: v for k, v in part_stats.items()})
        stats[prefix + "loss"] = part_loss.item()
    return loss, stats


def chosen_nll(processor, targets, logp):
    """Mean per-token negative log-likelihood of the chosen targets (for --nll-weight), a scalar."""
    tok = processor.tokenizer
    lengths = torch.tensor([len(tok.encode(t, add_special_tokens=False)) + 1 for t in targets], device=logp.device)
    return (-logp / lengths).mean()


# ---- the model side: summed log-probs of chosen / rejected responses ----
# The losses above need only torch; the helpers below run the model through vlm.py.
import contextlib  # noqa: E402

import vlm  # noqa: E402


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


def response_logps(model, processor, convs, images, responses, device, max_prompt_len=None, group_size=1):
    """logp(y|x) in nats of each response y (its <|im_end|> included) after its conversation x,
    one forward: N conversations, N image lists, N response texts -> [N]. The vision tokens are
    suppressed as in sampling (vlm.suppressed_ids), so these are the policy's own log-probs.
    group_size > 1: rows come in groups of that many copies of one conversation, run once."""
    prompt = vlm.chat_inputs(processor, convs, images, max_prompt_len=max_prompt_len)
    prompt = {k: v.to(device) for k, v in prompt.items()}
    ids, mask = completion_tensors(processor, responses, device)          # [N, T]
    token_logp = vlm.completion_logprobs(model, prompt, ids, mask, suppress=vlm.suppressed_ids(processor),
                                         group_size=group_size)
    return sequence_logp(token_logp, mask)                                    # [N]


def pair_logps(model, ref, processor, convs, images, chosen, rejected, device, max_prompt_len=None):
    """(chosen, rejected, ref_chosen, ref_rejected) summed log-probs of N preference pairs, [N]
    each: the inputs of dpo_loss. Rows go chosen 0, rejected 0, chosen 1, ...: one forward, each
    prompt run once for its two responses (group_size 2). The reference runs under no_grad;
    ref None: the policy with its LoRA adapters off (peft), i.e. the model they started from."""
    args = (processor, [c for c in convs for _ in range(2)], [im for im in images for _ in range(2)],
            [y for pair in zip(chosen, rejected) for y in pair], device, max_prompt_len, 2)
    logp = response_logps(model, *args)
    adapters_off = getattr(model, "module", model).disable_adapter() if ref is None else contextlib.nullcontext()
    with torch.no_grad(), adapters_off:
        ref_logp = response_logps(model if ref is None else ref, *args)
    return logp[0::2], logp[1::2], ref_logp[0::2], ref_logp[1::2]


def step_dpo_batch(model, ref, processor, steps, beta=0.1, nll_weight=0.0, device=None, max_prompt_len=None):
    """VisRL's step-level DPO loss of one batch, from the model: steps = [box step] (stage 1, weight 1)
    or [box step, answer step] (stage 2, 0.5 each: step_dpo_loss), each (convs, images, chosen texts,
    rejected texts) as pair_logps takes them. nll_weight > 0 adds that x the chosen steps' per-token
    NLL, same weights (RPO, Pang et al. 2024; not in VisRL). Returns (loss, stats)."""
    weights = [1.0] if len(steps) == 1 else [0.5, 0.5]
    logps = [pair_logps(model, ref, processor, *step, device, max_prompt_len) for step in steps]
    loss, stats = step_dpo_loss(logps[0], logps[1] if len(steps) == 2 else None, beta=beta, box_weight=weights[0])
    if nll_weight:
        nll = sum(w * chosen_nll(processor, step[2], lp[0]) for w, step, lp in zip(weights, steps, logps))
        loss, stats["nll"] = loss + nll_weight * nll, nll.item()
    return loss, stats
