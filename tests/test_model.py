"""The U-Net: shapes, config validation, receptive field, parameter and FLOP counts."""

import math
import numpy as np
import pytest
import torch
from torch import nn

from unet_dist import model as M
from unet_dist.config import ModelConfig
from unet_dist.errors import UserError


def cfg(**kw):
    base = dict(dims=2, in_channels=1, out_channels=1, depth=2, base_channels=4, norm="batch",
                upsample="transpose", padding="same", anisotropic_levels=0)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("upsample", ["transpose", "interp"])
@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
def test_output_shape_matches_forward(dims, padding, upsample, norm):
    c = cfg(dims=dims, padding=padding, upsample=upsample, norm=norm, out_channels=3,
            base_channels=2 if dims == 3 else 4)
    shape = M.valid_input_shape(c, (12,) * dims if padding == "same" else (1,) * dims)
    shape = tuple(n + M.pooling_factor(c)[0] for n in shape)  # one period above the smallest
    M.check_patch_shape(c, shape)
    net = M.build_model(c)
    y = net(torch.randn(2, 1, *shape))
    assert y.shape == (2, 3, *M.output_shape(c, shape))
    if padding == "same":
        assert tuple(y.shape[2:]) == shape
    else:
        assert all(o < i for o, i in zip(y.shape[2:], shape))


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_anisotropic_3d(padding):
    c = cfg(dims=3, depth=3, anisotropic_levels=2, base_channels=2, padding=padding)
    assert M.pooling_factor(c) == (2, 8, 8)
    net = M.build_model(c)
    convs = [m for m in net.encoders[0] if isinstance(m, nn.Conv3d)]
    assert convs[0].kernel_size == (1, 3, 3) and net.pools[1].kernel_size == (1, 2, 2)
    assert net.bottom[0].kernel_size == (3, 3, 3) and net.pools[2].kernel_size == (2, 2, 2)
    shape = M.valid_input_shape(c, (4, 16, 16))
    assert net(torch.randn(1, 1, *shape)).shape[2:] == M.output_shape(c, shape)
    if padding == "valid":
        # z is only convolved below the anisotropic levels, so it shrinks far less than y, x
        assert shape[0] - M.output_shape(c, shape)[0] < shape[1] - M.output_shape(c, shape)[1]


@pytest.mark.parametrize("key,value,needle", [
    ("norm", "bn", "model.norm: expected 'batch' | 'group' | 'instance' | 'none', got 'bn'"),
    ("upsample", "nearest", "model.upsample"),
    ("padding", "full", "model.padding"),
    ("dims", 4, "model.dims"),
    ("depth", -1, "model.depth"),
    ("depth", True, "model.depth"),
    ("base_channels", 0, "model.base_channels"),
    ("in_channels", "1", "model.in_channels"),
    ("out_channels", 0, "model.out_channels"),
    ("anisotropic_levels", 1, "model.anisotropic_levels"),  # with dims 2
])
def test_bad_config_names_the_key(key, value, needle):
    with pytest.raises(UserError, match="^model config: " + needle.split(":")[0]) as err:
        M.UNet(cfg(**{key: value}))
    assert needle in str(err.value)


def test_anisotropic_levels_beyond_depth():
    with pytest.raises(UserError, match="model.anisotropic_levels.*exceeds model.depth"):
        M.check_patch_shape(cfg(dims=3, depth=2, anisotropic_levels=3), (8, 8, 8))


def test_bad_patch_shapes():
    with pytest.raises(UserError, match=r"y 100 -> 96 or 112; x 250 -> 240 or 256"):
        M.check_patch_shape(cfg(depth=4), (100, 250))
    M.check_patch_shape(cfg(depth=4), (96, 256))
    assert M.output_shape(cfg(depth=4), (np.int64(96), 256)) == (96, 256)
    with pytest.raises(UserError, match="needs 3 integer sizes"):
        M.check_patch_shape(cfg(dims=3), (16, 16))
    paper = cfg(depth=4, padding="valid")
    with pytest.raises(UserError, match=r"y 570 -> 556 or 572"):
        M.output_shape(paper, (570, 572))
    with pytest.raises(UserError, match=r"x 100 -> 188 or more"):
        M.flops_per_forward(paper, (572, 100))


def test_valid_padding_matches_the_paper():
    paper = cfg(depth=4, padding="valid", norm="none", base_channels=2, out_channels=2)
    assert M.output_shape(paper, (572, 572)) == (388, 388)
    assert M.halo(paper) == (92, 92)
    with torch.no_grad():
        assert M.build_model(paper)(torch.zeros(1, 1, 572, 572)).shape == (1, 2, 388, 388)
    for n in (188, 572, 1020):  # the halo does not depend on the tile size
        assert (n - M.output_shape(paper, (n, n))[0]) // 2 == 92
    assert M.valid_input_shape(paper, (500, 1)) == (508, 188)


