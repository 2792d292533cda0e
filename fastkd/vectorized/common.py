"""Elementwise divergences the vectorised losses share."""

import torch
import torch.nn.functional as F


def kl_terms(probs, log_probs, other_log_probs):
    """``p (log p - log q)`` elementwise, 0 where p = 0: a class at -inf in the target (a masked
    class) adds 0 log 0 = 0 (xlogy's convention), where 0 * (-inf - log q) would be NaN. A NaN
    p stays NaN."""
    return torch.where(probs == 0, 0.0, probs * (log_probs - other_log_probs))


def binary_kl_of_gaps(teacher_gap, student_gap):
    """KL(sigmoid(teacher_gap) || sigmoid(student_gap)) over the two outcomes, elementwise: the KL
    of a two-class softmax depends only on the logit gap."""
    log_pt, log_pt_other = F.logsigmoid(teacher_gap), F.logsigmoid(-teacher_gap)
    log_ps, log_ps_other = F.logsigmoid(student_gap), F.logsigmoid(-student_gap)
    return (kl_terms(log_pt.exp(), log_pt, log_ps)
            + kl_terms(log_pt_other.exp(), log_pt_other, log_ps_other))
