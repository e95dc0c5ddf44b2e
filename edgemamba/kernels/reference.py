"""NumPy references for the fused ops (the contract in the kernels' header, `cuda/mamba_kernels.h`).

One function per op, written from the contract and nothing else; they run in the dtype of their
inputs (pass float64 arrays for a high-precision reference). They are cross-checked against the
model oracle `edgemamba.reference` by composing them into whole Mamba-1 and Mamba-2 layers
(tests/test_cuda_kernels.py), and every CUDA kernel and TensorRT plugin is tested against them.

Layouts (b = batch, t = time, Mamba-1 has no head axis):
    Mamba-1  state (b, d_inner, N)   x, dt, z (b, d_inner)   A (d_inner, N)   B, C (b, N)      D, dt_bias (d_inner,)
    Mamba-2  state (b, H, P, N)      x, z (b, H, P) dt (b, H) A (H,)          B, C (b, G, N)   D, dt_bias (H,)
"""

from __future__ import annotations

import numpy as np

from edgemamba.reference import silu, softplus


def _heads_view(state, x, dt, A, B, C, D, z, dt_bias):
    """Both layouts seen as Mamba-2's: state (b, H, P, N), x/z (b, H, P), B/C (b, G, N).

    Mamba-1 is the case P = 1, G = 1 with A per (head, state): A becomes (H, 1, N), Mamba-2's (H, 1, 1)."""
    if state.ndim == 3:  # Mamba-1: each channel is a head of size 1
        A = A[:, None, :]  # (H, 1, N)
        B, C = B[:, None, :], C[:, None, :]  # (b, 1, N)
        x = x[..., None]
        z = None if z is None else z[..., None]
        state = state[:, :, None, :]
    else:
        A = A[:, None, None]  # (H, 1, 1)
    return state, x, dt, A, B, C, D, z, dt_bias


def dt_transform(dt, dt_bias=None, dt_softplus: bool = True, dt_min: float = 0.0, dt_max: float = np.inf):
    """Δ = clamp(softplus(dt + dt_bias), dt_min, dt_max)."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = softplus(dt)
    return np.clip(dt, dt_min, dt_max)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, *, dt_softplus: bool = True,
                           dt_min: float = 0.0, dt_max: float = np.inf):
    """One decode step; returns (y, state') and leaves `state` unchanged.

    state' = exp(Δ·A)·state + (Δ·x)⊗B;  y = state'·C + D·x;  y = y·silu(z) when z is given."""
    mamba1 = state.ndim == 3
    h, x4, dt, A4, B, C, D, z4, dt_bias = _heads_view(state, x, dt, A, B, C, D, z, dt_bias)
    b, nh, p, n = h.shape
    g = B.shape[1]
    delta = dt_transform(dt, dt_bias, dt_softplus, dt_min, dt_max)  # (b, H)
    B = np.repeat(B, nh // g, axis=1)[:, :, None, :]  # (b, H, 1, N): head k reads group k // (H/G)
    C = np.repeat(C, nh // g, axis=1)[:, :, None, :]
    dA = np.exp(delta[:, :, None, None] * A4[None])  # (b, H, 1|P, 1|N)
    h = dA * h + (delta[:, :, None] * x4)[..., None] * B  # (b, H, P, N)
    y = np.sum(h * C, axis=-1)  # (b, H, P)
    if D is not None:
        y = y + D[:, None] * x4
    if z4 is not None:
        y = y * silu(z4)
    if mamba1:
        return y[..., 0], h[:, :, 0, :]
    return y, h


def selective_scan(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, **attrs):
    """Prefill over a chunk: selective_state_update for t = 0..T-1 in order, from `state`.

    x, dt, z, B, C carry a time axis after batch: (b, T, ...). Returns y (b, T, ...) and the state
    after the last step."""
    ys = []
    for t in range(x.shape[1]):
        y, state = selective_state_update(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D,
                                          None if z is None else z[:, t], dt_bias, **attrs)
        ys.append(y)
    return np.stack(ys, axis=1), state


def causal_conv1d_step(x, conv_state, weight, bias=None, activation: str = "silu"):
    """Decode step of the depthwise causal conv: x (b, C), conv_state (b, C, K-1), weight (C, K).

    Returns y (b, C) and conv_state' (b, C, K-1), the last K-1 inputs."""
    window = np.concatenate([conv_state, x[:, :, None]], axis=2)  # (b, C, K)
    y = np.sum(window * weight[None], axis=2)
    if bias is not None:
        y = y + bias
    if activation == "silu":
        y = silu(y)
    elif activation != "none":
        raise ValueError(f"activation must be 'silu' or 'none', got {activation!r}")
    return y, window[:, :, 1:]


def greedy_pick(logits):
    """Greedy decoding's next token per sequence: (batch, vocab) -> (batch,) int32, the first index
    of the largest logit (numpy.argmax), -1 where the row holds a NaN or an infinity."""
    out = np.argmax(logits, axis=1).astype(np.int32)
    out[~np.all(np.isfinite(logits), axis=1)] = -1
    return out
