"""The "torch" backend: vectorised PyTorch (no Python loop over pairs or classes), the CPU kernel of
the ``torch.ops.fastkd`` ops. Like the Triton kernels, each ``*_forward`` returns per-row losses,
their parts and the gradient of each row's loss in closed form, so the op's backward only scales
it (``fastkd.ops``)."""
