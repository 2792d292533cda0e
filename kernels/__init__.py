"""Fused Triton kernels, installed as ``fastkd.kernels``; one module per loss family, each holding
its kernel, host launcher and autograd entry point. Imports only torch and triton."""
