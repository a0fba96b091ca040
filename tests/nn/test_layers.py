"""SST blocks: LayerNorm2d, ConvFFN, shift rule, upsamplers and the up_conv resize between scales."""
import pytest
import torch
import torch.nn.functional as F

from rfsr_cuda.nn import ConvFFN, LayerNorm2d, SSTBlock, SSTLayer, Upsampler, resize_up_conv, up_conv_scale
from rfsr_cuda.nn.layers import shuffle_add


def test_layernorm2d_normalises_channels():
    ln = LayerNorm2d(5)
    with torch.no_grad():
        ln.weight.copy_(torch.arange(1.0, 6.0))
        ln.bias.fill_(0.5)
    x = torch.randn(2, 5, 3, 4)
    mean = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-6) * ln.weight.view(1, 5, 1, 1) + 0.5
    torch.testing.assert_close(ln(x), expected, rtol=1e-5, atol=1e-5)


def test_convffn():
    ffn = ConvFFN(8, 1.25)
    assert ffn.proj.out_channels == 10 and ffn.dwc.groups == 10 and ffn.agg.out_channels == 8
    x = torch.randn(1, 8, 5, 6)
    h = F.gelu(ffn.proj(x))
    torch.testing.assert_close(ffn(x), ffn.agg(h + F.gelu(ffn.dwc(h))))


@pytest.mark.parametrize("windows, shifts", [((8, 8, 8, 8), [False, True, False, True]),
                                             ((8, 16, 8, 16), [False] * 4)])
def test_block_shifts_only_with_uniform_windows(windows, shifts):
    block = SSTBlock(12, windows, [3] * 4, [4] * 4, rib_hidden_dim=8, rib_n_freqs=2)
    assert [layer.attn.shift for layer in list(block)[:4]] == shifts
    assert isinstance(block[4], torch.nn.Conv2d) and len(block) == 5
    with pytest.raises(ValueError, match="one entry per layer"):
        SSTBlock(12, (8, 16), [3], [4, 4])


@pytest.mark.parametrize("kind", ["pixelshuffle_direct", "pixelshuffle"])
@pytest.mark.parametrize("r", [2, 3, 4])
def test_upsampler_skip_is_nearest_neighbour(kind, r):
    up = Upsampler(16, r, kind, intermediate_dim=8)
    last = up.up_conv if kind == "pixelshuffle_direct" else up.final_conv
    with torch.no_grad():  # silence the learned branch: the output is the skip alone
        last.weight.zero_()
        last.bias.zero_()
    lr = torch.rand(2, 3, 5, 7)
    out = up(torch.randn(2, 16, 5, 7), lr)
    assert out.shape == (2, 3, 5 * r, 7 * r)
    torch.testing.assert_close(out, lr.repeat_interleave(r, 2).repeat_interleave(r, 3))


@pytest.mark.parametrize("r", [1, 2, 3, 4])
def test_nn_conv_upsampler(r):
    up = Upsampler(16, r, "nn+conv", intermediate_dim=8)
    assert up(torch.randn(1, 16, 4, 5), torch.rand(1, 3, 4, 5)).shape == (1, 3, 4 * r, 5 * r)


def test_upsampler_bad_arguments():
    with pytest.raises(ValueError, match="upsampler_type"):
        Upsampler(16, 2, "deconv")
    with pytest.raises(ValueError, match="power of 2 or 3"):
        Upsampler(16, 5, "nn+conv")
    with pytest.raises(ValueError, match="upscaling_factor"):
        Upsampler(16, 0)


def test_up_conv_scale():
    assert up_conv_scale("pixelshuffle_direct", torch.empty(48, 24, 3, 3)) == 4
    assert up_conv_scale("pixelshuffle", torch.empty(64 * 9, 64, 3, 3)) == 3


