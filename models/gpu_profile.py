"""Where PSMNet's time goes on a GPU, and what each lever does to it, from Python.

One run on one CUDA device at one size (default 384x1248, KITTI), on the
repository's synthetic pair resized to that size:

  1. eager PyTorch (models/psmnet.py, fp32) and the exported TorchScript module,
     each profiled with torch.profiler over a few passes: wall time per pass,
     GPU kernel time per pass (the sum of kernel durations), kernels launched
     per pass, and the operators and kernels that take the GPU's time. Wall
     time well above kernel time means the GPU waits for the CPU to launch.
  2. the TorchScript module under each lever, timed alone (median of --iters
     passes after warm-up, CUDA-synchronised): precision fp32 / fp16 / bf16,
     convolution weights contiguous or channels-last (5D: NDHWC), and with or
     without a CUDA graph of the whole forward pass (torch.cuda.CUDAGraph).
     Each row also gives the peak GPU memory of its passes and the largest
     difference of its disparity from fp32's.
  3. two rewrites of the network that the profile suggests, scripted here from
     the checkpoint exactly as models/export.py scripts the original, and timed
     against that original under the fastest levers (fp16, channels-last, CUDA
     graph): both images through the feature extractor as one batch of two, and
     the pyramid's average pooling (64/32/16/8-pixel cells, non-overlapping) as
     a block mean instead of avg_pool2d, whose kernel sums each window serially.

Usage (tests/bench/gpu.sh runs it on the GPU machine):
  python models/gpu_profile.py --checkpoint CKPT --model models/psmnet_kitti2015.pt \
      --size 384x1248 --json OUT/profile.json > OUT/profile.txt
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Tuple

import torch
from PIL import Image

import psmnet
from reference import load_model, load_rgb, preprocess


class BatchedFeatures(psmnet.PSMNet):
    """The network with both images through the feature extractor at once."""

    def features(self, left: torch.Tensor, right: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        both = self.feature_extraction(torch.cat([left, right], 0))
        b = left.shape[0]
        return both[:b], both[b:]


class BlockMean(torch.nn.Module):
    """AvgPool2d(cell, stride=cell) as a mean over non-overlapping blocks."""

    def __init__(self, cell: int) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        oh, ow = h // self.cell, w // self.cell
        x = x[:, :, : oh * self.cell, : ow * self.cell].contiguous()
        return x.reshape(b, c, oh, self.cell, ow, self.cell).mean(dim=[3, 5])


def scripted_variant(checkpoint: Path, batched: bool, block_mean: bool, device: torch.device):
    model = (BatchedFeatures() if batched else psmnet.PSMNet()).eval()
    psmnet.load_checkpoint(model, str(checkpoint))
    if block_mean:
        fe = model.feature_extraction
        for branch, cell in ((fe.branch1, 64), (fe.branch2, 32), (fe.branch3, 16), (fe.branch4, 8)):
            branch[0] = BlockMean(cell)
    return torch.jit.script(psmnet.fold_batchnorm(model)).to(device).eval()


def pair_at(size: tuple[int, int], device: torch.device, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = []
    for side in ("left", "right"):
        image = Image.open(Path("data/synthetic") / f"{side}.png").convert("RGB")
        path = tmp / f"{side}.png"
        image.resize((size[1], size[0]), Image.BILINEAR).save(path)
        tensor, _, _ = preprocess(load_rgb(path))
        tensors.append(tensor.to(device))
    return tensors[0], tensors[1]


def to_channels_last(module: torch.nn.Module) -> None:
    """Weights NHWC / NDHWC, as the Rust engine's --memory-format channels-last does."""
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.dim() == 4:
                parameter.data = parameter.data.contiguous(memory_format=torch.channels_last)
            elif parameter.dim() == 5:
                parameter.data = parameter.data.contiguous(memory_format=torch.channels_last_3d)


@torch.no_grad()
def profile(name: str, module, left, right, passes: int = 5) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for _ in range(3):
        module(left, right)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(passes):
            module(left, right)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - started) * 1000 / passes
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_ms = sum(e.device_time for e in events) / 1000 / passes
    kernels = len(events) / passes
    by_name: dict[str, float] = {}
    for e in events:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time / 1000 / passes
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60)
    print(f"\n== profile: {name} ==\nwall {wall:.2f} ms/pass, GPU kernels {kernel_ms:.2f} ms/pass, "
          f"{kernels:.0f} kernels/pass, GPU busy {100 * kernel_ms / wall:.0f} %")
    for kernel, ms in top:
        print(f"  {ms:8.3f} ms  {kernel[:110]}")
    print(table)
    return {"wall_ms": wall, "kernel_ms": kernel_ms, "kernels_per_pass": kernels,
            "top_kernels_ms": [{"name": k, "ms": ms} for k, ms in top]}


