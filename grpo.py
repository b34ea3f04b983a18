"""GRPO: group-relative advantages and the clipped policy-gradient loss.

Group Relative Policy Optimization, from "DeepSeekMath: Pushing the Limits of Mathematical
Reasoning in Open Language Models" (Shao et al. 2024, arXiv 2402.03300, section 4.1, eq. 3).

For one prompt q we sample a group of G completions o_1..o_G and score them r_1..r_G.
Each completion's advantage is its reward relative to the group, shared by all its
tokens; the loss is PPO's clipped surrogate with a k3 KL penalty to a frozen reference.

This file imports only torch: copy any function alone. The step that drives a model with these
(rollout -> reward -> advantages -> loss -> update) is vlm.grpo_step.
Everything is computed in float32, whatever dtype (bf16 on GPU) the inputs come in.
"""

import torch


def group_advantages(rewards, group_size, scale=True, eps=1e-4):
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps)   (scale=False: A_i = r_i - mean).

    rewards: [B*G], the G completions of each prompt stored contiguously
    ([p0o0, p0o1, .., p0o(G-1), p1o0, ..]). Returns advantages [B*G], float32.

    std is the *unbiased* (Bessel-corrected, divide by G-1) sample std, torch's default
    and what TRL's GRPOTrainer uses, so our numbers match that reference implementation.
    With G = 2 and rewards {0, 1} this gives A = +-0.7071 (population std would give
    +-1). Hence group_size must be >= 2 (a group of one has no relative signal anyway).
    A group whose rewards are all equal gets A = 0 exactly: no learning signal
    (see zero_std_fraction, which should be logged).
    """
    if group_size < 2:
        raise ValueError(f"GRPO needs group_size >= 2, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.detach().to(torch.float32).reshape(-1, group_size)  # [B, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [B, G]
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)  # unbiased std
    return centred.reshape(-1)  # [B*G]


def zero_std_fraction(rewards, group_size, atol=1e-6):
    """Fraction of groups whose rewards are all equal (max - min <= atol).

    Such a group has advantage 0 for every member, so it contributes no policy gradient
    (only the KL term). If this fraction is high, the task is too easy or too hard for
    the current policy: log it rather than let it silently waste the batch.
    rewards: [B*G] grouped contiguously. Returns a python float in [0, 1].
    """
    grouped = rewards.detach().to(torch.float32).reshape(-1, group_size)  # [B, G]
    spread = grouped.max(dim=1).values - grouped.min(dim=1).values  # [B]
    return (spread <= atol).float().mean().item()


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, beta=0.04,
              eps_low=0.2, eps_high=0.2, norm="seq", max_len=None):
    """loss = -J,  J = norm_{i,t}[ min(rho_t A_i, clip(rho_t, 1-eps_low, 1+eps_high) A_i) - beta KL_t ]

    rho_t = exp(logp_t - old_logp_t);  KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1  (k3, >= 0).
    k3 on tokens sampled from pi_theta: its VALUE is an unbiased estimate of KL(pi_theta || pi_ref), but
    its gradient (through logp, as here) is in expectation that of KL(pi_ref || pi_theta), not of
    KL(pi_theta || pi_ref). This code uses plain k3, the objective of the GRPO paper (DeepSeekMath,
    arXiv 2402.03300, eq. 3-4); TRL's default (use_bias_correction_kl) multiplies it by rho_t instead.
    Both log-ratios are clamped to [-20, 20] before exp, so +-1e4 cannot overflow.
    Shapes: logp/old_logp/ref_logp/mask [N, T]; advantages [N]. ref_logp may be None iff beta == 0.
    Masked positions may hold anything (even -inf): they are replaced before any arithmetic.
    norm (how per-token terms are averaged; |o_i| = valid tokens of row i):
      "seq"   (GRPO): mean over each row's tokens, then over the N rows. A token weighs
              1/(N |o_i|): long completions get less per-token gradient, so long wrong
              answers are penalised less and short right ones rewarded more (Dr. GRPO's
              length bias). Rows with no valid token count as 0 in the mean.
      "token" (DAPO): sum over all valid tokens / their number. Every token weighs the same
              within a batch, but the scale changes with the batch's total token count.
      "fixed" (Dr. GRPO, arXiv 2503.20783; TRL's dr_grpo): sum / (N * max_len), where max_len must
              be the generation budget (max_new_tokens), a constant: then every token weighs
              1/(N max_len) in every batch, with no length bias. The default T (this batch's
              longest completion) is right only when T is the budget.
    """
    valid = mask.bool()  # [N, T]
    m = valid.to(torch.float32)
    adv = advantages.detach().to(torch.float32).unsqueeze(1)  # [N, 1], same A for every token
    # Zero the log-ratio at padding so garbage there cannot turn into inf/NaN (also in backward).
    log_ratio = torch.where(valid, logp.float() - old_logp.detach().float(), 0.0).clamp(-20, 20)
    ratio = log_ratio.exp()  # [N, T]
    per_token = torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)  # [N, T]
    kl = torch.zeros_like(per_token)
    if beta != 0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs ref_logp")
        ref_ratio = torch.where(valid, ref_logp.detach().float() - logp.float(), 0.0).clamp(-20, 20)
        kl = ref_ratio.exp() - ref_ratio - 1  # [N, T], k3 estimator: unbiased and >= 0
        per_token = per_token - beta * kl
    per_token = torch.where(valid, per_token, 0.0)
    if norm == "seq":
        objective = (per_token.sum(1) / m.sum(1).clamp(min=1)).mean()
    elif norm == "token":
        objective = per_token.sum() / m.sum().clamp(min=1)
    elif norm == "fixed":
        objective = per_token.sum() / (logp.shape[0] * (logp.shape[1] if max_len is None else max_len))
    else:
        raise ValueError(f"norm must be 'seq', 'token' or 'fixed', got {norm!r}")
    # Clipping is active where min() chose the clipped term and it differs (its gradient is 0).
    with torch.no_grad():
        n_valid = m.sum().clamp(min=1)
        low = valid & (adv < 0) & (ratio < 1 - eps_low)
        high = valid & (adv > 0) & (ratio > 1 + eps_high)
        stats = {"clip_fraction": ((low | high).sum() / n_valid).item(),
                 "low_clip_fraction": (low.sum() / n_valid).item(),
                 "high_clip_fraction": (high.sum() / n_valid).item(),
                 "kl": ((kl * m).sum() / n_valid).item(),
                 "ratio_mean": ((ratio * m).sum() / n_valid).item(),
                 "num_tokens": m.sum().item()}
    return -objective, stats


def reward_stats(rewards, group_size):
    """What to log of a batch's rewards [B*G] (grouped contiguously): the mean, the mean within-group
    std, and the fraction of groups with no learning signal (zero_std_fraction). Python floats."""
    return {"reward": rewards.mean().item(), "reward_std": rewards.view(-1, group_size).std(1).mean().item(),
            "zero_std_fraction": zero_std_fraction(rewards, group_size)}
