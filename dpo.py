"""DPO and VisRL's step-level DPO.

Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290, eq. 7) and VisRL's
two-step version (VisRL, arXiv 2503.07523, section 3.2). This file imports only torch: copy any
function alone. The summed log-probs they compare come from a model through vlm.pair_logps.
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
