"""The precision every loss computes in, whatever backend."""

import torch


def compute_dtype(*logits):
    """fp64 when any input is fp64 (exact tests), else fp32: fp16, bf16 and fp32 inputs, alike or
    mixed (a teacher run under autocast next to an fp32 student), are computed in fp32."""
    if any(tensor.dtype == torch.float64 for tensor in logits):
        return torch.float64
    return torch.float32
