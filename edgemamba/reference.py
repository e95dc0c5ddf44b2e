"""The NumPy reference: the oracle every backend, pass and kernel is tested against.

Readable first: the selective scan is the paper's recurrence, one time step at a time,

    h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t x_t) ⊗ B_t        y_t = h_t · C_t + D ⊙ x_t

It runs in float32 or float64 (`Reference(ckpt, dtype=np.float64)`). Tested against Hugging Face
transformers on random weights (tests/test_reference.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemamba.checkpoint import Checkpoint
from edgemamba.spec import ModelSpec


@dataclass
class State:
    """The recurrent state of a batch of sequences: fixed size, whatever the context length."""

    conv: list[np.ndarray]  # per layer: (b, conv_dim, d_conv-1), the last d_conv-1 conv inputs
    ssm: list[np.ndarray]  # per layer: Mamba-1 (b, d_inner, d_state); Mamba-2 (b, n_heads, head_dim, d_state)

    @classmethod
    def zeros(cls, spec: ModelSpec, batch: int = 1, dtype=np.float32) -> State:
        return cls(
            conv=[np.zeros(spec.conv_state_shape(batch), dtype) for _ in range(spec.n_layer)],
            ssm=[np.zeros(spec.ssm_state_shape(batch), dtype) for _ in range(spec.n_layer)],
        )

    def copy(self) -> State:
        return State([c.copy() for c in self.conv], [s.copy() for s in self.ssm])


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x * (0.5 * (1.0 + np.tanh(0.5 * x)))  # = x·sigmoid(x), without overflow


def softplus(x: np.ndarray) -> np.ndarray:
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


def causal_conv(x: np.ndarray, conv_state: np.ndarray, weight: np.ndarray, bias: np.ndarray | None):
    """Depthwise causal conv over time, continuing from `conv_state`.

    x: (b, t, c); conv_state: (b, c, k-1); weight: (c, k). Returns silu(conv) (b, t, c) and the
    new conv_state (the last k-1 inputs).
    """
    b, t, c = x.shape
    k = weight.shape[1]
    xin = np.concatenate([conv_state, x.transpose(0, 2, 1)], axis=2)  # (b, c, k-1+t)
    out = sum(weight[None, :, j, None] * xin[:, :, j : j + t] for j in range(k))  # (b, c, t)
    if bias is not None:
        out = out + bias[None, :, None]
    return silu(out.transpose(0, 2, 1)), xin[:, :, t:].copy()


class Reference:
    """Prefill (all positions) and step with explicit state, in float32 or float64."""

    def __init__(self, checkpoint: Checkpoint, dtype=np.float32):
        self.spec = checkpoint.spec
        self.dtype = np.dtype(dtype)
        self.w = {k: v.astype(self.dtype) for k, v in checkpoint.weights.items()}
        # A = -exp(A_log), folded once (DESIGN.md: never recomputed per step).
        self.A = [-np.exp(self.w[f"layers.{i}.A_log"]) for i in range(self.spec.n_layer)]
        self.lm_head = self.w["embedding"] if self.spec.tie_embeddings else self.w["lm_head"]

    def new_state(self, batch: int = 1) -> State:
        return State.zeros(self.spec, batch, self.dtype)

    # ---- public API ---------------------------------------------------------------------------
    def forward(self, ids: np.ndarray, state: State | None = None) -> tuple[np.ndarray, State]:
        """ids (b, t) -> logits at every position (b, t, vocab), and the state after the last token."""
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None]
        state = self.new_state(ids.shape[0]) if state is None else state.copy()
        h = self.w["embedding"][ids]  # (b, t, d_model)
        for i in range(self.spec.n_layer):
            p = f"layers.{i}."
            residual = h
            hn = rms_norm(h, self.w[p + "norm"], self.spec.norm_eps)
            mixer = self._mamba1 if self.spec.arch == "mamba1" else self._mamba2
            h = residual + mixer(i, hn, state)
        h = rms_norm(h, self.w["norm_f"], self.spec.norm_eps)
        return h @ self.lm_head.T, state

    def step(self, ids: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """One token per sequence: ids (b,) -> logits (b, vocab), new state."""
        logits, state = self.forward(np.asarray(ids).reshape(-1, 1), state)
        return logits[:, 0], state

    def greedy(self, prompt: np.ndarray, n_new: int) -> list[int]:
        """Greedy continuation of one prompt: prefill, then n_new steps."""
        logits, state = self.forward(np.asarray(prompt)[None])
        out = [int(np.argmax(logits[0, -1]))]
        while len(out) < n_new:
            logits, state = self.step(np.array([out[-1]]), state)
            out.append(int(np.argmax(logits[0])))
        return out

    # ---- mixers -----------------------------------------------------------------------------
    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = x @ self.w[name].T
        bias = self.w.get(name + "_bias")
        return y if bias is None else y + bias

    def _dt(self, dt: np.ndarray) -> np.ndarray:
        lo, hi = self.spec.dt_limit
        return np.clip(softplus(dt), lo, hi)

    def _mamba1(self, i: int, h: np.ndarray, state: State) -> np.ndarray:
        s, p = self.spec, f"layers.{i}."
        e, n, r = s.d_inner, s.d_state, s.dt_rank
        xz = self._linear(h, p + "in_proj")  # (b, t, 2e)
        x, z = xz[..., :e], xz[..., e:]
        x, state.conv[i] = causal_conv(x, state.conv[i], self.w[p + "conv_weight"], self.w.get(p + "conv_bias"))
        dbc = x @ self.w[p + "x_proj"].T  # (b, t, r + 2n)
        dt, B, C = dbc[..., :r], dbc[..., r : r + n], dbc[..., r + n :]
        if s.bcdt_rms_eps is not None:  # Falcon-Mamba
            dt, B, C = (rms_norm(v, None, s.bcdt_rms_eps) for v in (dt, B, C))
        dt = self._dt(dt @ self.w[p + "dt_proj"].T + self.w[p + "dt_bias"])  # (b, t, e)
        A = self.A[i]  # (e, n)
        hs = state.ssm[i]  # (b, e, n)
        y = np.empty_like(x)  # (b, t, e)
        for t in range(x.shape[1]):
            dA = np.exp(dt[:, t, :, None] * A)  # (b, e, n)
            dBx = (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]  # (b, e, n)
            hs = dA * hs + dBx
            y[:, t] = np.einsum("ben,bn->be", hs, C[:, t])
        state.ssm[i] = hs
        y = (y + x * self.w[p + "D"]) * silu(z)
        return self._linear(y, p + "out_proj")

    def _mamba2(self, i: int, h: np.ndarray, state: State) -> np.ndarray:
        s, p = self.spec, f"layers.{i}."
        e, n, g, nh, hd = s.d_inner, s.d_state, s.n_groups, s.n_heads, s.head_dim
        b, t, _ = h.shape
        zxbcdt = self._linear(h, p + "in_proj")  # (b, t, e + conv_dim + nh)
        z, xbc, dt = zxbcdt[..., :e], zxbcdt[..., e : e + s.conv_dim], zxbcdt[..., e + s.conv_dim :]
        xbc, state.conv[i] = causal_conv(xbc, state.conv[i], self.w[p + "conv_weight"], self.w.get(p + "conv_bias"))
        x = xbc[..., :e].reshape(b, t, nh, hd)
        # Each group's B and C serve n_heads/n_groups consecutive heads.
        B = np.repeat(xbc[..., e : e + g * n].reshape(b, t, g, n), nh // g, axis=2)  # (b, t, nh, n)
        C = np.repeat(xbc[..., e + g * n :].reshape(b, t, g, n), nh // g, axis=2)  # (b, t, nh, n)
        dt = self._dt(dt + self.w[p + "dt_bias"])  # (b, t, nh)
        A = self.A[i]  # (nh,)
        hs = state.ssm[i]  # (b, nh, hd, n)
        y = np.empty_like(x)  # (b, t, nh, hd)
        for k in range(t):
            dA = np.exp(dt[:, k] * A)  # (b, nh)
            dBx = (dt[:, k, :, None] * x[:, k])[..., None] * B[:, k, :, None, :]  # (b, nh, hd, n)
            hs = dA[:, :, None, None] * hs + dBx
            y[:, k] = np.einsum("bhpn,bhn->bhp", hs, C[:, k])
        state.ssm[i] = hs
        y = (y + x * self.w[p + "D"][:, None]).reshape(b, t, e)
        y = gated_rms_norm(y, z, self.w[p + "gate_norm"], g, s.norm_eps, s.norm_before_gate)
        return self._linear(y, p + "out_proj")


def gated_rms_norm(y, z, weight, n_groups: int, eps: float, norm_before_gate: bool) -> np.ndarray:
    """Mamba-2's gated RMSNorm, normalised per group of d_inner/n_groups channels."""
    *lead, e = y.shape
    if not norm_before_gate:
        y = y * silu(z)
    y = rms_norm(y.reshape(*lead, n_groups, e // n_groups), None, eps).reshape(*lead, e) * weight
    return y * silu(z) if norm_before_gate else y
