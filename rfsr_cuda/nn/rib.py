"""RIB, the rank-factorised implicit positional bias: window coordinates -> Fourier features -> MLP -> factors.

For a window of N tokens the module produces ``bias_q, bias_k`` of shape ``(H, N, R)`` with
``bias_q @ bias_kᵀ = Q_p K_pᵀ / √R``, the bias that SST adds to the attention logits. The factors depend on the
window geometry and the four parameters only, so at inference they are computed once and cached.

Cache rules (see ``RIB.factors``); checking them never reads a tensor's values, so a cached forward has no device
synchronisation (CUDA graphs can capture it):
  * used only in eval mode with no gradient wanted for the RIB parameters, and never under ``torch.compile``
    (compiled graphs compute the factors themselves); otherwise the MLP runs on every call so gradients reach
    ``to_hidden``, ``hidden_b``, ``to_q`` and ``to_k``;
  * an entry per (window size, device, dtype); all entries are dropped when the module goes back to training and by
    ``.to()``/``.cuda()``/``.half()`` (``nn.Module._apply``);
  * entries are valid for the parameter state they were computed from: each parameter's address, version counter
    and shape, and the process-wide count of optimizer steps. In-place updates bump the version counter
    (optimizer steps, ``load_state_dict``, ``copy_``/``lerp_``/``mul_`` under ``no_grad`` or ``inference_mode``,
    EMA updates written that way); a new tensor (``load_state_dict(assign=True)``, ``p.data = t``, a replaced
    Parameter) changes the address, and the old tensors are kept alive with the entries so that an address cannot
    be reused unnoticed. Fused optimizers (``AdamW(fused=True)``) bump no version counter, hence the step count
    (a global optimizer step post-hook);
  * not seen: in-place edits through ``param.data`` (an alias with its own version counter). After such an edit
    call ``clear_rib_caches(model)`` (or edit under ``torch.no_grad()`` instead, which is seen);
  * parameters that are inference tensors (a model built inside ``torch.inference_mode``) have no version counter:
    their factors are recomputed on every call rather than cached.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..ops import depthwise_taps, op_param

# Optimizer steps taken in this process. Part of every cache stamp: fused optimizers write the parameters without
# bumping their version counters, and a step hook is the one place every optimizer passes through.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _pair(window_size, name: str = "window_size") -> tuple[int, int]:
    ws = (window_size, window_size) if isinstance(window_size, int) and not isinstance(window_size, bool) \
        else tuple(window_size) if isinstance(window_size, Sequence) else None
    if ws is None or len(ws) != 2 or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in ws):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {window_size!r}")
    return ws


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _has_autocast(device_type: str) -> bool:
    # (the common types first: torch.compile of torch 2.11 cannot trace is_autocast_available)
    return device_type in ("cuda", "cpu") or torch.amp.is_autocast_available(device_type)


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False where autocast does not exist (e.g. 'meta')."""
    return _has_autocast(device_type) and torch.is_autocast_enabled(device_type)