@torch.no_grad()
def time_variant(module, left, right, iters: int, use_graph: bool) -> tuple[dict, float, torch.Tensor]:
    for _ in range(3):  # autotuning, profiling executor, its optimised pass
        out = module(left, right)
    torch.cuda.synchronize()
    run = lambda: module(left, right)  # noqa: E731
    if use_graph:
        static_left, static_right = left.clone(), right.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            module(static_left, static_right)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = module(static_left, static_right)

        def run():  # noqa: F811
            static_left.copy_(left)
            static_right.copy_(right)
            graph.replay()
            return static_out
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        out = run()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1000)
    peak = torch.cuda.max_memory_allocated() / 2**20
    s = sorted(times)
    return {"p50": statistics.median(s), "mean": sum(s) / len(s), "min": s[0], "p95": s[round(0.95 * (len(s) - 1))]}, \
        peak, out.float().clone()


def inductor(args, left, right, device) -> list:
    """5. What AOTInductor would give: torch.compile (Inductor, the same code generator) of the
    BatchNorm-folded network, fp16, channels-last, one static shape, against the exported
    TorchScript module under the same levers (CUDA graph), with the compile time."""
    rows = []
    left16, right16 = left.half(), right.half()
    scripted = torch.jit.load(str(args.model), map_location=device).eval().half()
    to_channels_last(scripted)
    base, _, base_out = time_variant(scripted, left16, right16, args.iters, True)
    rows.append({"variant": "TorchScript + CUDA graph", "latency_ms": base})
    print("\n| compiled | compile s | p50 ms | TorchScript + graph p50 ms | max diff px | mean diff px |")
    print("|---|---|---|---|---|---|")
    for mode in ("max-autotune-no-cudagraphs", "reduce-overhead"):
        try:
            model = psmnet.fold_batchnorm(load_model(args.checkpoint)).to(device).half().eval()
            to_channels_last(model)
            compiled = torch.compile(model, mode=mode, dynamic=False, fullgraph=False)
            started = time.perf_counter()
            with torch.no_grad():
                for _ in range(3):
                    compiled(left16, right16)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - started
            timing, _, out = time_variant(compiled, left16, right16, args.iters, mode != "reduce-overhead")
            diff = (out - base_out).abs()
            print(f"| {mode} | {compile_s:.0f} | {timing['p50']:.2f} | {base['p50']:.2f} | {diff.max().item():.4f} | "
                  f"{diff.mean().item():.6f} |")
            rows.append({"variant": mode, "compile_s": compile_s, "latency_ms": timing,
                         "max_diff_px": diff.max().item(), "mean_diff_px": diff.mean().item()})
        except Exception as e:
            print(f"| {mode} | failed: {str(e).splitlines()[0][:150]} |")
            rows.append({"variant": mode, "error": str(e)[:800]})
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=Path("models/psmnet_kitti2015.pt"))
    parser.add_argument("--size", default="384x1248", help="HxW, multiples of 16")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", choices=["inductor"], help="run just that section")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    height, width = (int(v) for v in args.size.split("x"))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        left, right = pair_at((height, width), device, Path(tmp))
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, size {height}x{width}, "
          f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, matmul tf32={torch.backends.cuda.matmul.allow_tf32}")

    result: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "size": [height, width]}
    if args.only == "inductor":
        result["inductor"] = inductor(args, left, right, device)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return
    eager = load_model(args.checkpoint).to(device)
    scripted = torch.jit.load(str(args.model), map_location=device).eval()
    result["profile"] = {"eager_fp32": profile("eager fp32", eager, left, right),
                         "torchscript_fp32": profile("TorchScript fp32", scripted, left, right)}
    fast = torch.jit.load(str(args.model), map_location=device).eval().half()
    to_channels_last(fast)
    result["profile"]["torchscript_fp16_channels_last"] = profile(
        "TorchScript fp16 channels-last", fast, left.half(), right.half())
    del eager, scripted, fast
    torch.cuda.empty_cache()

    rows = []
    reference_out = None
    print("\n| precision | weights | CUDA graph | p50 ms | mean ms | min ms | peak MiB | max diff vs fp32 px |")
    print("|---|---|---|---|---|---|---|---|")
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        for layout in ("contiguous", "channels-last"):
            for use_graph in (False, True):
                module = torch.jit.load(str(args.model), map_location=device).eval().to(dtype)
                if layout == "channels-last":
                    to_channels_last(module)
                try:
                    timing, peak, out = time_variant(module, left.to(dtype), right.to(dtype), args.iters, use_graph)
                except Exception as e:  # a lever that fails is a finding, not a crash
                    print(f"| {precision} | {layout} | {use_graph} | failed: {str(e).splitlines()[0][:120]} |")
                    rows.append({"precision": precision, "weights": layout, "graph": use_graph, "error": str(e)[:500]})
                    continue
                if reference_out is None:
                    reference_out = out
                diff = (out - reference_out).abs().max().item()
                mean_diff = (out - reference_out).abs().mean().item()
                print(f"| {precision} | {layout} | {'yes' if use_graph else 'no'} | {timing['p50']:.2f} | "
                      f"{timing['mean']:.2f} | {timing['min']:.2f} | {peak:.0f} | {diff:.4f} (mean {mean_diff:.5f}) |")
                rows.append({"precision": precision, "weights": layout, "graph": use_graph, "latency_ms": timing,
                             "peak_mib": peak, "max_diff_vs_fp32_px": diff, "mean_diff_vs_fp32_px": mean_diff})
                del module
                torch.cuda.empty_cache()
    result["levers"] = rows

    # 3. Rewrites of the network, under fp16 + channels-last + CUDA graph, interleaved twice.
    print("\n| rewrite | p50 ms (1st) | p50 ms (2nd) | max diff vs original px | mean diff px |")
    print("|---|---|---|---|---|")
    rewrites = []
    outputs = {}
    variants = [("original", False, False), ("batched features", True, False), ("block-mean pooling", False, True),
                ("both", True, True)]
    for round_ in range(2):
        for name, batched, block_mean in variants:
            module = scripted_variant(args.checkpoint, batched, block_mean, device).half()
            to_channels_last(module)
            timing, _, out = time_variant(module, left.half(), right.half(), args.iters, True)
            outputs.setdefault(name, out)
            rewrites.append({"rewrite": name, "round": round_, "latency_ms": timing})
            del module
            torch.cuda.empty_cache()
    for name, _, _ in variants:
        p50s = [r["latency_ms"]["p50"] for r in rewrites if r["rewrite"] == name]
        diff = (outputs[name] - outputs["original"]).abs()
        print(f"| {name} | {p50s[0]:.2f} | {p50s[1]:.2f} | {diff.max().item():.4f} | {diff.mean().item():.6f} |")
    result["rewrites"] = rewrites

    # 4. Frozen graphs: torch.jit.freeze inlines the weights as constants; optimize_for_inference
    # then fuses, on CUDA, convolution + bias (+ add) + ReLU into cuDNN's fused kernels, which the
    # 145 separate bias adds a pass (2.5 ms in fp16 channels-last) call for.
    print("\n| frozen | p50 ms (1st) | p50 ms (2nd) | max diff vs original px | mean diff px | kernels/pass |")
    print("|---|---|---|---|---|---|")
    frozen_rows = []
    frozen_out = {}
    kernels = {}

    def prepared(kind: str):
        module = torch.jit.load(str(args.model), map_location=device).eval().half()
        to_channels_last(module)
        if kind == "freeze":
            module = torch.jit.freeze(module)
        elif kind == "freeze + optimize_for_inference":
            module = torch.jit.optimize_for_inference(torch.jit.freeze(module))
        return module

    kinds = ["original", "freeze", "freeze + optimize_for_inference"]
    for round_ in range(2):
        for kind in kinds:
            try:
                module = prepared(kind)
                timing, _, out = time_variant(module, left.half(), right.half(), args.iters, True)
                if round_ == 0:
                    kernels[kind] = profile(f"fp16 channels-last, {kind}", module, left.half(), right.half(), passes=2)
            except Exception as e:
                print(f"| {kind} | failed: {str(e).splitlines()[0][:150]} |")
                frozen_rows.append({"frozen": kind, "round": round_, "error": str(e)[:500]})
                continue
            frozen_out.setdefault(kind, out)
            frozen_rows.append({"frozen": kind, "round": round_, "latency_ms": timing})
            del module
            torch.cuda.empty_cache()
    for kind in kinds:
        p50s = [r["latency_ms"]["p50"] for r in frozen_rows if r["frozen"] == kind and "latency_ms" in r]
        if kind not in frozen_out or "original" not in frozen_out or len(p50s) < 2:
            continue
        diff = (frozen_out[kind] - frozen_out["original"]).abs()
        print(f"| {kind} | {p50s[0]:.2f} | {p50s[1]:.2f} | {diff.max().item():.4f} | {diff.mean().item():.6f} | "
              f"{kernels.get(kind, {}).get('kernels_per_pass', float('nan')):.0f} |")
    result["frozen"] = frozen_rows
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
