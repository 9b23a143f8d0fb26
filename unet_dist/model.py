"""The U-Net (Ronneberger et al. 2015) in 2D or 3D, and the arithmetic around it.

Per level: two 3x3 convs, each followed by a norm and ReLU; max-pool between levels; on the way up an
up-convolution (or interpolation + 1x1 conv) halves the channels, the skip is concatenated and two
convs follow; a final 1x1 conv gives `out_channels` logits.

Shapes, halo, receptive field and FLOPs are computed analytically from the config (no forward pass),
so the predictor and the CLI can plan tiles without building the network. Spatial shapes are given
without batch and channel axes: (Y, X) in 2D, (Z, Y, X) in 3D.

`anisotropic_levels` (3D only) makes the first N levels use (1, 3, 3) convs and (1, 2, 2) pooling,
for EM stacks whose sections are much thicker than the pixel size.
"""

from __future__ import annotations

import math
from numbers import Integral
from dataclasses import dataclass, replace

import torch
from torch import nn

from unet_dist.config import ModelConfig, validate_model
from unet_dist.errors import UserError

@dataclass(frozen=True)
class _Arch:
    """A validated config with the per-level kernel and pooling sizes spelled out."""

    dims: int
    in_channels: int
    out_channels: int
    depth: int
    base_channels: int
    norm: str
    upsample: str
    padding: str
    kernels: tuple[tuple[int, ...], ...]  # per level 0..depth
    pools: tuple[tuple[int, ...], ...]  # per level 0..depth-1

    def channels(self, level: int) -> int:
        return self.base_channels * 2 ** level

    @property
    def axes(self) -> str:
        return "yx" if self.dims == 2 else "zyx"


def _arch(cfg: ModelConfig) -> _Arch:
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"expected a ModelConfig (unet_dist.config), got {type(cfg).__name__}")
    validate_model(cfg, "model config")
    dims, aniso = cfg.dims, cfg.anisotropic_levels
    flat = (1, 3, 3)
    kernels = tuple(flat if level < aniso else (3,) * dims for level in range(cfg.depth + 1))
    pools = tuple((1, 2, 2) if level < aniso else (2,) * dims for level in range(cfg.depth))
    return _Arch(dims, cfg.in_channels, cfg.output_channels(), cfg.depth, cfg.base_channels, cfg.norm,
                 cfg.upsample, cfg.padding, kernels, pools)


# ----------------------------------------------------------------------------------------- network

def _group_count(channels: int) -> int:
    return max(g for g in range(1, min(8, channels) + 1) if channels % g == 0)