def no_autocast(device_type: str):
    """A context that turns autocast off on ``device_type`` (a no-op where autocast does not exist)."""
    if _has_autocast(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def conv1x1(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` for a 1×1 conv, as a GEMM over the pixels when ``x`` is channels-last: the ``(B, H, W, C)`` view
    needs no copy and the bias is added inside the GEMM (cuDNN adds it in a separate pass). Other layouts go to
    the conv itself. Forward hooks of ``conv`` do not run on the GEMM route."""
    xl = x.permute(0, 2, 3, 1)
    if not xl.is_contiguous():
        return conv(x)
    return F.linear(xl, conv.weight.flatten(1), conv.bias).permute(0, 3, 1, 2)


def padded_width(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def zero_padded(t: torch.Tensor, sizes: Sequence[int], value: float = 0.0) -> nn.Parameter:
    """``t`` grown to ``sizes`` (each dim >= t's; new entries ``value``), as a parameter that requires grad as
    ``t`` does: the zero-padded weights of the inference layouts (``ConvFFN.pad_hidden``, ``pad_channels``)."""
    out = t.new_full(tuple(sizes), value)
    out[tuple(slice(0, n) for n in t.shape)] = t.detach()
    return nn.Parameter(out, requires_grad=t.requires_grad)


def grow_conv(conv: nn.Conv2d, out_channels: int | None = None, in_channels: int | None = None) -> None:
    """Zero-pad a dense conv to at least ``out_channels`` outputs and ``in_channels`` inputs: the extra inputs get
    zero weights (ignored), the extra outputs zero weights and bias (zero). Same function; for inference only."""
    if conv.groups != 1:
        raise ValueError(f"grow_conv takes dense convs (groups 1), got groups={conv.groups}")
    out_c = max(conv.out_channels, out_channels or 0)
    in_c = max(conv.in_channels, in_channels or 0)
    with torch.no_grad():
        conv.weight = zero_padded(conv.weight, (out_c, in_c, *conv.weight.shape[2:]))
        if conv.bias is not None:
            conv.bias = zero_padded(conv.bias, (out_c,))
    conv.out_channels, conv.in_channels = out_c, in_c


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs forward (pre-)hooks, its own or global ones."""
    from torch.nn.modules import module as _m
    return bool(module._forward_pre_hooks or module._forward_hooks or _m._global_forward_pre_hooks
                or _m._global_forward_hooks)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record an op on ``tensors`` (None entries ignored): then an inference-only op (no
    autograd formula) may not run."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def op_may_replace(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether an inference-only fused op (no autograd formula) may stand in for calling ``module`` on ``x``: no
    gradient is needed and no forward hook would be skipped (the upscaler's valid-region hooks change conv inputs)."""
    return not needs_grad(x) and not has_forward_hooks(module)


def use_depthwise_op(conv: nn.Conv2d) -> None:
    """Let ``depthwise3x3`` run ``conv`` (a depthwise 3×3 conv) through ``rfsr::depthwise_conv3x3``, with taps and
    bias taken from its weights now (non-persistent buffers on the conv): for inference, after any change to them."""
    conv.register_buffer("_rfsr_taps", depthwise_taps(conv.weight), persistent=False)
    conv.register_buffer("_rfsr_bias", None if conv.bias is None else op_param(conv.bias), persistent=False)


def depthwise3x3(conv: nn.Conv2d, x: torch.Tensor, *, gelu: bool = False, residual: bool = False) -> torch.Tensor:
    """``conv(x)``, then the exact GELU when ``gelu``, plus ``x`` when ``residual``: one ``rfsr::depthwise_conv3x3``
    call after ``use_depthwise_op(conv)`` where the op may stand in for the modules (``op_may_replace``)."""
    if getattr(conv, "_rfsr_taps", None) is not None and op_may_replace(conv, x):
        return torch.ops.rfsr.depthwise_conv3x3(x, conv._rfsr_taps, conv._rfsr_bias, gelu, residual)
    y = conv(x)
    if gelu:
        y = F.gelu(y)
    return x + y if residual else y


def move_words(t: torch.Tensor, fn):
    """``fn(t)`` for pure data movement (a gather, a permuted copy) that keeps the last dim whole, run on the
    widest integer view of that dim: 4 bf16 values per 8-byte word, so a quarter of the elements to index.
    Tensors that need gradients (dtype views do not carry them) and compiled graphs take ``fn(t)`` directly."""
    if t.requires_grad or torch.compiler.is_compiling() or t.dim() == 0:
        return fn(t)
    size = t.element_size()
    for word, wsize in ((torch.int64, 8), (torch.int32, 4)):
        if wsize > size and t.stride(-1) == 1 and (t.shape[-1] * size) % wsize == 0 \
                and (t.storage_offset() * size) % wsize == 0 \
                and all((st * size) % wsize == 0 for st in t.stride()[:-1]):
            return fn(t.view(word)).view(t.dtype)
    return fn(t)


def rib_features(window_size: int | tuple[int, int], n_freqs: int = 10,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Fourier features of the token centres of one window: ``(Wh·Ww, 2 + 4·n_freqs)`` float32.

    Token n = row·Ww + col (the ``(wh ww)`` order of the window partition). Columns: x, y in (-1, 1), then per
    frequency 2^i (no π): sin x, sin y, cos x, cos y. Computed in float32 on ``device`` (default the CPU, like the
    official buffer the released weights were trained on; other devices' sin/cos differ in the last bits).
    """
    wh, ww = _pair(window_size)
    check_positive_int(n_freqs, "n_freqs", 0)
    rows, cols = torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij")
    x = 2.0 * (cols.reshape(-1).float() + 0.5) / ww - 1.0
    y = 2.0 * (rows.reshape(-1).float() + 0.5) / wh - 1.0
    base = torch.stack([x, y], dim=-1)
    feats = [base]
    for i in range(n_freqs):
        feats += [torch.sin(base * 2 ** i), torch.cos(base * 2 ** i)]
    return torch.cat(feats, dim=-1)


class RIB(nn.Module):
    """The RIB field of one attention layer.

    Parameters, named and initialised as in the official ``WindowAttention2D`` so its checkpoints load:
    ``to_hidden (2+4F, Hd)``, ``hidden_b (1, Hd)``, ``to_q (H, Hd, R)``, ``to_k (H, Hd, R)``.

    Args:
        num_heads: H. rank: R. window_size: default window (int or (Wh, Ww)) for ``factors()``.
        hidden_dim: Hd, the MLP width. n_freqs: F, the number of Fourier octaves.
    """

    def __init__(self, num_heads: int, rank: int, window_size: int | tuple[int, int], hidden_dim: int = 32,
                 n_freqs: int = 10):
        super().__init__()
        self.num_heads = check_positive_int(num_heads, "num_heads")
        self.rank = check_positive_int(rank, "rank")
        self.window_size = _pair(window_size)
        self.rib_hidden_dim = check_positive_int(hidden_dim, "rib_hidden_dim")
        self.rib_n_freqs = check_positive_int(n_freqs, "rib_n_freqs", 0)
        self.to_hidden = nn.Parameter(torch.empty(2 + 4 * n_freqs, hidden_dim))
        self.hidden_b = nn.Parameter(torch.zeros(1, hidden_dim))
        self.to_q = nn.Parameter(torch.empty(num_heads, hidden_dim, rank))
        self.to_k = nn.Parameter(torch.empty(num_heads, hidden_dim, rank))
        self.reset_rib_parameters()
        self._features: dict = {}  # (window, device) -> features; parameter-free
        self._factors: dict = {}  # (window, device, dtype) -> (bias_q, bias_k)
        self._stamp: tuple | None = None  # parameter state _factors was computed from (_param_stamp)
        self._pinned: tuple = ()  # those parameters' tensors, alive so that their addresses are not reused

    def reset_rib_parameters(self) -> None:
        nn.init.normal_(self.to_hidden, std=0.05)
        nn.init.zeros_(self.hidden_b)
        nn.init.normal_(self.to_q, std=0.05)
        nn.init.normal_(self.to_k, std=0.05)

    def rib_parameters(self) -> tuple[nn.Parameter, ...]:
        return self.to_hidden, self.hidden_b, self.to_q, self.to_k

    def clear_rib_cache(self) -> None:
        """Drop the cached factors (needed only after in-place edits through ``param.data``; module docstring)."""
        self._factors = {}
        self._stamp = None
        self._pinned = ()

    def train(self, mode: bool = True):
        if mode:  # free the cached factors (up to a few MB per layer) for the whole training phase
            self.clear_rib_cache()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.half() replace the parameters: the stamps would catch it, but freeing now releases the
        # old device's factors and features at once
        self.clear_rib_cache()
        self._features = {}
        return super()._apply(fn, *args, **kwargs)

    def _cache_usable(self) -> bool:
        if self.training or torch.compiler.is_compiling():
            return False
        return not needs_grad(*self.rib_parameters())

    def _param_stamp(self, params) -> tuple | None:
        """What identifies the parameters' current values without reading them (None: cannot be told)."""
        if any(p.is_inference() for p in params):
            return None  # inference tensors keep no version counter
        return (_optimizer_steps, *((p.data_ptr(), p._version, p.shape) for p in params))

    def _window_features(self, window: tuple[int, int], device: torch.device) -> torch.Tensor:
        if torch.compiler.is_compiling():  # inside the graph: no cache lookups to guard on, no host-device copy
            return rib_features(window, self.rib_n_freqs, device=device)
        key = (window, device)
        feats = self._features.get(key)
        if feats is None:
            # a normal tensor even when first built under inference_mode: training may reuse it later
            with torch.inference_mode(False):
                feats = self._features[key] = rib_features(window, self.rib_n_freqs).to(device)
        return feats

    def _compute_factors(self, window: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # The MLP runs in float32 (float64 for a float64 module), whatever the activation dtype or autocast.
        dtype = torch.promote_types(self.to_hidden.dtype, torch.float32)
        feats = self._window_features(window, device).to(dtype)
        with no_autocast(device.type):
            hidden = torch.relu(feats @ self.to_hidden.to(dtype) + self.hidden_b.to(dtype))  # (N, Hd)
            bias_q = (hidden @ self.to_q.to(dtype)) * self.rank ** -0.5  # (H, N, R), RIB's 1/√R folded in
            bias_k = hidden @ self.to_k.to(dtype)
        return bias_q, bias_k

    def factors(self, window_size: int | tuple[int, int] | None = None, *, device: torch.device | None = None,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(bias_q, bias_k)``, each ``(H, N, R)`` contiguous, ``bias_q`` already multiplied by ``R**-0.5``.

        ``window_size`` defaults to the layer's own, ``device`` to the parameters', ``dtype`` to float32 (float64
        for a float64 module). Returns cached tensors when the cache rules (module docstring) allow it.
        """
        window = self.window_size if window_size is None else _pair(window_size)
        device = self.to_hidden.device if device is None else torch.device(device)
        if dtype is None:
            dtype = torch.promote_types(self.to_hidden.dtype, torch.float32)
        stamp = None
        if self._cache_usable():
            params = self.rib_parameters()
            stamp = self._param_stamp(params)
        if stamp is None:
            bias_q, bias_k = self._compute_factors(window, device)
            return bias_q.to(dtype).contiguous(), bias_k.to(dtype).contiguous()
        if stamp != self._stamp:
            self._factors = {}
            self._stamp = stamp
            self._pinned = tuple(p.detach() for p in params)
        key = (window, device, dtype)
        cached = self._factors.get(key)
        if cached is None:
            bias_q, bias_k = self._compute_factors(window, device)
            cached = self._factors[key] = (bias_q.to(dtype).contiguous(), bias_k.to(dtype).contiguous())
        return cached

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, rank={self.rank}, window_size={self.window_size}, "
                f"rib_hidden_dim={self.rib_hidden_dim}, rib_n_freqs={self.rib_n_freqs}")


def clear_rib_caches(module: nn.Module) -> nn.Module:
    """Drop the cached factors of every RIB inside ``module`` (after edits through ``param.data``); returns it."""
    for m in module.modules():
        if isinstance(m, RIB):
            m.clear_rib_cache()
    return module
