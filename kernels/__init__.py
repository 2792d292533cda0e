"""Fused Triton kernels, installed as ``fastkd.kernels``; one module per loss family, each holding
its kernels and their host launcher (``*_forward``: per-row loss, parts and gradients in one
launch). The ops of ``fastkd.ops`` call the launchers and hold the autograd. Imports only torch
and triton."""