def test_resize_up_conv_layout_and_bilinear_weights():
    # channel c·r² + i·r + j holds sub-pixel (i, j) of output channel c; tag each with 100c + 10i + j
    c, r_in, r_out = 2, 2, 4
    tags = torch.tensor([100 * ch + 10 * i + j for ch in range(c) for i in range(r_in) for j in range(r_in)],
                        dtype=torch.float32)
    weight = tags.view(-1, 1, 1, 1).repeat(1, 3, 3, 3)
    weight[:, 1] *= -1  # each input channel / tap keeps its own grid
    w, b = resize_up_conv(weight, tags.clone(), r_in, r_out)
    assert w.shape == (c * r_out ** 2, 3, 3, 3) and b.shape == (c * r_out ** 2,)
    # bilinear, align_corners=False, 2 -> 4 along one axis: rows [v0, .75 v0 + .25 v1, .25 v0 + .75 v1, v1]
    mix = torch.tensor([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    grid = tags.view(c, r_in, r_in)
    expected = torch.einsum("ia,cab,jb->cij", mix, grid, mix).reshape(-1)
    torch.testing.assert_close(b, expected)
    torch.testing.assert_close(w[:, 0, 2, 1], expected)
    torch.testing.assert_close(w[:, 1, 0, 0], -expected)
    same_w, same_b = resize_up_conv(weight, tags, 2, 2)
    torch.testing.assert_close(same_w, weight)
    torch.testing.assert_close(same_b, tags)


@pytest.mark.parametrize("dim, ratio, padded", [(180, 1.25, 232), (12, 1.5, 24), (48, 1.5, 72)])
def test_convffn_pad_hidden_is_exact(dim, ratio, padded):
    torch.manual_seed(0)
    ffn = ConvFFN(dim, ratio)
    with torch.no_grad():
        for p in ffn.parameters():
            p.normal_(std=0.2)
    x = torch.randn(2, dim, 5, 7, dtype=torch.float64)
    ffn = ffn.double()
    expected = ffn(x)
    ffn.pad_hidden(8)
    assert ffn.proj.weight.shape[0] == ffn.dwc.weight.shape[0] == ffn.agg.weight.shape[1] == padded
    assert ffn.dwc.groups == padded and ffn.proj.bias.shape == (padded,)
    for layout in (torch.contiguous_format, torch.channels_last):  # conv and GEMM routes
        torch.testing.assert_close(ffn(x.contiguous(memory_format=layout)), expected, rtol=0, atol=1e-12)
    ffn.pad_hidden(8)  # already aligned: nothing changes
    assert ffn.proj.weight.shape[0] == padded


@pytest.mark.parametrize("width", [5, 8])
def test_layernorm2d_op_route_matches_aten(width):
    ln = LayerNorm2d(5).double()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.randn(2, 7, 3, 4, dtype=torch.float64)  # a residual with extra (ignored) channels
    expected_sum = x + y[:, :5]
    expected = ln(expected_sum)
    fused = LayerNorm2d(5).double()
    fused.load_state_dict(ln.state_dict())
    assert fused.use_op(width) is fused and fused.width == width
    with torch.no_grad():
        got = fused(expected_sum)
        s, n = fused.add_norm(x, y)
    for out in (got, n):
        assert out.shape == (2, width, 3, 4)
        torch.testing.assert_close(out[:, :5], expected, rtol=0, atol=1e-12)
        assert (out[:, 5:] == 0).all()
    torch.testing.assert_close(s, expected_sum, rtol=0, atol=0)
    # with gradients the ATen route runs (the op has no autograd formula), padded the same way
    got = fused(expected_sum.requires_grad_())
    assert got.requires_grad and got.shape == (2, width, 3, 4)
    torch.testing.assert_close(got[:, :5], expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="width must be >= the 5 channels"):
        LayerNorm2d(5).use_op(4)


def test_layernorm2d_pad_input_takes_padded_rows():
    # a norm of 5 channels fed rows of 8 whose last 3 are zero: the statistics are the first 5's, the output's extra
    # channels stay zero, on the op route and on the ATen route (gradients), and unpadded rows still work
    ln = LayerNorm2d(5).double()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    y = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    expected = ln(x + y)
    ln.use_op()
    ln.pad_input(8)
    assert ln.weight.shape == (8,) and ln.width == 8 and ln.dim == 5
    xp, yp = (F.pad(t, (0, 0, 0, 0, 0, 3)).contiguous(memory_format=torch.channels_last) for t in (x, y))
    with torch.no_grad():
        s, n = ln.add_norm(xp, yp)
        alone = ln(x + y)
    torch.testing.assert_close(s, xp + yp, rtol=0, atol=0)
    for out in (n, alone, ln((xp + yp).requires_grad_())):
        assert out.shape == (2, 8, 3, 4) and (out[:, 5:] == 0).all()
        torch.testing.assert_close(out[:, :5], expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="x must have 5 channels"):
        with torch.no_grad():
            ln(torch.zeros(1, 6, 2, 2, dtype=torch.float64))


@pytest.mark.parametrize("r", [1, 2, 3, 4])
@pytest.mark.parametrize("hw", [(3, 3), (5, 9), (13, 6), (2, 7)])
def test_upsampler_fold_is_exact(r, hw):
    # the folded 'pixelshuffle' tail (one LR 5×5 conv, the border ring recomputed) equals the three ops in float64;
    # sides below 3 pixels, gradients and hooks on the convs take the unfolded route
    torch.manual_seed(r)
    up = Upsampler(12, r, "pixelshuffle", intermediate_dim=8).double()
    with torch.no_grad():
        for p in up.parameters():
            p.copy_(0.3 * torch.randn_like(p))  # biases too: the ring and the folded bias both carry them
    x = torch.randn(2, 12, *hw, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    skip = torch.randn(2, 3, *hw, dtype=torch.float64)
    with torch.no_grad():
        expected = up(x, skip)
        up.fold()
        assert up._fold_w.shape == (3 * r * r, 8, 5, 5)
        assert up._folded(x) == (min(hw) >= 3)
        got = up(x, skip)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    calls = []
    handle = up.final_conv.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    with torch.no_grad():
        torch.testing.assert_close(up(x, skip), expected, rtol=0, atol=1e-10)
    handle.remove()
    assert calls and calls[0][-2:] == (r * hw[0], r * hw[1])  # the whole HR map: unfolded
    out = up(x.requires_grad_(), skip)
    out.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-10)


def test_upsampler_fold_leaves_other_types_alone():
    for kind in ("pixelshuffle_direct", "nn+conv"):
        up = Upsampler(8, 2, kind)
        up.fold()
        assert getattr(up, "_fold_w", None) is None


def test_shuffle_add_matches_pixel_shuffle():
    # one pass for pixel_shuffle(y + repeat_interleave(skip, r², 1), r), the dtypes promoted as the ops do; with
    # gradients the ops themselves
    y = torch.randn(2, 3 * 9, 4, 5).contiguous(memory_format=torch.channels_last).bfloat16()
    skip = torch.randn(2, 3, 4, 5)
    expected = F.pixel_shuffle(y + torch.repeat_interleave(skip, 9, dim=1), 3)
    got = shuffle_add(y, skip, 3)
    assert got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    yg = y.float().requires_grad_()
    shuffle_add(yg, skip, 3).sum().backward()
    torch.testing.assert_close(yg.grad, torch.ones_like(yg))


@pytest.mark.parametrize("gate", ["DWC", "Linear", None])
@pytest.mark.parametrize("hw, shift", [((16, 24), False), ((16, 24), True), ((13, 21), False)])
@pytest.mark.parametrize("backend", ["fused", "concat", "reference"])
def test_sstlayer_pad_channels_is_exact(gate, hw, shift, backend):
    # dim 20: rows of 40 bytes; padded to 24 channels (and q, k, v to 64 columns)
    layer = SSTLayer(20, 8, 2, 4, shift=shift, gate_type=gate, rib_hidden_dim=8, rib_n_freqs=2, attn_backend=backend)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    layer = layer.double().eval()
    x = torch.randn(2, 20, *hw, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = layer(x)
        layer.pad_channels(8)
        got = layer(x)
    assert layer.attn.width == 24 and layer.norm_ffn.width == 24 and layer.attn.to_qkv.weight.shape[:2] == (64, 24)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    aligned = SSTLayer(24, 8, 2, 4, rib_hidden_dim=8, rib_n_freqs=2)
    aligned.pad_channels(8)  # already a multiple of 8: unchanged
    assert aligned.attn.width == 24 and not aligned.norm_attn.fused


@pytest.mark.parametrize("prepared", [False, True])
def test_hooks_on_norms_and_layers_still_run(prepared):
    # the deferred residual adds and the fused ops must not skip a hook on a norm, a depthwise conv or a layer
    block = SSTBlock(16, (8, 8), [2, 2], [4, 4], rib_hidden_dim=8, rib_n_freqs=2).eval()
    x = torch.randn(1, 16, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = block(x)
        if prepared:
            for m in block.modules():
                if isinstance(m, LayerNorm2d):
                    m.use_op()
                elif isinstance(m, ConvFFN):
                    m.use_op()
        seen = []
        layer = block[1]
        for name, m in (("norm_ffn", layer.norm_ffn), ("dwc", layer.ffn.dwc), ("layer", block[0])):
            m.register_forward_hook(lambda mod, args, out, name=name: seen.append(name))
        got = block(x)
    assert sorted(seen) == ["dwc", "layer", "norm_ffn"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
