import os

import torch

# Without a GPU the Triton kernels run on CPU tensors under the interpreter; the variable is read
# when the kernel modules are imported (lazily, by the first triton-backend call).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

# The interpreter computes every lane in numpy, masked ones included: an overflow or invalid
# operation anywhere in a kernel fails the test instead of hiding behind a mask.
np.seterr(over="raise", invalid="raise", divide="raise", under="ignore")
