"""Parity check: the Rust service against the eager PyTorch reference, pair by pair.

For every pair folder given (left.* and right.*), runs `reference.predict`
(eager PyTorch, our psmnet.py, the reference preprocessing) and the Rust
binary's `predict` (TorchScript through libtorch, Rust preprocessing), then
reports the mean and max |difference| of the two disparity maps. The target is
a mean below 0.01 px on CPU fp32.

Usage:
  python models/parity.py --checkpoint CKPT --binary target/release/stereo-recon \
      [--model models/psmnet_kitti2015.pt] [--json OUT.json] DIR [DIR ...]
Exits non-zero if any pair misses the target.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from reference import load_model, load_rgb, predict, read_pfm

TARGET_MEAN_PX = 0.01
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def find_pairs(root: Path) -> list[Path]:
    """`root` if it is a pair folder, else the pair folders below it."""

    def image(folder: Path, stem: str) -> Path | None:
        return next((folder / f"{stem}{s}" for s in IMAGE_SUFFIXES if (folder / f"{stem}{s}").is_file()), None)

    if image(root, "left") and image(root, "right"):
        return [root]
    return [p for d in sorted(x for x in root.iterdir() if x.is_dir()) for p in find_pairs(d)]


def main() -> None:
    parser = argparse.ArgumentParser(description="Rust service vs eager PyTorch parity")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--binary", type=Path, required=True, help="the stereo-recon executable")
    parser.add_argument("--model", type=Path, default=Path("models/psmnet_kitti2015.pt"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("dirs", type=Path, nargs="+")
    args = parser.parse_args()

    pairs = [p for d in args.dirs for p in find_pairs(d)]
    if not pairs:
        raise SystemExit("no pair folders found")
    model = load_model(args.checkpoint)
    results = []
    print("| pair | size | mean abs diff px | max abs diff px | eager s | rust s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for folder in pairs:
            left_path = next(folder / f"left{s}" for s in IMAGE_SUFFIXES if (folder / f"left{s}").is_file())
            right_path = next(folder / f"right{s}" for s in IMAGE_SUFFIXES if (folder / f"right{s}").is_file())
            start = time.perf_counter()
            eager = predict(model, load_rgb(left_path), load_rgb(right_path))
            eager_s = time.perf_counter() - start
            out = Path(tmp) / f"{folder.name}.pfm"
            start = time.perf_counter()
            subprocess.run(
                [str(args.binary), "predict", str(left_path), str(right_path), "-o", str(out),
                 "--device", "cpu", "--model", str(args.model)],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            rust_s = time.perf_counter() - start
            rust = read_pfm(out)
            diff = np.abs(rust.astype(np.float64) - eager.astype(np.float64))
            result = {
                "pair": folder.name,
                "width": int(eager.shape[1]),
                "height": int(eager.shape[0]),
                "mean_abs_diff_px": float(diff.mean()),
                "max_abs_diff_px": float(diff.max()),
                "eager_seconds": eager_s,
                "rust_seconds_including_start": rust_s,
            }
            results.append(result)
            print(f"| {folder.name} | {result['width']}x{result['height']} | {result['mean_abs_diff_px']:.2e} | "
                  f"{result['max_abs_diff_px']:.2e} | {eager_s:.1f} | {rust_s:.1f} |")
            sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps({"target_mean_px": TARGET_MEAN_PX, "pairs": results}, indent=2) + "\n")
    failed = [r["pair"] for r in results if r["mean_abs_diff_px"] >= TARGET_MEAN_PX]
    if failed:
        raise SystemExit(f"parity target (mean < {TARGET_MEAN_PX} px) missed on: {', '.join(failed)}")
    print(f"all {len(results)} pair(s) within mean < {TARGET_MEAN_PX} px")


if __name__ == "__main__":
    main()
