"""PSMNet (stacked hourglass), written for current PyTorch and TorchScript.

This is our own definition of the network from Chang & Chen, "Pyramid Stereo
Matching Network" (CVPR 2018). Module names follow the layout of the official
checkpoints so that `pretrained_model_KITTI2015.tar` loads with `strict=True`
once the `module.` prefix left by `nn.DataParallel` is removed.

Design choices:
- Nothing is tied to a device or dtype: every tensor created inside `forward`
  is created from the input's device and dtype, so the same module runs on CPU
  or CUDA, in fp32 or fp16.
- Every upsampling uses `align_corners=True` by default. The checkpoint was trained on
  PyTorch 0.3/0.4, whose bilinear upsampling behaved that way; with `False`
  the end-point error on real pairs is clearly worse (see
  `../shared/stereo/README.md` and `models/README.md`). The flag stays a
  constructor argument only so that `reference.py` can show that difference.
- The soft-argmin (softmax + disparity regression) runs in fp32 whatever the
  input dtype: it averages 192 probabilities and is sensitive to rounding.
- The module is TorchScript-friendly (`torch.jit.script`), so one exported
  file accepts any input whose height and width are multiples of 16 and at
  least `MIN_SIZE`.
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

#: Largest disparity the network can express, in pixels of the input.
MAXDISP = 192
#: Height and width of the input must be multiples of this (two stride-2
#: stages in the feature extractor, two more in each 3D hourglass).
SIZE_MULTIPLE = 16
#: The coarsest pyramid-pooling branch averages 64x64 cells of the 1/4
#: feature map, so the input must be at least 4 * 64 pixels each way.
MIN_SIZE = 256


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, pad: int, dilation: int) -> nn.Sequential:
    # A dilated 3x3 keeps the spatial size only if padding equals the dilation.
    padding = dilation if dilation > 1 else pad
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
    )


def _conv_bn_3d(cin: int, cout: int, kernel: int, stride: int, pad: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel, stride=stride, padding=pad, bias=False),
        nn.BatchNorm3d(cout),
    )


def _deconv_bn_3d(cin: int, cout: int) -> nn.Sequential:
    # Doubles every spatial dimension exactly (for even inputs to the matching conv).
    return nn.Sequential(
        nn.ConvTranspose3d(cin, cout, 3, stride=2, padding=1, output_padding=1, bias=False),
        nn.BatchNorm3d(cout),
    )


class ResidualBlock(nn.Module):
    """Two 3x3 conv+BN with an identity (or 1x1 projection) shortcut, no final ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, dilation: int):
        super().__init__()
        self.conv1 = nn.Sequential(_conv_bn(cin, cout, 3, stride, 1, dilation), nn.ReLU(inplace=True))
        self.conv2 = _conv_bn(cout, cout, 3, 1, 1, dilation)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(x)
        return self.conv2(self.conv1(x)) + shortcut