def _norm(arch: _Arch, channels: int) -> nn.Module:
    if arch.norm == "batch":
        return (nn.BatchNorm2d if arch.dims == 2 else nn.BatchNorm3d)(channels)
    if arch.norm == "group":
        return nn.GroupNorm(_group_count(channels), channels)
    if arch.norm == "instance":
        return (nn.InstanceNorm2d if arch.dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    return nn.Identity()


def _conv_block(arch: _Arch, cin: int, cout: int, kernel: tuple[int, ...]) -> nn.Sequential:
    conv = nn.Conv2d if arch.dims == 2 else nn.Conv3d
    pad = 0 if arch.padding == "valid" else tuple(k // 2 for k in kernel)
    bias = arch.norm == "none"  # a norm right after the conv makes its bias redundant
    layers = []
    for c in (cin, cout):
        layers += [conv(c, cout, kernel, padding=pad, bias=bias), _norm(arch, cout),
                   nn.ReLU(inplace=True)]  # the norm's (or conv's) output is not needed backward
    return nn.Sequential(*layers)


def _upsample(arch: _Arch, cin: int, cout: int, factor: tuple[int, ...]) -> nn.Module:
    if arch.upsample == "transpose":
        return (nn.ConvTranspose2d if arch.dims == 2 else nn.ConvTranspose3d)(cin, cout, factor, factor)
    mode = "bilinear" if arch.dims == 2 else "trilinear"
    conv = nn.Conv2d if arch.dims == 2 else nn.Conv3d
    return nn.Sequential(nn.Upsample(scale_factor=tuple(float(f) for f in factor), mode=mode,
                                     align_corners=False),
                         conv(cin, cout, 1))


def _center_crop(x: torch.Tensor, shape) -> torch.Tensor:
    starts = [(s - t) // 2 for s, t in zip(x.shape[2:], shape)]
    return x[(slice(None), slice(None), *(slice(a, a + t) for a, t in zip(starts, shape)))]


class UNet(nn.Module):
    """The U-Net of a `ModelConfig` (see module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        arch = _arch(cfg)
        self.arch = arch
        self.valid = arch.padding == "valid"
        pool = nn.MaxPool2d if arch.dims == 2 else nn.MaxPool3d
        cin = arch.in_channels
        self.encoders, self.pools = nn.ModuleList(), nn.ModuleList()
        for level in range(arch.depth):
            self.encoders.append(_conv_block(arch, cin, arch.channels(level), arch.kernels[level]))
            self.pools.append(pool(arch.pools[level]))
            cin = arch.channels(level)
        self.bottom = _conv_block(arch, cin, arch.channels(arch.depth), arch.kernels[arch.depth])
        # ups/decoders are stored in the order they run: deepest level first
        self.ups, self.decoders = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(arch.depth)):
            c = arch.channels(level)
            self.ups.append(_upsample(arch, 2 * c, c, arch.pools[level]))
            self.decoders.append(_conv_block(arch, 2 * c, c, arch.kernels[level]))
        self.head = (nn.Conv2d if arch.dims == 2 else nn.Conv3d)(arch.channels(0), arch.out_channels, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        # He init as in the paper: every 3x3 conv feeds a ReLU, and without a norm the default
        # (uniform, gain 1/sqrt(3)) lets the signal fade through the 23 layers
        for block in [*self.encoders, self.bottom, *self.decoders]:
            for m in block:
                if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for encode, pool in zip(self.encoders, self.pools):
            x = encode(x)
            skips.append(x)
            x = pool(x)
        x = self.bottom(x)
        for up, decode, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = up(x)
            if self.valid:
                skip = _center_crop(skip, x.shape[2:])
            x = decode(torch.cat([skip, x], dim=1))
        return self.head(x)


def build_model(cfg: ModelConfig) -> UNet:
    return UNet(cfg)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------ shape arithmetic

def _walk(arch: _Arch, shape: tuple[int, ...]) -> tuple[tuple[int, ...] | None, int]:
    """Follow a spatial shape through the network: (output shape, conv FLOPs), or (None, 0) where
    some feature map would be empty or a pooling would drop voxels."""
    s, flops = list(shape), 0

    def conv(cin: int, cout: int, kernel) -> bool:
        nonlocal flops
        if arch.padding == "valid":
            s[:] = [n - k + 1 for n, k in zip(s, kernel)]
        flops += 2 * cin * cout * math.prod(kernel) * math.prod(s)
        return min(s) >= 1

    cin = arch.in_channels
    for level in range(arch.depth):
        c = arch.channels(level)
        if not (conv(cin, c, arch.kernels[level]) and conv(c, c, arch.kernels[level])):
            return None, 0
        if any(n % p for n, p in zip(s, arch.pools[level])):
            return None, 0
        s[:] = [n // p for n, p in zip(s, arch.pools[level])]
        cin = c
    c = arch.channels(arch.depth)
    if not (conv(cin, c, arch.kernels[arch.depth]) and conv(c, c, arch.kernels[arch.depth])):
        return None, 0
    for level in reversed(range(arch.depth)):
        c, p = arch.channels(level), arch.pools[level]
        if arch.upsample == "transpose":  # kernel = stride: each input voxel meets the kernel once
            flops += 2 * 2 * c * c * math.prod(p) * math.prod(s)
            s[:] = [n * f for n, f in zip(s, p)]
        else:
            s[:] = [n * f for n, f in zip(s, p)]
            conv(2 * c, c, (1,) * arch.dims)
        if not (conv(2 * c, c, arch.kernels[level]) and conv(c, c, arch.kernels[level])):
            return None, 0
    conv(arch.channels(0), arch.out_channels, (1,) * arch.dims)
    return tuple(s), flops


def _along(arch: _Arch, axis: int) -> _Arch:
    """The network seen along one axis: the axes do not interact in shape arithmetic."""
    return replace(arch, dims=1, kernels=tuple((k[axis],) for k in arch.kernels),
                   pools=tuple((p[axis],) for p in arch.pools))


def _axis_ok(arch: _Arch, axis: int, n: int) -> bool:
    return n >= 1 and _walk(_along(arch, axis), (n,))[0] is not None


def _min_size(arch: _Arch, axis: int) -> int:
    # a few hundred steps at most: the smallest valid size is about twice the halo
    return next(n for n in range(1, 10 ** 9) if _axis_ok(arch, axis, n))


def _nearest(arch: _Arch, axis: int, n: int) -> tuple[int | None, int]:
    below = next((m for m in range(n, 0, -1) if _axis_ok(arch, axis, m)), None)
    above = next(m for m in range(max(n, 1), 10 ** 9) if _axis_ok(arch, axis, m))
    return below, above


def check_patch_shape(cfg: ModelConfig, patch_shape) -> None:
    """Raise UserError (with the nearest valid sizes) if the network cannot take this spatial shape."""
    arch = _arch(cfg)
    shape = tuple(patch_shape)
    if len(shape) != arch.dims or not all(isinstance(n, Integral) and not isinstance(n, bool) for n in shape):
        raise UserError(f"patch shape {shape}: needs {arch.dims} integer sizes "
                        f"({', '.join(arch.axes)}) for model.dims {arch.dims}")
    if _walk(arch, shape)[0] is not None:
        return
    shape = tuple(int(n) for n in shape)
    hints = []
    for axis, n in enumerate(shape):
        if not _axis_ok(arch, axis, n):
            below, above = _nearest(arch, axis, n)
            options = f"{below} or {above}" if below else f"{above} or more"
            hints.append(f"{arch.axes[axis]} {n} -> {options}")
    if arch.padding == "same":
        rule = f"each size must be a multiple of its pooling factor {pooling_factor(cfg)}"
    else:
        rule = "with valid padding every map before a pooling must divide evenly and the output be non-empty"
    raise UserError(f"patch shape {shape} does not fit model.depth {arch.depth} "
                    f"(padding {arch.padding}): {rule}; nearest valid sizes: {'; '.join(hints)}")


def output_shape(cfg: ModelConfig, input_shape) -> tuple[int, ...]:
    """Spatial output shape for a spatial input shape (the same, or smaller with valid padding)."""
    check_patch_shape(cfg, input_shape)
    return _walk(_arch(cfg), tuple(int(n) for n in input_shape))[0]


def valid_input_shape(cfg: ModelConfig, shape) -> tuple[int, ...]:
    """The smallest spatial input shape the network accepts that is >= `shape` on every axis."""
    arch = _arch(cfg)
    return tuple(_nearest(arch, axis, int(n))[1] for axis, n in enumerate(shape))


def pooling_factor(cfg: ModelConfig) -> tuple[int, ...]:
    """Total downsampling per axis. The network is shift-equivariant only by multiples of this, so
    tiles must start on this grid for tiled prediction to equal a whole-volume pass."""
    arch = _arch(cfg)
    return tuple(math.prod(p[a] for p in arch.pools) for a in range(arch.dims))


def _rf_extents(arch: _Arch, axis: int) -> tuple[int, int]:
    """(span, largest reach on either side of the output voxel) of the receptive field along an
    axis, with centred ('same') convs. Found by pulling the dependency interval of each output
    position in one pooling period back through the deepest path, which contains every other."""
    period = math.prod(p[axis] for p in arch.pools)
    span = reach = 0
    for o in range(period * 1000, period * 1001):  # far from any border
        lo = hi = o
        for level in range(arch.depth):  # backwards from the output: decoder convs, then upsampling
            h = 2 * (arch.kernels[level][axis] // 2)
            lo, hi = lo - h, hi + h
            p = arch.pools[level][axis]
            if arch.upsample == "transpose" or p == 1:
                lo, hi = lo // p, hi // p
            else:  # linear interpolation, align_corners=False: source (i + 0.5) / p - 0.5 and its right neighbour
                lo, hi = math.floor((lo + 0.5) / p - 0.5), math.floor((hi + 0.5) / p - 0.5) + 1
        h = 2 * (arch.kernels[arch.depth][axis] // 2)
        lo, hi = lo - h, hi + h
        for level in reversed(range(arch.depth)):  # encoder: pooling, then its convs
            p = arch.pools[level][axis]
            lo, hi = lo * p, hi * p + p - 1
            h = 2 * (arch.kernels[level][axis] // 2)
            lo, hi = lo - h, hi + h
        span, reach = max(span, hi - lo + 1), max(reach, o - lo, hi - o)
    return span, reach


def receptive_field(cfg: ModelConfig) -> tuple[int, ...]:
    """Receptive field size per axis: how many input voxels along each axis can change one output
    voxel. Spatial only: instance/group norms (and batch norm in training) also mix in statistics
    of the whole patch."""
    arch = _arch(cfg)
    return tuple(_rf_extents(arch, a)[0] for a in range(arch.dims))


def halo(cfg: ModelConfig) -> tuple[int, ...]:
    """Context per side and axis a tile needs so that its output equals a whole-volume pass.

    Valid padding: (input - output) / 2, read around each output tile. Same padding: the farthest
    reach of the receptive field from its output voxel (more than half the field: pooling makes the
    field sit unevenly around voxels inside a pooling period). Both assume tiles start on the
    `pooling_factor` grid."""
    arch = _arch(cfg)
    if arch.padding == "same":
        return tuple(_rf_extents(arch, a)[1] for a in range(arch.dims))
    shape = tuple(_min_size(arch, a) for a in range(arch.dims))
    out = _walk(arch, shape)[0]
    return tuple((n - m) // 2 for n, m in zip(shape, out))


def flops_per_forward(cfg: ModelConfig, input_shape) -> int:
    """FLOPs (2 x multiply-adds) of all convolutions for one sample of this spatial shape; norms,
    activations, pooling and interpolation are left out (they are not matmul work)."""
    check_patch_shape(cfg, input_shape)
    return _walk(_arch(cfg), tuple(int(n) for n in input_shape))[1]


def describe(cfg: ModelConfig, patch_shape) -> str:
    """A few lines for `unet-dist model CONFIG`."""
    arch = _arch(cfg)
    out = output_shape(cfg, patch_shape)
    with torch.device("meta"):  # counts parameters without allocating them
        params = parameter_count(UNet(cfg))
    fmt = " x ".join
    aniso = cfg.anisotropic_levels
    return "\n".join([
        f"U-Net {arch.dims}D: depth {arch.depth}, base channels {arch.base_channels}, norm {arch.norm}, "
        f"upsample {arch.upsample}, padding {arch.padding}"
        + (f", anisotropic levels {aniso}" if aniso else ""),
        f"parameters:      {params:,}",
        f"receptive field: {fmt(map(str, receptive_field(cfg)))} ({','.join(arch.axes)})",
        f"halo per side:   {fmt(map(str, halo(cfg)))}",
        f"input -> output: {arch.in_channels} x {fmt(map(str, patch_shape))} -> "
        f"{arch.out_channels} x {fmt(map(str, out))}",
        f"forward:         {flops_per_forward(cfg, patch_shape) / 1e9:.2f} GFLOP per sample (convolutions)",
    ])
