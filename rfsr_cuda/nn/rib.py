"""RIB, the rank-factorised implicit positional bias: window coordinates -> Fourier features -> MLP -> factors.

For a window of N tokens the module produces ``bias_q, bias_k`` of shape ``(H, N, R)`` with
``bias_q @ bias_kᵀ = Q_p K_pᵀ / √R``, the bias that SST adds to the attention logits. The factors depend on the
window geometry and the four parameters only, so at inference they are computed once and cached.

Cache rules (see ``RIB.factors``):
  * used only in eval mode with no gradient wanted for the RIB parameters, and never under ``torch.compile``;
    otherwise the MLP runs on every call so gradients reach ``to_hidden``, ``hidden_b``, ``to_q`` and ``to_k``;
  * an entry per (window size, device, dtype); all entries are dropped when the module goes back to training;
  * entries are valid only for the parameter values they were computed from: a flat copy of the parameters is
    kept and compared (``torch.equal``) before reuse. Version counters would miss edits made through
    ``param.data`` (its alias has a fresh counter; EMA updates are written that way), a value check does not.
    On CUDA each comparison is a device sync, so models wrap their forward in ``rib_cache_verified``, which
    checks every RIB of the model with one comparison.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn as nn


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


def no_autocast(device_type: str):
    """A context that turns autocast off on ``device_type`` (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def rib_features(window_size: int | tuple[int, int], n_freqs: int = 10) -> torch.Tensor:
    """Fourier features of the token centres of one window: ``(Wh·Ww, 2 + 4·n_freqs)`` float32 on the CPU.

    Token n = row·Ww + col (the ``(wh ww)`` order of the window partition). Columns: x, y in (-1, 1), then per
    frequency 2^i (no π): sin x, sin y, cos x, cos y. Computed in float32 on the CPU, like the official buffer the
    released weights were trained on (other devices' sin/cos differ in the last bits).
    """
    wh, ww = _pair(window_size)
    check_positive_int(n_freqs, "n_freqs", 0)
    rows, cols = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
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
        self._features: dict = {}  # (window, device) -> features; parameter-free, never invalidated
        self._factors: dict = {}  # (window, device, dtype) -> (bias_q, bias_k)
        self._snapshot: torch.Tensor | None = None  # flat copy of the parameters _factors was computed from
        self._values_verified = False  # set by rib_cache_verified for the duration of one model forward

    def reset_rib_parameters(self) -> None:
        nn.init.normal_(self.to_hidden, std=0.05)
        nn.init.zeros_(self.hidden_b)
        nn.init.normal_(self.to_q, std=0.05)
        nn.init.normal_(self.to_k, std=0.05)

    def rib_parameters(self) -> tuple[nn.Parameter, ...]:
        return self.to_hidden, self.hidden_b, self.to_q, self.to_k

    def clear_rib_cache(self) -> None:
        self._factors = {}
        self._snapshot = None

    def train(self, mode: bool = True):
        if mode:  # free the cached factors (up to a few MB per layer) for the whole training phase
            self.clear_rib_cache()
        return super().train(mode)

    def _cache_usable(self) -> bool:
        if self.training or torch.compiler.is_compiling():
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self.rib_parameters()))

    def _flat_parameters(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.rib_parameters()])

    def _snapshot_matches(self) -> bool:
        snap = self._snapshot
        if snap is None:
            return False
        params = self.rib_parameters()
        if any(p.device != snap.device or p.dtype != snap.dtype for p in params) \
                or sum(p.numel() for p in params) != snap.numel():
            return False
        return self._values_verified or torch.equal(self._flat_parameters(), snap)

    def _window_features(self, window: tuple[int, int], device: torch.device) -> torch.Tensor:
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
        if not self._cache_usable():
            bias_q, bias_k = self._compute_factors(window, device)
            return bias_q.to(dtype).contiguous(), bias_k.to(dtype).contiguous()
        if not self._snapshot_matches():
            self._factors = {}
            self._snapshot = self._flat_parameters().clone()
        key = (window, device, dtype)
        cached = self._factors.get(key)
        if cached is None:
            bias_q, bias_k = self._compute_factors(window, device)
            cached = self._factors[key] = (bias_q.to(dtype).contiguous(), bias_k.to(dtype).contiguous())
        return cached

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, rank={self.rank}, window_size={self.window_size}, "
                f"rib_hidden_dim={self.rib_hidden_dim}, rib_n_freqs={self.rib_n_freqs}")


@contextlib.contextmanager
def rib_cache_verified(modules: nn.Module | Iterable[nn.Module]) -> Iterator[None]:
    """Check the RIB caches of ``modules`` (a module's RIB submodules, or the RIBs in an iterable) against their
    parameters with one comparison, for the duration of the block (one model forward).

    Without it each layer compares its own parameters, one device sync per layer on CUDA. When everything
    matches, the layers skip their own checks inside the block; when something changed, they fall back to them
    (and refill), so the result is the same either way.
    """
    candidates = modules.modules() if isinstance(modules, nn.Module) else modules
    ribs = [m for m in candidates if isinstance(m, RIB) and m._snapshot is not None and m._cache_usable()]
    verified = []
    if ribs:
        snaps = [m._snapshot for m in ribs]
        params = [p for m in ribs for p in m.rib_parameters()]
        same_kind = all(t.device == snaps[0].device and t.dtype == snaps[0].dtype for t in (*snaps, *params))
        same_size = all(m._snapshot.numel() == sum(p.numel() for p in m.rib_parameters()) for m in ribs)
        if same_kind and same_size and torch.equal(torch.cat([p.detach().reshape(-1) for p in params]),
                                                   torch.cat(snaps)):
            verified = ribs
    for m in verified:
        m._values_verified = True
    try:
        yield
    finally:
        for m in verified:
            m._values_verified = False
