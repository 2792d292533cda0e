"""The fused kernels compile for a Hopper GPU (sm_90) with no register spills, without a GPU.

Triton compiles ahead of time for a named target through its bundled ptxas, so CI checks the real
code generation path, not only the interpreter. This uses the installed triton; the GPU machines
run triton 3.6.
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
if not os.path.exists(os.path.join(NVIDIA_BIN, "cuobjdump")):
    pytest.skip("triton's NVIDIA backend tools are not installed", allow_module_level=True)

SCRIPT = os.path.join(os.path.dirname(__file__), "compile_kernels_for_hopper.py")


@pytest.fixture(scope="module")
def spill_bytes():
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=environment,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def test_every_variant_compiles_without_spills(spill_bytes):
    assert len(spill_bytes) == 3 * (4 + 2 * 2) + 13 + 2 + 2
    failures = {name: result for name, result in spill_bytes.items() if result != 0}
    assert not failures, failures
