"""Our network on the CPU runtimes a user could take instead of ours, in one run.

The same BN-folded PSMNet (models/psmnet.py, the official KITTI 2015 weights)
is exported to ONNX (opset 17, one file per input size: the cost volume's
loop is unrolled at export) and checked against eager PyTorch; then, at each
size, these are timed round-robin (one pass of each per round, so a slow
spell of the machine weighs on all of them), fp32, the same thread count:

  eager PyTorch | TorchScript (our exported .pt, from Python) |
  ONNX Runtime (CPU provider) | OpenVINO (CPU) | our Rust engine

The Rust engine is the `speed` bench in its own process (`--passes-on-stdin`:
it loads and warms its model, then runs one pass whenever this script asks),
so its passes take their turn in the same rounds; its time is the engine
thread's. Prints a table (median seconds, ratio to the fastest peer, max
|difference| from eager) and writes JSON.

Usage (what `make bench-peers` runs):
  python models/peers.py --checkpoint CKPT --model models/psmnet_kitti2015.pt \
      --sizes 384x512,384x1248 --rounds 4 --threads 2 --json target/bench-peers.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import psmnet
from reference import load_model


def cpuinfo_field(name: str) -> str | None:
    """The first `name` line of /proc/cpuinfo (its value), or None."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(name):
            return line.split(":", 1)[1].strip()
    return None


def cpu_name() -> str:
    return cpuinfo_field("model name") or platform.processor()


def cpu_vector_isa() -> str:
    """The widest x86 vector extension the CPU reports: oneDNN (both libtorch's and
    OpenVINO's) picks its convolution kernels by it, so ratios are per kind of CPU."""
    flags = set((cpuinfo_field("flags") or "").split())
    for flag, name in (("amx_tile", "AMX"), ("avx512_bf16", "AVX-512 with bf16"), ("avx512f", "AVX-512"),
                       ("avx2", "AVX2")):
        if flag in flags:
            return name
    return platform.machine()


def export_onnx(model: torch.nn.Module, height: int, width: int, path: Path) -> None:
    left = torch.zeros(1, 3, height, width)
    torch.onnx.export(model, (left, left), str(path), opset_version=17, input_names=["left", "right"],
                      output_names=["disparity"], dynamo=False)


class Runner:
    """One runtime: `run()` gives the disparity of the bench pair (numpy, (H, W))."""

    def __init__(self, name: str, run):
        self.name = name
        self.run = run
        self.seconds: list[float] = []
        self.output: np.ndarray | None = None

    def time_once(self) -> None:
        started = time.perf_counter()
        out = self.run()
        self.seconds.append(time.perf_counter() - started)
        if out is not None:
            self.output = np.asarray(out).reshape(np.asarray(out).shape[-2:])


class RustEngine:
    """Our engine as a timing peer: the `speed` bench with `--passes-on-stdin`, one
    pass per line it is sent, its engine-thread milliseconds read back."""

    def __init__(self, args, height: int, width: int):
        self.process = subprocess.Popen(
            args.rust_cmd + ["--device", "cpu", "--size", f"{height}x{width}", "--clients", "", "--model",
                             str(args.model), "--passes-on-stdin"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline().strip()
        if line != "ready":
            self.process.kill()
            raise SystemExit(f"the Rust engine did not start (it printed {line!r}; exit {self.process.wait()})")

    def run_once(self) -> float:
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the Rust engine stopped (exit {self.process.wait()})")
        return float(line) / 1000.0

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=Path("models/psmnet_kitti2015.pt"))
    parser.add_argument("--sizes", default="384x512,384x1248")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rust-cmd", default="cargo bench --locked --bench speed --",
                        help="the speed bench's command (its engine uses every core)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.rust_cmd = args.rust_cmd.split()

    import onnxruntime as ort
    import openvino as ov

    torch.set_num_threads(args.threads)
    eager = psmnet.fold_batchnorm(load_model(args.checkpoint))
    scripted = torch.jit.load(str(args.model), map_location="cpu").eval()
    core = ov.Core()
    report = {"cpu": cpu_name(), "isa": cpu_vector_isa(), "threads": args.threads, "torch": torch.__version__,
              "onnxruntime": ort.__version__,
              "openvino": ov.__version__, "date": time.strftime("%Y-%m-%d"), "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for size in args.sizes.split(","):
            height, width = (int(v) for v in size.split("x"))
            g = torch.Generator().manual_seed(0)
            left = torch.randn(1, 3, height, width, generator=g)
            right = torch.roll(left, shifts=-7, dims=3)
            onnx_path = workdir / f"psmnet-{height}x{width}.onnx"
            export_onnx(eager, height, width, onnx_path)
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            compiled = core.compile_model(str(onnx_path), "CPU", {"INFERENCE_NUM_THREADS": args.threads,
                                                                  "INFERENCE_PRECISION_HINT": "f32"})
            feeds = {"left": left.numpy(), "right": right.numpy()}
            rust_engine = RustEngine(args, height, width)  # loads and warms up before anything is timed
            with torch.no_grad():
                runners = [
                    Runner("eager PyTorch", lambda: eager(left, right).numpy()),
                    Runner("TorchScript (from Python)", lambda: scripted(left, right).numpy()),
                    Runner("ONNX Runtime, CPU", lambda: session.run(None, feeds)[0]),
                    Runner("OpenVINO, CPU", lambda: compiled(feeds)[0]),
                ]
                rust = Runner("our Rust engine", None)
                for r in runners:  # one untimed pass each: allocations, kernel choice
                    r.time_once()
                    r.seconds.clear()
                for _ in range(args.rounds):
                    for r in runners:
                        r.time_once()
                    rust.seconds.append(rust_engine.run_once())
            rust_engine.close()
            runners.append(rust)
            reference = runners[0].output
            rows = []
            for r in runners:
                diff = None if r.output is None else float(np.abs(r.output - reference).max())
                rows.append({"runtime": r.name, "median_s": statistics.median(r.seconds), "seconds": r.seconds,
                             "max_diff_px": diff})
            peers = [row for row in rows if row["runtime"] != "our Rust engine"]
            fastest = min(peers, key=lambda row: row["median_s"])
            print(f"\n{height}x{width}, fp32, {args.threads} threads, {args.rounds} rounds, "
                  f"{report['cpu']} ({report['isa']})")
            print("| runtime | median s | vs fastest peer | max diff from eager px |")
            print("|---|---|---|---|")
            for row in rows:
                ratio = fastest["median_s"] / row["median_s"]
                diff = "-" if row["max_diff_px"] is None else f"{row['max_diff_px']:.1e}"
                print(f"| {row['runtime']} | {row['median_s']:.2f} | {ratio:.2f}x | {diff} |")
            report["sizes"][size] = {"rows": rows, "fastest_peer": fastest["runtime"]}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
