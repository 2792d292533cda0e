"""LDRLD's rank-based weights (spec: shared/spec/ldrld.md), shared by the oracle and the ops."""

import math


def adaptive_decay_weight(rank_a, rank_b, irw_eps, erd_scale, erd_decay):
    """ADW(r, r') = 1 / (|r - r'| + eps) * scale * exp(-decay * (r + r')), ranks 1-based."""
    inverse_rank_weight = 1.0 / (abs(rank_a - rank_b) + irw_eps)
    exponential_rank_decay = erd_scale * math.exp(-erd_decay * (rank_a + rank_b))
    return inverse_rank_weight * exponential_rank_decay


def ldrld_group_weights(top_d, irw_eps, erd_scale, erd_decay):
    """``(top_set_weight, num_groups)`` of the local term, as the authors' code counts them:
    d(d-1)/2 pairs plus the top set; for d = 2 the top set is that pair again, weighted
    ADW(1, 2)."""
    if top_d == 2:
        top_set_weight = adaptive_decay_weight(1, 2, irw_eps, erd_scale, erd_decay)
    else:
        top_set_weight = 1.0
    return top_set_weight, top_d * (top_d - 1) // 2 + 1