def _residual_stage(cin: int, cout: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
    layers: List[nn.Module] = [ResidualBlock(cin, cout, stride, dilation)]
    layers += [ResidualBlock(cout, cout, 1, dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class FeatureExtraction(nn.Module):
    """Shared 2D CNN + spatial pyramid pooling: image -> 32-channel features at 1/4 size."""

    def __init__(self, align_corners: bool = True) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.firstconv = nn.Sequential(
            _conv_bn(3, 32, 3, 2, 1, 1), nn.ReLU(inplace=True),
            _conv_bn(32, 32, 3, 1, 1, 1), nn.ReLU(inplace=True),
            _conv_bn(32, 32, 3, 1, 1, 1), nn.ReLU(inplace=True),
        )
        self.layer1 = _residual_stage(32, 32, 3, 1, 1)
        self.layer2 = _residual_stage(32, 64, 16, 2, 1)
        self.layer3 = _residual_stage(64, 128, 3, 1, 1)
        self.layer4 = _residual_stage(128, 128, 3, 1, 2)
        # Pyramid pooling over 64, 32, 16 and 8 cells of the 1/4 map.
        self.branch1 = self._pool_branch(64)
        self.branch2 = self._pool_branch(32)
        self.branch3 = self._pool_branch(16)
        self.branch4 = self._pool_branch(8)
        self.lastconv = nn.Sequential(
            _conv_bn(320, 128, 3, 1, 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(128, 32, 1, padding=0, stride=1, bias=False),
        )

    @staticmethod
    def _pool_branch(cell: int) -> nn.Sequential:
        return nn.Sequential(
            nn.AvgPool2d((cell, cell), stride=(cell, cell)),
            _conv_bn(128, 32, 1, 1, 0, 1),
            nn.ReLU(inplace=True),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.firstconv(image))
        raw = self.layer2(x)
        skip = self.layer4(self.layer3(raw))
        size = [skip.shape[2], skip.shape[3]]
        # Concatenation order (finest pooling first) is fixed by the weights of lastconv.
        pooled = [
            raw,
            skip,
            self._upsample(self.branch4(skip), size),
            self._upsample(self.branch3(skip), size),
            self._upsample(self.branch2(skip), size),
            self._upsample(self.branch1(skip), size),
        ]
        return self.lastconv(torch.cat(pooled, 1))

    def _upsample(self, x: torch.Tensor, size: List[int]) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)


class Hourglass(nn.Module):
    """3D encoder-decoder over the cost volume (1/4 -> 1/16 -> 1/4 resolution)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        wide = channels * 2
        self.conv1 = nn.Sequential(_conv_bn_3d(channels, wide, 3, 2, 1), nn.ReLU(inplace=True))
        self.conv2 = _conv_bn_3d(wide, wide, 3, 1, 1)
        self.conv3 = nn.Sequential(_conv_bn_3d(wide, wide, 3, 2, 1), nn.ReLU(inplace=True))
        self.conv4 = nn.Sequential(_conv_bn_3d(wide, wide, 3, 1, 1), nn.ReLU(inplace=True))
        self.conv5 = _deconv_bn_3d(wide, wide)
        self.conv6 = _deconv_bn_3d(wide, channels)

    def forward(
        self, x: torch.Tensor, presqu: Optional[torch.Tensor], postsqu: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre = self.conv2(self.conv1(x))
        if postsqu is not None:
            pre = pre + postsqu
        pre = F.relu(pre)
        out = self.conv4(self.conv3(pre))
        up = self.conv5(out)
        if presqu is not None:
            post = F.relu(up + presqu)
        else:
            post = F.relu(up + pre)
        return self.conv6(post), pre, post


def _classifier() -> nn.Sequential:
    return nn.Sequential(
        _conv_bn_3d(32, 32, 3, 1, 1), nn.ReLU(inplace=True),
        nn.Conv3d(32, 1, 3, padding=1, stride=1, bias=False),
    )


class PSMNet(nn.Module):
    """Stacked-hourglass PSMNet in inference form: returns only the final disparity.

    Input: left and right images, (B, 3, H, W), ImageNet-normalised, H and W
    multiples of `SIZE_MULTIPLE` and at least `MIN_SIZE`. Output: (B, H, W)
    disparity of the left image in pixels, fp32; `forward_with_uncertainty`
    adds its per-pixel standard deviation.
    """

    def __init__(self, maxdisp: int = MAXDISP, align_corners: bool = True) -> None:
        super().__init__()
        self.maxdisp = maxdisp
        self.align_corners = align_corners
        self.feature_extraction = FeatureExtraction(align_corners)
        self.dres0 = nn.Sequential(
            _conv_bn_3d(64, 32, 3, 1, 1), nn.ReLU(inplace=True),
            _conv_bn_3d(32, 32, 3, 1, 1), nn.ReLU(inplace=True),
        )
        self.dres1 = nn.Sequential(
            _conv_bn_3d(32, 32, 3, 1, 1), nn.ReLU(inplace=True),
            _conv_bn_3d(32, 32, 3, 1, 1),
        )
        self.dres2 = Hourglass(32)
        self.dres3 = Hourglass(32)
        self.dres4 = Hourglass(32)
        self.classif1 = _classifier()
        self.classif2 = _classifier()
        self.classif3 = _classifier()

    def cost_volume(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Concatenation volume (B, 2C, D/4, H/4, W/4): left features beside right features shifted by d.

        With channels-last features (what the engine runs on the CPU and CUDA), the volume is
        built channels-last too, the layout the first 3D convolution reads: otherwise that
        convolution first copies the whole volume into it (the largest tensor of the pass;
        about 4 % of a CPU pass at 384x512). Only the entries no shift reaches (x < d) are
        zeroed, not the whole volume. Same values either way.
        """
        b, c, h, w = left.shape
        levels = self.maxdisp // 4
        if left.is_contiguous(memory_format=torch.channels_last):
            cost = torch.empty((b, 2 * c, levels, h, w), dtype=left.dtype, device=left.device,
                               memory_format=torch.channels_last_3d)
            cost[:, :, 1:, :, :levels].zero_()
        else:
            cost = left.new_zeros((b, 2 * c, levels, h, w))
        cost[:, :c, 0] = left
        cost[:, c:, 0] = right
        for d in range(1, min(levels, w)):
            cost[:, :c, d, :, d:] = left[:, :, :, d:]
            cost[:, c:, d, :, d:] = right[:, :, :, : w - d]
        return cost

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        prob = self.probabilities(left, right)
        disparities = torch.arange(self.maxdisp, dtype=prob.dtype, device=prob.device)
        return (prob * disparities.view(1, -1, 1, 1)).sum(1)

    @torch.jit.export
    def forward_with_uncertainty(self, left: torch.Tensor, right: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The disparity (the mean of the network's distribution over disparities, exactly as
        `forward`) and that distribution's standard deviation, both (B, H, W) px, fp32.

        The deviation comes from the same softmax, no second pass through the network; it is
        computed centred, sum p (d - mean)^2, because E[d^2] - E[d]^2 loses a confident
        pixel's small variance to rounding (E[d^2] reaches 191^2 while the variance is ~0.01).
        """
        prob = self.probabilities(left, right)
        disparities = torch.arange(self.maxdisp, dtype=prob.dtype, device=prob.device).view(1, -1, 1, 1)
        mean = (prob * disparities).sum(1)
        variance = (prob * (disparities - mean.unsqueeze(1)).pow(2)).sum(1)
        return mean, variance.sqrt()

    def features(self, left: torch.Tensor, right: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Feature maps of both images (one extractor, shared weights)."""
        return self.feature_extraction(left), self.feature_extraction(right)

    def probabilities(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """(B, maxdisp, H, W) fp32: for each pixel, the probability of each integer disparity."""
        left_features, right_features = self.features(left, right)
        cost = self.cost_volume(left_features, right_features)

        cost0 = self.dres0(cost)
        cost0 = self.dres1(cost0) + cost0
        out1, pre1, post1 = self.dres2(cost0, None, None)
        out1 = out1 + cost0
        out2, _, post2 = self.dres3(out1, pre1, post1)
        out2 = out2 + cost0
        out3, _, _ = self.dres4(out2, pre1, post2)
        out3 = out3 + cost0

        # Only the last stage is needed at inference; its logits are the sum of all three heads.
        logits = self.classif1(out1)
        logits = self.classif2(out2) + logits
        logits = self.classif3(out3) + logits

        full = [self.maxdisp, left.shape[2], left.shape[3]]
        logits = F.interpolate(logits.float(), size=full, mode="trilinear", align_corners=self.align_corners)
        return F.softmax(logits.squeeze(1), dim=1)


def load_checkpoint(model: PSMNet, path: str) -> None:
    """Load the official checkpoint strictly, dropping the `module.` prefix of DataParallel."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    stripped = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    model.load_state_dict(stripped, strict=True)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Folds every eval-mode BatchNorm into the convolution before it, in place.

    In inference a BatchNorm is a per-channel affine map, so `BN(conv(x))` equals
    a convolution with rescaled weights and a bias: one pass over each large 5D
    activation instead of two (about 8 % of CPU time at 256x512). The result
    matches the unfolded network to float32 rounding (~1e-6 px mean).
    """
    for name, child in model.named_children():
        is_pair = (
            isinstance(child, nn.Sequential)
            and len(child) == 2
            and isinstance(child[0], (nn.Conv2d, nn.Conv3d, nn.ConvTranspose3d))
            and isinstance(child[1], (nn.BatchNorm2d, nn.BatchNorm3d))
        )
        if is_pair:
            fused = fuse_conv_bn_eval(child[0], child[1], transpose=isinstance(child[0], nn.ConvTranspose3d))
            setattr(model, name, nn.Sequential(fused, nn.Identity()))
        else:
            fold_batchnorm(child)
    return model


class FusedConv3d(nn.Module):
    """A folded 3D convolution or transposed convolution, optionally followed by ReLU, run on
    the CPU as one direct oneDNN call.

    Two reasons, both measured on the CPU in fp32: oneDNN applies the ReLU as a post-op while
    the output is still in cache (a pass less over a large 5-D activation per convolution);
    and calling oneDNN directly keeps the coarsest hourglass level (batch 1, 64 channels at
    1/16 size) off PyTorch's generic im2col kernels (`slow_conv3d_forward`,
    `slow_conv_transpose3d`), to which its size heuristic sends them. On CUDA (and for
    other number formats) it is the plain convolution and ReLU. Same maths either way.
    """

    def __init__(self, conv: nn.Module, relu: bool) -> None:
        super().__init__()
        if not isinstance(conv, (nn.Conv3d, nn.ConvTranspose3d)):
            raise TypeError(f"not a 3D convolution: {type(conv).__name__}")
        self.transposed = isinstance(conv, nn.ConvTranspose3d)
        self.relu = relu
        self.weight = conv.weight
        channels = conv.out_channels
        bias = conv.bias if conv.bias is not None else torch.zeros(channels)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.padding: List[int] = [int(p) for p in conv.padding]
        self.stride: List[int] = [int(s) for s in conv.stride]
        self.output_padding: List[int] = [int(p) for p in conv.output_padding] if self.transposed else [0, 0, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32:
            return self._onednn(x)
        if self.transposed:
            y = F.conv_transpose3d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding)
        else:
            y = F.conv3d(x, self.weight, self.bias, self.stride, self.padding)
        return torch.relu_(y) if self.relu else y

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        attr = "relu" if self.relu else "none"
        no_scalars: List[Optional[Union[int, float, complex]]] = []
        if self.transposed:
            # The engine lays 5-D weights out channels-last; oneDNN's transposed convolution
            # reorders such a weight on every call, a plain one (110k values) costs nothing.
            return torch.ops.mkldnn._convolution_transpose_pointwise(
                x, self.weight.contiguous(), self.bias, self.padding, self.output_padding, self.stride,
                [1, 1, 1], 1, attr, no_scalars, None
            )
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, [1, 1, 1], 1, attr, no_scalars, None
        )


def _folded_conv3d(module: nn.Module) -> Optional[nn.Module]:
    """The 3D convolution of a folded `Sequential(conv, Identity)` (or a bare one), else None."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        return module
    is_folded = (
        isinstance(module, nn.Sequential)
        and len(module) == 2
        and isinstance(module[0], (nn.Conv3d, nn.ConvTranspose3d))
        and isinstance(module[1], nn.Identity)
    )
    return module[0] if is_folded else None


def fuse_conv3d(model: nn.Module) -> nn.Module:
    """Replaces every 3D convolution (after [`fold_batchnorm`]) by a [`FusedConv3d`], taking a
    ReLU that directly follows it in a `Sequential` into it; returns the model (changed in
    place, except where the model itself is such a convolution)."""
    conv = _folded_conv3d(model)
    if conv is not None:
        return FusedConv3d(conv, relu=False)
    if isinstance(model, nn.Sequential):
        children = list(model.children())
        fused: List[nn.Module] = []
        k = 0
        while k < len(children):
            conv = _folded_conv3d(children[k])
            if conv is None:
                fused.append(fuse_conv3d(children[k]))
                k += 1
                continue
            relu = k + 1 < len(children) and isinstance(children[k + 1], nn.ReLU)
            fused.append(FusedConv3d(conv, relu))
            k += 2 if relu else 1
        return fused[0] if len(fused) == 1 else nn.Sequential(*fused)
    for name, child in model.named_children():
        setattr(model, name, fuse_conv3d(child))
    return model


def padded_size(height: int, width: int) -> Tuple[int, int]:
    """Network input size for an image: next multiple of 16, at least MIN_SIZE each way."""

    def up(n: int) -> int:
        return max(MIN_SIZE, (n + SIZE_MULTIPLE - 1) // SIZE_MULTIPLE * SIZE_MULTIPLE)

    return up(height), up(width)
