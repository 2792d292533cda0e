"""Elementwise divergences the vectorised losses share."""

import torch.nn.functional as F


def binary_kl_of_gaps(teacher_gap, student_gap):
    """KL(sigmoid(teacher_gap) || sigmoid(student_gap)) over the two outcomes, elementwise: the KL
    of a two-class softmax depends only on the logit gap."""
    log_pt, log_pt_other = F.logsigmoid(teacher_gap), F.logsigmoid(-teacher_gap)
    log_ps, log_ps_other = F.logsigmoid(student_gap), F.logsigmoid(-student_gap)
    return log_pt.exp() * (log_pt - log_ps) + log_pt_other.exp() * (log_pt_other - log_ps_other)
