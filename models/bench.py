"""Speed benchmark, one run on one device: Python eager vs TorchScript vs Rust.

For each size (HxW) it measures, on the same device in the same run:
  (a) eager PyTorch of models/psmnet.py, fp32;
  (b) the exported TorchScript module, called from Python;
  (c) the Rust engine alone (no HTTP)            } through the Rust speed bench
  (d) the full HTTP path, 1 / 4 / 16 clients     } (tests/bench/speed.rs)
with latency (mean, p50, p95, p99), throughput for (d), and peak memory (GPU
memory on CUDA, resident memory on CPU). Prints a table and writes JSON.

Usage (what `make bench` runs):
  python models/bench.py --checkpoint CKPT --device cpu --sizes 256x512 \
      --speed-cmd "cargo bench --bench speed --" --json target/bench.json
On a GPU machine without cargo, point --speed-cmd at a carried bench binary and
set STEREO_RECON_BIN to the carried server binary.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reference import load_model, load_rgb, preprocess


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Resets this process's resident-memory high-water mark (VmHWM).
        Path("/proc/self/clear_refs").write_text("5")


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stats(samples: list[float]) -> dict:
    s = sorted(samples)
    pick = lambda p: s[round(p / 100 * (len(s) - 1))]  # noqa: E731
    return {"n": len(s), "mean": sum(s) / len(s), "p50": pick(50), "p95": pick(95), "p99": pick(99), "min": s[0]}


@torch.no_grad()
def time_module(module, left: torch.Tensor, right: torch.Tensor, iters: int, device: torch.device) -> tuple[dict, float, torch.Tensor]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = module(left, right)  # untimed: allocation, cuDNN autotuning, profiling executor
    module(left, right)
    sync()
    peak_reset(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        out = module(left, right)
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return stats(times), peak_mib(device), out


def resized_pair(size: tuple[int, int], tmp: Path) -> tuple[Path, Path]:
    paths = []
    for side in ("left", "right"):
        image = Image.open(Path("data/synthetic") / f"{side}.png").convert("RGB")
        path = tmp / f"{side}_{size[0]}x{size[1]}.png"
        image.resize((size[1], size[0]), Image.BILINEAR).save(path)
        paths.append(path)
    return paths[0], paths[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=Path("models/psmnet_kitti2015.pt"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", default=["256x512"], help="HxW, multiples of 16")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--speed-cmd", default="cargo bench --locked --bench speed --")
    parser.add_argument("--json", type=Path, default=Path("target/bench.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    eager = load_model(args.checkpoint).to(device)
    scripted = torch.jit.load(str(args.model), map_location=device).eval()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size_text in args.sizes:
            height, width = (int(v) for v in size_text.split("x"))
            left_path, right_path = resized_pair((height, width), Path(tmp))
            left, _, _ = preprocess(load_rgb(left_path))
            right, _, _ = preprocess(load_rgb(right_path))
            left, right = left.to(device), right.to(device)
            eager_stats, eager_peak, eager_out = time_module(eager, left, right, args.iters, device)
            script_stats, script_peak, script_out = time_module(scripted, left, right, args.iters, device)
            diff = (script_out - eager_out).abs().mean().item()
            rust_json = Path(tmp) / f"rust_{size_text}.json"
            command = shlex.split(args.speed_cmd) + [
                "--device", args.device, "--size", size_text, "--iters", str(args.iters),
                "--left", str(left_path), "--right", str(right_path), "--model", str(args.model),
                "--requests-per-client", str(args.requests_per_client), "--json", str(rust_json),
            ]
            print("running:", " ".join(command), file=sys.stderr)
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            rust = json.loads(rust_json.read_text())
            results.append({
                "size": [height, width],
                "device": args.device,
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "eager_fp32": {"latency_ms": eager_stats, "peak_memory_mib": eager_peak},
                "torchscript_python": {"latency_ms": script_stats, "peak_memory_mib": script_peak,
                                       "mean_abs_diff_vs_eager_px": diff},
                "rust_engine": rust["rust_engine"],
                "http": rust["http"],
            })

    memory = "GPU MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"\n| size | path | clients | mean ms | p50 ms | p95 ms | p99 ms | pairs/s | {memory} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        size = f"{r['size'][0]}x{r['size'][1]}"
        rows = [
            ("(a) eager PyTorch fp32", "1", r["eager_fp32"]["latency_ms"], None, r["eager_fp32"]["peak_memory_mib"]),
            ("(b) TorchScript from Python", "1", r["torchscript_python"]["latency_ms"], None,
             r["torchscript_python"]["peak_memory_mib"]),
            ("(c) Rust engine, no HTTP", "1", r["rust_engine"]["latency_ms"], None, r["rust_engine"]["peak_memory_mib"]),
        ] + [
            ("(d) Rust HTTP, full request", str(h["clients"]), h["latency_ms"], h["throughput_per_s"], h["peak_memory_mib"])
            for h in r["http"]
        ]
        for name, clients, lat, tput, mem in rows:
            tput = f"{tput:.2f}" if tput is not None else f"{1000 / lat['mean']:.2f}"
            print(f"| {size} | {name} | {clients} | {lat['mean']:.1f} | {lat['p50']:.1f} | {lat['p95']:.1f} | "
                  f"{lat['p99']:.1f} | {tput} | {mem:.0f} |")
    speedup = [r["eager_fp32"]["latency_ms"]["mean"] / r["rust_engine"]["latency_ms"]["mean"] for r in results]
    print("\nRust engine speed-up over eager: " + ", ".join(f"{s:.2f}x" for s in speedup))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
