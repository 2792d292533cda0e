"""GPU time of the fused LDRLD, HCD and KD kernels for each block width and warp count, against the
copy floor: ``python bench/tune_kernels.py --output OUTDIR`` (CUDA).

Each setting runs the launcher (loss and gradients in one launch) replayed from a CUDA graph
(``triton.testing.do_bench_cudagraph``, median), so the times hold no host launch overhead. The
copy floor is one device copy of the bytes the kernel must move (inputs read, gradients written).
The launchers' defaults (``ldrld_launch_config``, ``hcd_launch_config``, ``launch_config``) are
marked; the others are the settings they were chosen against.
"""

import argparse
import functools
import json
import os

import torch
import triton.testing
from bench_hcd import LABEL_SMOOTHING, NUM_SUB, hcd_inputs
from fastkd.kernels.common import launch_config
from fastkd.kernels.hcd import hcd_forward, hcd_launch_config
from fastkd.kernels.kd import kd_forward
from fastkd.kernels.ldrld import ldrld_forward, ldrld_launch_config
from harness import DTYPES, random_inputs

from fastkd.ldrld_weights import ldrld_group_weights
from fastkd.methods.hcd import HCD
from fastkd.methods.kd import KD
from fastkd.methods.ldrld import LDRLD


def gpu_milliseconds(function):
    return triton.testing.do_bench_cudagraph(function, rep=20, return_mode="median")


def copy_floor(elements, dtype):
    """A copy moving ``elements`` elements' bytes (half read, half written)."""
    source = torch.randn(elements // 2, device="cuda").to(dtype)
    destination = torch.empty_like(source)
    return gpu_milliseconds(lambda: destination.copy_(source))


def settings(default, others, launch):
    """``(setting, is_default, launch with it)`` for the launcher's ``default`` (block, warps)
    and each of ``others`` (the default once, first)."""
    for setting in dict.fromkeys([default, *others]):
        block, warps = setting
        yield setting, setting == default, functools.partial(launch, block_size=block,
                                                             num_warps=warps)


def ldrld_cases(batch, classes, dtype):
    """The default options (``fastkd.methods.ldrld.LDRLD``), as ``ldrld_loss`` launches them."""
    student, teacher, target = random_inputs(batch, classes, dtype)
    top_set_weight, num_groups = ldrld_group_weights(LDRLD.top_d, LDRLD.irw_eps, LDRLD.erd_scale,
                                                     LDRLD.erd_decay)
    options = dict(LDRLD.loss_options(), top_set_weight=top_set_weight, num_groups=num_groups)
    block, _, warps = ldrld_launch_config(classes)
    return settings((block, warps), [(1024, 8), (512, 4), (2048, 8), (4096, 16)],
                    functools.partial(ldrld_forward, student, teacher, target, **options))


def hcd_cases(batch, classes, dtype):
    """The default options (``fastkd.methods.hcd.HCD``) with bench_hcd.py's label smoothing."""
    shared, student, teacher, target = hcd_inputs(batch, classes, dtype)
    options = dict(HCD.loss_options(), label_smoothing=LABEL_SMOOTHING)
    block, _, warps = hcd_launch_config(classes)
    return settings((block, warps), [(1024, 16), (512, 8), (128, 4)],
                    functools.partial(hcd_forward, shared, teacher, student, target, **options))


def kd_cases(batch, classes, dtype):
    """KD at its default temperature (DKD's kernel shares the launch configuration)."""
    student, teacher, _ = random_inputs(batch, classes, dtype)
    block, _, warps = launch_config(classes)
    return settings((block, warps), [(4096, 8), (2048, 8), (1024, 4), (8192, 16)],
                    functools.partial(kd_forward, student, teacher, None,
                                      temperature=KD.temperature))


# kernel -> (cases, elements read + written per row element: LDRLD and KD read two [B, C]
# tensors and write one; HCD reads n + 2 and writes n + 1)
KERNELS = {"ldrld": (ldrld_cases, 3), "kd": (kd_cases, 3),
           "hcd": (hcd_cases, (NUM_SUB + 2) + (NUM_SUB + 1))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder for tune_kernels.json")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=21843)
    args = parser.parse_args(argv)
    rows = []
    for kernel, (cases, elements_per_logit) in KERNELS.items():
        for dtype_name, dtype in DTYPES.items():
            floor = copy_floor(elements_per_logit * args.batch * args.classes, dtype)
            for (block, warps), is_default, launch in cases(args.batch, args.classes, dtype):
                try:
                    milliseconds = gpu_milliseconds(launch)
                except Exception as error:  # a setting that does not compile is reported
                    rows.append({"kernel": kernel, "dtype": dtype_name, "block": block,
                                 "warps": warps, "error": repr(error)[:200]})
                    print(rows[-1], flush=True)
                    continue
                rows.append({"kernel": kernel, "dtype": dtype_name, "block": block,
                             "warps": warps, "default": is_default, "ms": milliseconds,
                             "copy_floor_ms": floor, "vs_floor": milliseconds / floor})
                print(f"{kernel} {dtype_name} block {block:5d} warps {warps:2d}"
                      f"{' (default)' if is_default else '          '} {milliseconds:8.3f} ms"
                      f" = {milliseconds / floor:5.2f}x copy floor ({floor:.3f} ms)", flush=True)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "tune_kernels.json"), "w") as handle:
        json.dump({**vars(args), "gpu": torch.cuda.get_device_name(), "rows": rows}, handle,
                  indent=1)


if __name__ == "__main__":
    main()
