"""The precision every loss computes in, whatever backend."""

import torch


def compute_dtype(logits):
    """fp64 for fp64 logits (exact tests), fp32 for fp16, bf16 and fp32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32
