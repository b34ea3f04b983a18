"""GRPO: group-relative advantages and the clipped policy-gradient loss.

Group Relative Policy Optimization, from "DeepSeekMath: Pushing the Limits of Mathematical
Reasoning in Open Language Models" (Shao et al. 2024, arXiv 2402.03300, section 4.1, eq. 3).

For one prompt q we sample a group of G completions o_1..o_G and score them r_1..r_G.
Each completion's advantage is its reward relative to the group, shared by all its
tokens; the loss is PPO's clipped surrogate with a k3 KL penalty to a frozen reference.

Every function here imports only torch, so each can be copied alone.
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


# ---- rollout -> reward -> update step ----
# The losses above need only torch; the step below drives the model through vlm.py.
import math  # noqa: E402

import run  # noqa: E402  (run imports this file too: each uses the other only inside functions)
import vlm  # noqa: E402


def accumulation(micro, total, grad_accum):
    """(boundary, loss_scale) of micro-step `micro` (0-based) of a phase of `total` micro-steps.

    A phase is cut into windows of grad_accum micro-steps, one optimizer update each; its last
    window may be shorter (size m) and is applied too, at the phase's end, never left pending
    for the next phase. DeepSpeed divides every loss by grad_accum, so loss_scale = grad_accum / m
    makes the update the mean over the window's micro-batches (1.0 for a full window).
    """
    start = micro - micro % grad_accum
    size = min(grad_accum, total - start)
    return micro - start == size - 1, grad_accum / size


def fresh_optimizer(engine, lr):
    """A new phase (SFT -> GRPO, VisRL's SFT -> stage 1 -> stage 2) starts as a separate run would:
    AdamW moments and step counts cleared, constant lr set. DeepSpeed's ZeRO optimizers wrap the
    torch optimizer (.optimizer); its state is rebuilt lazily at the next step."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    inner.state.clear()
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def apply_update(model, optimizer, loss, max_grad_norm=1.0, window=None):
    """Backward + optimizer step for a DeepSpeed engine (optimizer=None) or a plain module.

    window: (boundary, loss_scale) from accumulation(): the update happens at the boundary; None
    leaves DeepSpeed to count micro-steps itself. A plain module steps at every call."""
    if optimizer is None:                     # DeepSpeed: it scales, accumulates, clips and steps
        if window is not None:
            model.set_gradient_accumulation_boundary(window[0])
            loss = loss * window[1]
        model.backward(loss)
        model.step()
        return
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def reward_tensor(results):
    """reward_fn results (floats, or dicts with "reward" and components) -> ([N] tensor, component means)."""
    if results and isinstance(results[0], dict):
        totals = torch.tensor([float(r["reward"]) for r in results])
        parts = {f"reward_{k}": sum(float(r[k]) for r in results) / len(results)
                 for k in results[0] if k != "reward" and isinstance(results[0][k], (int, float, bool))}
        return totals, parts
    return torch.tensor([float(r) for r in results]), {}


def grpo_update(model, segments, rewards, group_size, optimizer=None, ref_model=None, beta=0.04,
                eps_low=0.2, eps_high=0.2, norm="seq", scale_rewards=True, suppress=None, window=None):
    """Advantages -> GRPO loss -> one optimizer step, for completions made of one or more segments.

    segments: list of dicts {prompt, completion_ids [N, T_k], completion_mask [N, T_k], temperature,
    max_new_tokens (the segment's generation budget, tokens), group_size (optional: rows come in
    groups of this many copies of one prompt, each run once by vlm.completion_logprobs)};
    one segment for a plain prompt -> answer rollout, two for RISE-CoT's trajectory (the CoT,
    then its reconstruction from a second prompt). Their tokens are concatenated along T, so
    every token of completion i shares advantage A_i and "seq" normalises over the whole trajectory.
    One batch is used once (num_iterations = 1): old_logp = logp.detach(), so the ratio is 1 in
    value and the clipping only matters with several updates per rollout.
    norm="fixed" (Dr. GRPO) divides by N x the trajectory's budget, the sum of the segments'
    max_new_tokens (never by the batch's longest completion); raises ValueError without them.
    window: (boundary, loss_scale) of this micro-step, from accumulation() (see apply_update).
    Returns the loss statistics, with "skipped" set when the loss was not finite (no update).
    """
    advantages = group_advantages(rewards, group_size, scale=scale_rewards)
    model.train()            # from_pretrained leaves eval mode, where gradient checkpointing is off
    def logprobs(policy):
        return torch.cat([vlm.completion_logprobs(policy, s["prompt"], s["completion_ids"], s["completion_mask"],
                                                  s["temperature"], suppress, s.get("group_size", 1))
                          for s in segments], 1)
    logp = logprobs(model)
    ref_logp = None
    if beta != 0:
        with torch.no_grad():
            ref_logp = logprobs(ref_model)
    mask = torch.cat([s["completion_mask"] for s in segments], 1)
    budget = None
    if norm == "fixed":
        if any(s.get("max_new_tokens") is None for s in segments):
            raise ValueError("norm='fixed' (Dr. GRPO) needs every segment's max_new_tokens (its generation budget)")
        budget = sum(s["max_new_tokens"] for s in segments)
    loss, stats = grpo_loss(logp, logp.detach(), ref_logp, advantages.to(logp.device), mask, beta=beta,
                            eps_low=eps_low, eps_high=eps_high, norm=norm, max_len=budget)
    stats["skipped"] = not math.isfinite(loss.item())
    if not stats["skipped"]:                   # a non-finite loss never reaches the weights
        apply_update(model, optimizer, loss, window=window)
    stats.update(loss=loss.item(), completion_len=mask.sum(1).float().mean().item(),
                 entropy=(-(logp.detach() * mask).sum() / mask.sum().clamp(min=1)).item())
    return stats


def reward_stats(rewards, group_size):
    """Mean reward, mean within-group std and the fraction of groups with no signal."""
    return {"reward": rewards.mean().item(), "reward_std": rewards.view(-1, group_size).std(1).mean().item(),
            "zero_std_fraction": zero_std_fraction(rewards, group_size)}


def grpo_step(model, processor, conversations, images, reward_fn, optimizer=None, ref_model=None,
              group_size=8, max_new_tokens=64, temperature=1.0, max_prompt_len=None, **loss_args):
    """One GRPO step: rollout -> reward -> loss -> update. Returns (stats, rollout, rewards).

    model: the policy (a DeepSpeed engine when optimizer is None, else a plain module).
    conversations/images: B prompts (see vlm.chat_inputs). reward_fn(texts, prompt_index) gets
    the B*G decoded completions (prompt-major: text i answers prompt i // G) and returns one
    float, or one dict with "reward" and its components, per text.
    loss_args: beta, eps_low, eps_high, norm, scale_rewards, window (see grpo_update).
    """
    module = getattr(model, "module", model)
    batch = vlm.chat_inputs(processor, conversations, images, max_prompt_len=max_prompt_len)
    with vlm.generation_mode(module):          # full weights under ZeRO-3, no grad checkpointing
        rollout = vlm.sample(module, processor, batch, group_size, max_new_tokens, temperature)
    n = len(rollout["texts"])
    rewards, parts = reward_tensor(reward_fn(rollout["texts"], [i // group_size for i in range(n)]))
    segment = dict(rollout, temperature=temperature, max_new_tokens=max_new_tokens, group_size=group_size)
    stats = grpo_update(model, [segment], rewards, group_size, optimizer, ref_model,
                        suppress=vlm.suppressed_ids(processor), **loss_args)
    stats.update(reward_stats(rewards, group_size), **parts)
    return stats, rollout, rewards


# ---- a complete, minimal GRPO run: learn to name the colour of an image --------------------
def colour_task(rng, n, colours=None, size=224):
    """n (image, colour) pairs: a plain size x size image of one colour (from `colours`, default
    every shapes-world colour), shade jittered. 224 px = 64 image tokens for the tiny model; with
    fewer (56 px = 1 token) the random model learns the same task several times slower."""
    from PIL import Image
    import data
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
    of answers different rewards (a 0/1 reward gives all-zero groups: no signal). Prefixes only, because
    any similar string is a trap: with difflib's similarity instead, the random tiny model settled on "lu"
    for blue in 2 of 5 seeds; with prefixes it named both colours by step 20 in 6 of 8 seeds (seed 4 settled
    on "re", seed 7 never sampled "blue"; README "GRPO learning from scratch")."""
    rewards = []
    for text, i in zip(texts, prompt_index):
        words = text.strip().lower().split()
        first = words[0].strip(".,!:;\"'") if words else ""
        colour = colours[i]
        prefix = bool(first) and colour.startswith(first)
        rewards.append(1.0 if first == colour else partial * len(first) / len(colour) if prefix else 0.0)
    return rewards


def main(argv=None):
    import argparse
    import json
    import random
    from pathlib import Path

    import tiny
    parser = argparse.ArgumentParser(description="GRPO demo: learn to name an image's colour from reward alone")
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
            tiny.build_tiny(model_dir, seed=args.seed, plan=(), pixels=None)
        run.barrier()
    model, processor = vlm.load_model(model_dir)
    cfg = run.zero_config(args.deepspeed or Path(__file__).with_name("ds_zero2.json"), lr=args.lr,
                               weight_decay=0.0, micro_batch=args.batch_size)
    engine = run.deepspeed_engine(model, cfg)
    ref = run.reference_model(model_dir, cfg, device=engine.device) if args.beta else None
    rng, names = random.Random(args.seed + rank), args.colours.split(",")
    question = [vlm.user_turn("What colour is this image?")]
    log = open(out / "metrics.jsonl", "a") if rank == 0 else None
    for step in range(args.max_steps):
        for group in engine.optimizer.param_groups:
            group["lr"] = args.lr * (1 - step / args.max_steps)
        pairs = [p for k in range(args.batch_size) for p in colour_task(rng, 1, [names[k % len(names)]])]
        colours = [c for _, c in pairs]
        stats, _, _ = grpo_step(engine, processor, [question] * len(pairs), [[im] for im, _ in pairs],
                                lambda t, i: colour_reward(t, i, colours), ref_model=ref,
                                group_size=args.num_generations, max_new_tokens=1, beta=args.beta,
                                scale_rewards=False)
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
        logp, grads = {}, {}                           # scored both ways, under this run's ZeRO stage
        for on in (True, False):
            vlm.SHARED_PREFIX = on
            logp[on] = vlm.completion_logprobs(
                engine, rollout["prompt"], rollout["completion_ids"], rollout["completion_mask"],
                suppress=vlm.suppressed_ids(processor), group_size=args.num_generations)
            engine.backward(logp[on].sum())
            grads[on] = torch.cat([safe_get_full_grad(p).flatten() for p in engine.module.parameters()])
            engine.optimizer.zero_grad()
        vlm.SHARED_PREFIX = True
        (out / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "world": world, "checksum": checksum, "texts": rollout["texts"],
            "shared_prefix_max_diff": (logp[True] - logp[False]).abs().max().item(),
            "grad_max": grads[False].abs().max().item(),
            "shared_prefix_grad_max_diff": (grads[True] - grads[False]).abs().max().item()}))


if __name__ == "__main__":
    main()
    run.exit_finished()        # the run is complete: skip the interpreter's teardown
