"""Compile every fused-kernel variant for a Hopper GPU (sm_90) without a GPU; print the register
spill bytes of each as JSON. Run by test_kernels_compile.py in a subprocess,
because the kernels must be imported without TRITON_INTERPRET for real code generation."""

import json
import os
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from fastkd.kernels import hcd, kd, ldrld
from fastkd.kernels.common import launch_config
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
HOPPER = GPUTarget("cuda", 90, 32)
SCALAR_TYPES = {  # argument name -> Triton signature type, for the non-pointer arguments
    **{name: "i32" for name in ("student_stride", "teacher_stride", "grad_stride", "num_classes",
                                "top_d", "shared_stride", "grad_shared_stride",
                                "grad_student_stride", "num_sub")},
    **{name: "fp32" for name in ("temperature", "alpha", "beta", "ce_weight", "inv_num_groups",
                                 "top_set_weight", "irw_eps", "erd_scale", "erd_decay",
                                 "label_smoothing", "theta", "w_gt", "w_sdd", "w_ol", "lam_s",
                                 "lam_t")},
}
ACCUMULATORS = {"*fp32": tl.float32, "*bf16": tl.float32, "*fp16": tl.float32, "*fp64": tl.float64}
# Launches for C = 1000 (one block), 4096 (the widest single block), 21843 (streamed).
CLASS_COUNTS = (1000, 4096, 21843)


def spill_bytes(kernel, logits_type, constexprs, num_warps):
    """Stack frame plus local memory of the compiled kernel, from cuobjdump. Spills land in the
    stack frame (ptxas -v: "N bytes stack frame, N bytes spill stores"); LOCAL alone stayed 0
    for the HCD kernel of 2026-11-26 that spilled 4664 bytes (STACK) per thread."""
    accumulator = "*fp64" if logits_type == "*fp64" else "*fp32"
    types = {"student_ptr": logits_type, "teacher_ptr": logits_type, "grad_ptr": logits_type,
             "shared_ptr": logits_type, "grad_shared_ptr": logits_type,
             "grad_student_ptr": logits_type, "target_ptr": "*i64", "loss_ptr": accumulator,
             "parts_ptr": accumulator, **SCALAR_TYPES}
    signature = {name: "constexpr" if name in constexprs else types[name]
                 for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=HOPPER, options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(NVIDIA_BIN, "cuobjdump"), "--dump-resource-usage",
                                cubin.name], capture_output=True, text=True, check=True).stdout
    return sum(int(usage.split(f"{field}:")[1].split()[0]) for field in ("STACK", "LOCAL"))


def variants():
    """(name, kernel, logits type, constexprs, warps) for each variant worth compiling."""
    kernels = [("ldrld", ldrld._ldrld_kernel, ldrld.ldrld_launch_config, ACCUMULATORS),
               ("kd", kd._kd_kernel, launch_config, ("*bf16", "*fp32")),
               ("dkd", kd._dkd_kernel, launch_config, ("*bf16", "*fp32"))]
    for num_classes in CLASS_COUNTS:
        for name, kernel, config, logits_types in kernels:
            for logits_type in logits_types:
                block, single_block, num_warps = (
                    config(num_classes, fp64=logits_type == "*fp64") if name == "ldrld"
                    else config(num_classes))
                constexprs = dict(ACC=ACCUMULATORS[logits_type], BLOCK=block,
                                  SINGLE_BLOCK=single_block, COMPUTE_GRAD=True)
                if name == "ldrld":
                    constexprs["TOP_BLOCK"] = 8
                yield (f"{name}-{logits_type[1:]}-C{num_classes}-block{block}", kernel,
                       logits_type, constexprs, num_warps)
    # HCD: (sub-logits n, classes, logits type, detach_target); n = 1, 4 (the default), 5 and 16
    # give tiles of 1, 4, 8 and 16 rows, each in one tile and streamed.
    hcd_variants = [(4, 1000, "*bf16", False), (4, 1000, "*fp32", True), (4, 1000, "*fp64", False),
                    (4, 100, "*fp16", False), (4, 21843, "*bf16", False),
                    (4, 21843, "*fp32", False), (1, 4096, "*fp32", False),
                    (1, 21843, "*bf16", False), (5, 500, "*bf16", False), (5, 1000, "*fp32", False),
                    (16, 128, "*fp32", False), (16, 21843, "*bf16", False),
                    (16, 1000, "*fp64", False)]
    for num_sub, num_classes, logits_type, detach_target in hcd_variants:
        block, single_block, num_warps = hcd.hcd_launch_config(
            num_classes, num_sub=num_sub, fp64=logits_type == "*fp64")
        constexprs = dict(ACC=ACCUMULATORS[logits_type], SUBS=hcd.sub_rows(num_sub), BLOCK=block,
                          SINGLE_BLOCK=single_block, DETACH_TARGET=detach_target,
                          COMPUTE_GRAD=True)
        yield (f"hcd-n{num_sub}-{logits_type[1:]}-C{num_classes}-block{block}"
               f"-detach{detach_target}", hcd._hcd_kernel, logits_type, constexprs, num_warps)
    for top_d in (1, 32):  # the top_d limits, forward only
        constexprs = dict(ACC=tl.float32, BLOCK=1024, SINGLE_BLOCK=True, COMPUTE_GRAD=False,
                          TOP_BLOCK=max(triton.next_power_of_2(top_d), 2))
        yield f"ldrld-top_d{top_d}-forward", ldrld._ldrld_kernel, "*bf16", constexprs, 4
    # Streamed rows at the top_d limit: the most per-slot state (evicted members' statistics)
    # beside the per-lane remainder statistics; fp64 is the kernel's largest register footprint.
    for logits_type in ("*bf16", "*fp64"):
        block, single_block, num_warps = ldrld.ldrld_launch_config(
            21843, fp64=logits_type == "*fp64")
        constexprs = dict(ACC=ACCUMULATORS[logits_type], BLOCK=block, SINGLE_BLOCK=single_block,
                          COMPUTE_GRAD=True, TOP_BLOCK=ldrld.MAX_TOP_D)
        yield (f"ldrld-top_d{ldrld.MAX_TOP_D}-{logits_type[1:]}-C21843", ldrld._ldrld_kernel,
               logits_type, constexprs, num_warps)


if __name__ == "__main__":
    results = {}
    for name, kernel, logits_type, constexprs, num_warps in variants():
        if len(sys.argv) > 1 and not name.startswith(sys.argv[1]):
            continue
        try:
            results[name] = spill_bytes(kernel, logits_type, constexprs, num_warps)
        except Exception as error:  # reported per variant by the test
            results[name] = f"{type(error).__name__}: {error}"
    json.dump(results, sys.stdout)
