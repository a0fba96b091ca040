"""Pure-PyTorch oracle for ``flash_rfbias``: the bias is materialised, so use it for tests and small inputs only."""
from __future__ import annotations

import torch


def _expand_factor(f: torch.Tensor, batch: int) -> torch.Tensor:
    # (H, N, R) shared by every batch element, or (B, H, N, R) per element -> (B, H, N, R)
    return f.unsqueeze(0).expand(batch, *f.shape) if f.dim() == 3 else f


def flash_rfbias_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_q: torch.Tensor,
    bias_k: torch.Tensor,
    scale: float | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
    return_lse: bool = False,
):
    """``softmax(scale * q kᵀ + bias_q bias_kᵀ) v`` per (batch, head).

    q, k, v: (B, N, H, D); bias_q, bias_k: (H, N, R) or (B, H, N, R).
    Computed in ``compute_dtype`` (float32 by default, float64 when the inputs are float64) and returned in q's dtype.
    ``lse`` (B, H, N) is the natural-log log-sum-exp of the logits, in the compute dtype.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, N, H, D = q.shape
    if scale is None:
        scale = D ** -0.5
    qf = q.to(compute_dtype).transpose(1, 2)  # (B, H, N, D)
    kf = k.to(compute_dtype).transpose(1, 2)
    vf = v.to(compute_dtype).transpose(1, 2)
    bq = _expand_factor(bias_q.to(compute_dtype), B)
    bk = _expand_factor(bias_k.to(compute_dtype), B)
    logits = scale * (qf @ kf.transpose(-1, -2)) + bq @ bk.transpose(-1, -2)
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.softmax(logits, dim=-1) @ vf
    out = out.transpose(1, 2).to(q.dtype)
    return (out, lse) if return_lse else out


def flash_rfbias_concat(q, k, v, bias_q, bias_k, scale: float | None = None) -> torch.Tensor:
    """The paper's route: ``[q·s | Bq]``, ``[k | Bk]``, ``[v | 0]`` concatenated in memory, then one
    ``scaled_dot_product_attention`` with scale 1. Kept as the comparison path (and to show the identity)."""
    B, N, H, D = q.shape
    if scale is None:
        scale = D ** -0.5
    R = bias_q.shape[-1]
    bq = _expand_factor(bias_q, B).to(q.dtype)  # (B, H, N, R): materialised by the cat below
    bk = _expand_factor(bias_k, B).to(q.dtype)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
    q_cat = torch.cat([qt * scale, bq], dim=-1)
    k_cat = torch.cat([kt, bk], dim=-1)
    v_cat = torch.cat([vt, vt.new_zeros(B, H, N, R)], dim=-1)
    pad = (-(D + R)) % 8  # flash/cuDNN backends want head dims in multiples of 8
    if pad:
        q_cat, k_cat, v_cat = (torch.nn.functional.pad(t, (0, pad)) for t in (q_cat, k_cat, v_cat))
    out = torch.nn.functional.scaled_dot_product_attention(q_cat, k_cat, v_cat, scale=1.0)
    return out[..., :D].transpose(1, 2)