def _dependence(c, shape, axis):
    """Which input positions along `axis` (through the centre line) change which outputs: a unit
    impulse on a zero input through a net of all-ones weights, so ReLU, max-pool and interpolation
    pass every contribution and nothing outside the receptive field is touched."""
    net = M.build_model(c).double().eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.fill_(0.0 if name.endswith("bias") else 1.0)
    n = shape[axis]
    centre = [s // 2 for s in shape]
    x = torch.zeros(n, 1, *shape, dtype=torch.float64)
    for i in range(n):
        idx = list(centre)
        idx[axis] = i
        x[(i, 0, *idx)] = 1.0
    with torch.no_grad():
        y = net(x)[:, 0]
    out_centre = [s // 2 for s in y.shape[1:]]
    line = [slice(None)] + [slice(None) if a == axis else out_centre[a] for a in range(len(shape))]
    return y[tuple(line)] != 0  # [input position, output position]


@pytest.mark.parametrize("dims,depth,upsample,aniso", [
    (2, 2, "transpose", 0), (2, 3, "transpose", 0), (2, 3, "interp", 0), (3, 2, "transpose", 1),
    (3, 2, "interp", 1)])
def test_receptive_field_and_halo_match_measurement(dims, depth, upsample, aniso):
    c = cfg(dims=dims, depth=depth, upsample=upsample, anisotropic_levels=aniso, norm="none",
            base_channels=2)
    rf, reach, period = M.receptive_field(c), M.halo(c), M.pooling_factor(c)
    for axis in range(dims):
        shape = list(period)
        shape[axis] = period[axis] * math.ceil(2.5 * rf[axis] / period[axis])
        dep = _dependence(c, tuple(shape), axis)
        spans, reaches = [], []
        mid = shape[axis] // 2
        for o in range(mid, mid + period[axis]):  # one pooling period, far from the borders
            inputs = torch.nonzero(dep[:, o])[:, 0]
            lo, hi = int(inputs.min()), int(inputs.max())
            assert len(inputs) == hi - lo + 1
            spans.append(hi - lo + 1)
            reaches += [o - lo, hi - o]
        assert max(spans) == rf[axis], (axis, spans)
        assert max(reaches) == reach[axis], (axis, reaches)


def test_receptive_field_is_the_same_with_valid_padding():
    c = cfg(padding="valid", norm="none", base_channels=2)
    shape = M.valid_input_shape(c, (160, 8))
    dep = _dependence(c, shape, 0)
    spans = [int(dep[:, o].sum()) for o in range(dep.shape[1])]
    assert max(spans) == M.receptive_field(c)[0] == M.receptive_field(cfg(norm="none"))[0]


def test_classic_parameter_count():
    def conv(cin, cout, k):
        return k * k * cin * cout + cout

    widths = [64, 128, 256, 512, 1024]
    expected, cin = 0, 1
    for w in widths:  # contracting path and bottom
        expected += conv(cin, w, 3) + conv(w, w, 3)
        cin = w
    for w in reversed(widths[:-1]):  # expanding path: 2x2 up-conv, then two 3x3 convs
        expected += conv(2 * w, w, 2) + conv(2 * w, w, 3) + conv(w, w, 3)
    expected += conv(64, 2, 1)
    c = cfg(depth=4, base_channels=64, norm="none", upsample="transpose", out_channels=2)
    with torch.device("meta"):
        count = M.parameter_count(M.build_model(c))
    assert count == expected
    assert round(count / 1e6, 1) == 31.0


def test_group_norm_groups():
    net = M.build_model(cfg(norm="group", base_channels=12))
    groups = {m.num_channels: m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {12: 6, 24: 8, 48: 8}


@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
def test_gradient_reaches_every_parameter(norm):
    net = M.build_model(cfg(norm=norm, upsample="interp"))
    loss = net(torch.randn(2, 1, 16, 16)).square().mean()
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("c,shape", [
    (cfg(), (32, 48)),
    (cfg(padding="valid", upsample="interp"), (44, 60)),
    (cfg(dims=3, depth=2, anisotropic_levels=1, base_channels=2), (4, 16, 24)),
    (cfg(dims=3, padding="valid", upsample="interp", base_channels=2), (44, 44, 48)),
])
def test_flops_match_hook_count(c, shape):
    net = M.build_model(c)
    counted = []

    def hook(module, inputs, output):
        w = module.weight.numel()
        if isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
            counted.append(2 * w * math.prod(inputs[0].shape[2:]))
        else:
            counted.append(2 * w * math.prod(output.shape[2:]))

    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        net(torch.zeros(1, 1, *shape))
    assert M.flops_per_forward(c, shape) == sum(counted)


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_gives_the_same_result(dims):
    c = cfg(dims=dims, base_channels=4, upsample="interp")
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    net = M.build_model(c).eval()
    x = torch.randn(2, 1, *(16,) * dims)
    with torch.no_grad():
        ref = net(x)
        out = net.to(memory_format=fmt)(x.to(memory_format=fmt))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_describe():
    text = M.describe(cfg(depth=4, base_channels=64, norm="none", out_channels=2, padding="valid"),
                      (572, 572))
    assert "31,0" in text and "1 x 572 x 572 -> 2 x 388 x 388" in text
    assert "receptive field" in text and "GFLOP" in text


@pytest.mark.slow
def test_compiles_without_graph_breaks():
    c = cfg(padding="valid", norm="group")
    net = M.build_model(c).eval()
    x = torch.randn(1, 1, *M.valid_input_shape(c, (40, 40)))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(net, fullgraph=True)(x), net(x), rtol=1e-4, atol=1e-5)
