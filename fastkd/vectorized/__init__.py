"""The "torch" backend: vectorised PyTorch (no Python loop over pairs or classes), autograd for the
gradient. What CPU users get, and what ``torch.compile`` is pointed at."""
