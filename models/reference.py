"""Eager PyTorch reference for PSMNet: the numbers the Rust service must reproduce.

It runs our `psmnet.PSMNet` eagerly (no TorchScript) with exactly the
preprocessing the original app used, so it is the yardstick for parity and
accuracy:

- RGB in [0, 1] (8-bit / 255, 16-bit / 65535; grey is repeated to 3 channels,
  alpha dropped), then ImageNet mean/std per channel;
- zero padding at the top and right up to a multiple of 16 (and at least 256,
  the network's minimum), the prediction cropped back to the input size.

Commands:
  predict LEFT RIGHT --out OUT.pfm     disparity of one pair, float32 PFM
  accuracy DIR [DIR ...]               EPE / D1 against DIR/disp_gt.pfm
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
from PIL import Image

import psmnet

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def load_rgb(path: Path) -> np.ndarray:
    """Image file -> float32 (H, W, 3) in [0, 1], the same conversion the Rust side makes."""
    image = Image.open(path)
    array = np.asarray(image)
    if array.dtype == np.uint16 or image.mode.startswith("I;16"):
        array = array.astype(np.float32) / 65535.0
    elif array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == bool:
        array = array.astype(np.float32)
    else:
        raise ValueError(f"{path}: unsupported pixel type {array.dtype} (mode {image.mode})")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.shape[2] == 2:  # grey + alpha
        array = np.repeat(array[:, :, :1], 3, axis=2)
    elif array.shape[2] == 4:
        array = array[:, :, :3]
    return np.ascontiguousarray(array, dtype=np.float32)


def preprocess(rgb: np.ndarray) -> Tuple[torch.Tensor, int, int]:
    """(H, W, 3) in [0,1] -> normalised, padded (1, 3, Hp, Wp) plus the top and right pads."""
    height, width = rgb.shape[:2]
    padded_h, padded_w = psmnet.padded_size(height, width)
    normalised = (rgb - IMAGENET_MEAN) / IMAGENET_STD
    chw = np.zeros((3, padded_h, padded_w), dtype=np.float32)
    top = padded_h - height
    chw[:, top:, :width] = normalised.transpose(2, 0, 1)
    return torch.from_numpy(chw)[None], top, padded_w - width


def load_model(checkpoint: Path, align_corners: bool = True) -> psmnet.PSMNet:
    model = psmnet.PSMNet(align_corners=align_corners)
    psmnet.load_checkpoint(model, str(checkpoint))
    return model.eval()


@torch.no_grad()
def predict(model: torch.nn.Module, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Disparity (H, W) float32 of the left image."""
    if left.shape != right.shape:
        raise ValueError(f"left {left.shape} and right {right.shape} differ in size")
    height, width = left.shape[:2]
    left_t, top, _ = preprocess(left)
    right_t, _, _ = preprocess(right)
    out = model(left_t, right_t)[0]
    return out[top : top + height, :width].numpy().astype(np.float32)


@torch.no_grad()
def predict_with_uncertainty(model: torch.nn.Module, left: np.ndarray, right: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Disparity and its standard deviation, (H, W) float32 px each, of the left image."""
    if left.shape != right.shape:
        raise ValueError(f"left {left.shape} and right {right.shape} differ in size")
    height, width = left.shape[:2]
    left_t, top, _ = preprocess(left)
    right_t, _, _ = preprocess(right)
    mean, std = model.forward_with_uncertainty(left_t, right_t)
    crop = lambda t: t[0, top : top + height, :width].numpy().astype(np.float32)  # noqa: E731
    return crop(mean), crop(std)


def write_pfm(path: Path, disparity: np.ndarray) -> None:
    """Greyscale little-endian PFM, rows bottom to top (Middlebury convention)."""
    height, width = disparity.shape
    with open(path, "wb") as f:
        f.write(f"Pf\n{width} {height}\n-1.0\n".encode("ascii"))
        f.write(np.flipud(disparity).astype("<f4").tobytes())


def read_pfm(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        kind = f.readline().strip()
        if kind not in (b"Pf", b"PF"):
            raise ValueError(f"{path}: not a PFM file")
        width, height = map(int, f.readline().split())
        scale = float(f.readline())
        channels = 3 if kind == b"PF" else 1
        dtype = "<f4" if scale < 0 else ">f4"
        data = np.frombuffer(f.read(width * height * channels * 4), dtype=dtype)
    data = data.reshape(height, width, channels)[:, :, 0]
    return np.flipud(data).astype(np.float32)


def error_metrics(pred: np.ndarray, truth: np.ndarray, maxdisp: float = psmnet.MAXDISP) -> Tuple[float, float, int]:
    """EPE (px) and D1 (%: error > 3 px and > 5 % of truth) over finite truth below maxdisp."""
    valid = np.isfinite(truth) & (truth > 0) & (truth < maxdisp)
    error = np.abs(pred[valid] - truth[valid])
    d1 = (error > 3.0) & (error > 0.05 * truth[valid])
    return float(error.mean()), float(100.0 * d1.mean()), int(valid.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description="Eager PSMNet reference")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_predict = sub.add_parser("predict")
    p_predict.add_argument("left", type=Path)
    p_predict.add_argument("right", type=Path)
    p_predict.add_argument("--out", type=Path, required=True)
    p_predict.add_argument("--uncertainty", type=Path, help="also write the per-pixel standard deviation (PFM)")
    p_acc = sub.add_parser("accuracy")
    p_acc.add_argument("dirs", type=Path, nargs="+")
    p_acc.add_argument("--align-corners", choices=["true", "false", "both"], default="true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.command == "predict":
        model = load_model(args.checkpoint)
        left, right = load_rgb(args.left), load_rgb(args.right)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.uncertainty:
            disparity, deviation = predict_with_uncertainty(model, left, right)
            write_pfm(args.uncertainty, deviation)
            print(f"{args.uncertainty}: deviation mean {deviation.mean():.3f} px")
        else:
            disparity = predict(model, left, right)
        write_pfm(args.out, disparity)
        print(f"{args.out}: {disparity.shape[1]}x{disparity.shape[0]}, "
              f"min {disparity.min():.3f} max {disparity.max():.3f} mean {disparity.mean():.3f}")
        return

    settings = {"true": [True], "false": [False], "both": [True, False]}[args.align_corners]
    print("| pair | align_corners | EPE px | D1 % | valid px | seconds |")
    print("|---|---|---|---|---|---|")
    for align in settings:
        model = load_model(args.checkpoint, align_corners=align)
        for folder in args.dirs:
            left, right = load_rgb(folder / "left.png"), load_rgb(folder / "right.png")
            start = time.perf_counter()
            disparity = predict(model, left, right)
            seconds = time.perf_counter() - start
            epe, d1, valid = error_metrics(disparity, read_pfm(folder / "disp_gt.pfm"))
            print(f"| {folder.name} | {align} | {epe:.2f} | {d1:.2f} | {valid} | {seconds:.1f} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
