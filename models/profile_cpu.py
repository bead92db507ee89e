"""Where a CPU pass of our network spends its time, in libtorch and in OpenVINO.

libtorch: torch.profiler over the BN-folded network with channels-last
weights (what our engine runs on the CPU), operators grouped by the part of
PSMNet they belong to (from the operator and its input's rank). OpenVINO:
its per-layer performance counters on the ONNX export of the same network,
grouped by the ONNX node's module path. Both after one untimed pass, the same
thread count, one size. Prints one table: milliseconds per group, side by side.

Usage: python models/profile_cpu.py --checkpoint CKPT --size 384x512 --threads 2 [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

import psmnet
from peers import export_onnx
from reference import load_model

GROUPS = ["feature extraction", "cost volume", "3D hourglasses", "upsampling", "softmax", "regression", "other"]


def torch_group(name: str, shapes: list) -> str:
    """The part of the network an aten operator belongs to (by its input's rank)."""
    rank = len(shapes[0]) if shapes and shapes[0] else 0
    if name in ("aten::upsample_trilinear3d",):
        return "upsampling"
    if name in ("aten::_softmax", "aten::softmax"):
        return "softmax"
    if name in ("aten::convolution", "aten::_convolution", "aten::mkldnn_convolution", "aten::conv2d",
                "mkldnn::_convolution_pointwise",
                "aten::conv3d", "aten::conv_transpose3d", "aten::slow_conv3d_forward",
                "aten::slow_conv_transpose3d", "aten::relu_", "aten::relu", "aten::add", "aten::add_",
                "aten::leaky_relu", "aten::clamp_min", "aten::clamp_min_"):
        return "3D hourglasses" if rank == 5 else "feature extraction"
    if name in ("aten::avg_pool2d", "aten::upsample_bilinear2d", "aten::cat"):
        return "feature extraction" if rank == 4 else "cost volume"
    if name in ("aten::new_zeros", "aten::zeros", "aten::zero_", "aten::fill_", "aten::copy_", "aten::slice",
                "aten::select", "aten::as_strided"):
        return "cost volume" if rank in (4, 5) else "other"
    if name in ("aten::mul", "aten::sum", "aten::arange", "aten::sub", "aten::pow", "aten::sqrt"):
        return "regression"
    return "other"


def openvino_group(name: str, kind: str) -> str:
    if kind == "Interpolate" and "feature_extraction" not in name:
        return "upsampling"
    if kind == "Softmax" or kind == "SoftMax":
        return "softmax"
    if "feature_extraction" in name:
        return "feature extraction"
    if any(part in name for part in ("/dres", "/classif")):
        return "3D hourglasses"
    if kind in ("ReduceSum", "Multiply", "Range") or "ReduceSum" in name:
        return "regression"
    if kind in ("ScatterUpdate", "Concat", "Slice", "StridedSlice", "Pad", "Broadcast", "ScatterNDUpdate"):
        return "cost volume"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--size", default="384x512")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    torch.set_num_threads(args.threads)

    model = psmnet.fold_batchnorm(load_model(args.checkpoint))
    # The ONNX export (for OpenVINO) is of this form; libtorch runs the exported one,
    # with its 3D convolution + ReLU pairs fused (what the engine loads).
    fused = psmnet.fuse_conv3d(psmnet.fold_batchnorm(load_model(args.checkpoint)))
    for module in fused.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.to(memory_format=torch.channels_last)
        elif isinstance(module, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            module.to(memory_format=torch.channels_last_3d)
        elif isinstance(module, psmnet.FusedConv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
    g = torch.Generator().manual_seed(0)
    left = torch.randn(1, 3, height, width, generator=g)
    right = torch.roll(left, shifts=-7, dims=3)

    torch_ms: dict[str, float] = defaultdict(float)
    with torch.no_grad():
        fused(left, right)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            fused(left, right)
    total_torch = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        # Self time only, so nested operators are not counted twice.
        ms = event.self_cpu_time_total / 1000.0
        torch_ms[torch_group(event.key, event.input_shapes)] += ms
        total_torch += ms

    import openvino as ov

    ov_ms: dict[str, float] = defaultdict(float)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "psmnet.onnx"
        export_onnx(model, height, width, path)
        core = ov.Core()
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": args.threads,
                                                         "INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": True})
        request = compiled.create_infer_request()
        feeds = {"left": left.numpy(), "right": right.numpy()}
        request.infer(feeds)
        request.infer(feeds)
        for info in request.profiling_info:
            ms = info.real_time.total_seconds() * 1000.0
            ov_ms[openvino_group(info.node_name, info.node_type)] += ms
    total_ov = sum(ov_ms.values())

    print(f"{height}x{width}, fp32, {args.threads} threads: milliseconds per part of one pass")
    print("| part | libtorch (our engine's layout) | OpenVINO | libtorch / OpenVINO |")
    print("|---|---|---|---|")
    for group in GROUPS:
        t, o = torch_ms.get(group, 0.0), ov_ms.get(group, 0.0)
        ratio = f"{t / o:.2f}" if o > 0 else "-"
        print(f"| {group} | {t:.0f} | {o:.0f} | {ratio} |")
    print(f"| **total** | {total_torch:.0f} | {total_ov:.0f} | {total_torch / total_ov:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "threads": args.threads, "libtorch_ms": torch_ms,
                                         "openvino_ms": ov_ms}, indent=2))


if __name__ == "__main__":
    main()
