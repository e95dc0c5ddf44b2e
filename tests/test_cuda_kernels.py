"""CUDA kernels (edgemamba/kernels/cuda) against their NumPy references (edgemamba/kernels/reference.py).

- On any machine: the kernel references, composed into whole Mamba-1 and Mamba-2 models, give the
  model oracle's (edgemamba.reference) logits and states; the kernel library builds with nvcc for
  Jetson Orin (sm_87), loads, and refuses invalid arguments with a message.
- On a CUDA GPU (marked gpu): every kernel against its reference on random inputs with shapes from
  real models (mamba-130m, mamba-1.4b, mamba2-130m with 1 and 2 groups, and odd sizes that take the
  other code paths), float32 and float16 activations, outputs poisoned with NaN before each run.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import numpy as np
import pytest

from edgemamba.checkpoint import Checkpoint
from edgemamba.kernels import reference as kref
from edgemamba.reference import Reference, causal_conv, gated_rms_norm, rms_norm
from edgemamba.spec import ModelSpec


# ---------------------------------------------------------------------------------------------
# the kernel references are right: composed into a model, they reproduce the oracle
# ---------------------------------------------------------------------------------------------
def random_checkpoint(spec: ModelSpec, seed: int = 0) -> Checkpoint:
    rng = np.random.default_rng(0)
    weights = {}
    for name, shape in spec.weight_shapes().items():
        if name.endswith("A_log"):
            w = np.log(rng.uniform(1, 16, shape))
        elif name.endswith("dt_bias"):
            w = np.log(np.expm1(rng.uniform(1e-3, 0.1, shape)))  # softplus(dt_bias) in the usual init range
        elif name.endswith(("norm", "norm_f", "gate_norm", ".D")):
            w = 1 + 0.3 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        weights[name] = w.astype(np.float32)
    return Checkpoint(spec, weights)


def fused_forward(ref: Reference, ids: np.ndarray, state, step: bool):
    """The model computed with the fused ops' references in place of the oracle's own mixer math:
    CausalConv1dStep + SelectiveStateUpdate for a step, causal conv + SelectiveScan for a prefill.
    ids (b, t); returns last-position logits (b, vocab) and the new state."""
    s, w = ref.spec, ref.w
    state = state.copy()
    h = w["embedding"][ids]  # (b, t, d_model)
    b, t, _ = h.shape
    dt_attrs = dict(dt_min=s.dt_limit[0], dt_max=s.dt_limit[1])
    for i in range(s.n_layer):
        p = f"layers.{i}."
        hn = rms_norm(h, w[p + "norm"], s.norm_eps)
        proj = ref._linear(hn, p + "in_proj")  # (b, t, in_proj_dim)
        if s.arch == "mamba1":
            x, z = proj[..., : s.d_inner], proj[..., s.d_inner :]
        else:
            z, x, dt = np.split(proj, [s.d_inner, s.d_inner + s.conv_dim], axis=-1)
        conv_w, conv_b = w[p + "conv_weight"], w.get(p + "conv_bias")
        if step:
            xc, state.conv[i] = kref.causal_conv1d_step(x[:, 0], state.conv[i], conv_w, conv_b, "silu")
            xc = xc[:, None]  # (b, 1, conv_dim)
        else:
            xc, state.conv[i] = causal_conv(x, state.conv[i], conv_w, conv_b)
        if s.arch == "mamba1":
            dbc = xc @ w[p + "x_proj"].T
            dt, B, C = np.split(dbc, [s.dt_rank, s.dt_rank + s.d_state], axis=-1)
            if s.bcdt_rms_eps is not None:
                dt, B, C = (rms_norm(v, None, s.bcdt_rms_eps) for v in (dt, B, C))
            dt = dt @ w[p + "dt_proj"].T  # (b, t, d_inner); dt_bias goes to the fused op
            seq = dict(x=xc, dt=dt, B=B, C=C, z=z)  # (b, t, ...)
        else:
            e, gn = s.d_inner, s.n_groups * s.d_state
            x4 = xc[..., :e].reshape(b, t, s.n_heads, s.head_dim)
            B = xc[..., e : e + gn].reshape(b, t, s.n_groups, s.d_state)
            C = xc[..., e + gn :].reshape(b, t, s.n_groups, s.d_state)
            seq = dict(x=x4, dt=dt, B=B, C=C, z=None)  # Mamba-2's gate is in the norm, outside the op
        params = dict(A=ref.A[i], D=w[p + "D"], dt_bias=w[p + "dt_bias"], **dt_attrs)
        if step:
            one = {k: None if v is None else v[:, 0] for k, v in seq.items()}
            y, state.ssm[i] = kref.selective_state_update(state.ssm[i], **one, **params)
            y = y[:, None]
        else:
            y, state.ssm[i] = kref.selective_scan(state.ssm[i], **seq, **params)
        if s.arch == "mamba2":
            y = gated_rms_norm(y.reshape(b, t, s.d_inner), z, w[p + "gate_norm"], s.n_groups, s.norm_eps,
                               s.norm_before_gate)
        h = h + ref._linear(y, p + "out_proj")
    h = rms_norm(h[:, -1], w["norm_f"], s.norm_eps)
    return h @ ref.lm_head.T, state


REF_SPECS = {
    "mamba1": ModelSpec(arch="mamba1", d_model=32, n_layer=2, vocab_size=50, d_inner=64, d_state=8, d_conv=4,
                        dt_rank=4),
    "mamba1-falcon-clamped": ModelSpec(arch="mamba1", d_model=32, n_layer=2, vocab_size=50, d_inner=64, d_state=8,
                                       d_conv=3, dt_rank=4, bcdt_rms_eps=1e-5, dt_limit=(0.01, 0.05)),
    "mamba2-g2": ModelSpec(arch="mamba2", d_model=32, n_layer=2, vocab_size=50, d_inner=64, d_state=16, d_conv=4,
                           n_heads=8, head_dim=8, n_groups=2),
}


@pytest.mark.parametrize("kind", REF_SPECS)
def test_kernel_references_reproduce_the_model_oracle(kind):
    """Prefill with SelectiveScan, then steps with CausalConv1dStep + SelectiveStateUpdate, from a
    non-zero state, give the oracle's logits and states (float64, so any mismatch is a real one)."""
    ref = Reference(random_checkpoint(REF_SPECS[kind]), dtype=np.float64)
    ids = np.random.default_rng(1).integers(0, 50, size=(2, 9))
    _, state0 = ref.forward(ids[:, :3])  # a non-zero starting state
    for step, chunk in ((False, ids[:, 3:7]), (True, ids[:, 7:8]), (True, ids[:, 8:9])):
        expected, expected_state = ref.forward(chunk, state0)
        logits, state = fused_forward(ref, chunk, state0, step)
        np.testing.assert_allclose(logits, expected[:, -1], rtol=1e-10, atol=1e-10)
        for got, want in zip(state.conv + state.ssm, expected_state.conv + expected_state.ssm):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        state0 = state


# ---------------------------------------------------------------------------------------------
# the library builds for Jetson and refuses bad arguments (nvcc, no GPU needed)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not on PATH")
def test_kernel_library_builds_for_jetson_orin_and_checks_arguments(tmp_path):
    from edgemamba.kernels.cuda import KernelLibrary, build_library

    lib = KernelLibrary(build_library(tmp_path, arch="sm_87"))
    shapes = dict(batch=1, n_heads=6, head_dim=4, n_groups=4, d_state=16, a_per_state=0,
                  act_dtype=np.float32, weight_dtype=np.float32)
    # Argument checks run before any CUDA call, so they answer on a machine with no GPU.
    with pytest.raises(RuntimeError, match="multiple of n_groups"):
        lib.selective_state_update(*[8] * 11, **shapes)
    with pytest.raises(RuntimeError, match="d_state too large"):
        lib.selective_state_update(*[8] * 11, **{**shapes, "n_groups": 2, "d_state": 2048})
    with pytest.raises(RuntimeError, match="conv width"):
        lib.causal_conv1d_step(*[8] * 6, batch=1, channels=4, width=1, silu=True, act_dtype=np.float32,
                               weight_dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# on the GPU: every kernel against its reference
# ---------------------------------------------------------------------------------------------
def _cuda_device():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def gpu_test(fn):
    reason = "no CUDA GPU here (torch with CUDA and a device are needed)"
    return pytest.mark.gpu(pytest.mark.skipif(_cuda_device() is None, reason=reason)(fn))


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    import torch

    from edgemamba.kernels.cuda import KernelLibrary, build_library

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc (CUDA toolkit) is not on PATH")
    major, minor = torch.cuda.get_device_capability()
    return KernelLibrary(build_library(tmp_path_factory.mktemp("kernels"), arch=f"sm_{major}{minor}"))


@dataclass(frozen=True)
class SSMShape:
    batch: int
    n_heads: int  # Mamba-1: d_inner
    d_state: int
    head_dim: int = 0  # 0: Mamba-1 layout
    n_groups: int = 1

    @property
    def mamba1(self) -> bool:
        return self.head_dim == 0


SSM_SHAPES = {
    "mamba-130m": SSMShape(batch=2, n_heads=1536, d_state=16),
    "mamba-1.4b": SSMShape(batch=1, n_heads=4096, d_state=16),
    "mamba2-130m": SSMShape(batch=2, n_heads=24, head_dim=64, d_state=128),
    "mamba2-130m-g2": SSMShape(batch=3, n_heads=24, head_dim=64, d_state=128, n_groups=2),
    "n12-idle-lanes": SSMShape(batch=2, n_heads=100, d_state=12),  # 16-byte path, a lane of 4 idle
    "n6-scalar-path": SSMShape(batch=2, n_heads=6, head_dim=10, d_state=6, n_groups=3),  # N % 4 != 0
    "n256-two-chunks": SSMShape(batch=2, n_heads=4, head_dim=16, d_state=256),
}
DTYPES = {"fp32": (np.float32, np.float32), "fp16": (np.float16, np.float32), "fp16-weights": (np.float16, np.float16)}


def ssm_inputs(shape: SSMShape, seqlen: int | None, act, weight, rng):
    """Random inputs of the contract's shapes, rounded to their dtypes. seqlen None: the decode step."""
    b, H, N, G = shape.batch, shape.n_heads, shape.d_state, shape.n_groups
    t = () if seqlen is None else (seqlen,)
    head = (H,) if shape.mamba1 else (H, shape.head_dim)
    A = -rng.uniform(0.5, 16, (H, N) if shape.mamba1 else (H,))
    dt = rng.normal(-3, 2, (b, *t, *head[:1]))
    dt.reshape(-1)[:: 7] = 25.0  # some Δ past softplus's linear threshold
    inputs = dict(
        state=rng.standard_normal((b, *head, N)).astype(np.float32),
        x=rng.standard_normal((b, *t, *head)).astype(act), dt=dt.astype(act), A=A.astype(weight),
        B=rng.standard_normal((b, *t, N) if shape.mamba1 else (b, *t, G, N)).astype(act),
        C=rng.standard_normal((b, *t, N) if shape.mamba1 else (b, *t, G, N)).astype(act),
        D=rng.normal(1, 0.3, H).astype(weight), z=rng.standard_normal((b, *t, *head)).astype(act),
        dt_bias=rng.normal(-2, 1, H).astype(weight))
    return inputs


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm((got.astype(np.float64) - want).ravel()) / np.linalg.norm(want.ravel()))


def assert_close(name: str, got: np.ndarray, want: np.ndarray, tol: float):
    assert np.all(np.isfinite(got)), f"{name}: non-finite values (an element was not written, or overflowed)"
    err = rel_err(got, want)
    worst = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    assert err <= tol and worst <= 20 * tol, f"{name}: relative error {err:.2e} (worst element {worst:.2e}) > {tol:.0e}"


def run_ssm(kernels, shape: SSMShape, inputs: dict, seqlen, *, in_place: bool, gated: bool, **attrs):
    """Upload, poison the outputs, run the scan kernel (seqlen None: the decode-step launcher), download."""
    import torch

    dev = {k: torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in inputs.items()}
    y = torch.full(dev["x"].shape, float("nan"), dtype=dev["x"].dtype, device="cuda")
    state_out = dev["state"] if in_place else torch.full_like(dev["state"], float("nan"))
    ptr = lambda name: dev[name].data_ptr()  # noqa: E731
    sizes = dict(batch=shape.batch, n_heads=shape.n_heads, head_dim=max(shape.head_dim, 1),
                 n_groups=shape.n_groups, d_state=shape.d_state, a_per_state=shape.mamba1,
                 act_dtype=inputs["x"].dtype, weight_dtype=inputs["A"].dtype,
                 stream=torch.cuda.current_stream().cuda_stream, **attrs)
    args = (ptr("state"), state_out.data_ptr(), ptr("x"), ptr("dt"), ptr("A"), ptr("B"), ptr("C"), ptr("D"),
            ptr("z") if gated else 0, ptr("dt_bias"), y.data_ptr())
    if seqlen is None:
        kernels.selective_state_update(*args, **sizes)
    else:
        kernels.selective_scan(*args, seqlen=seqlen, **sizes)
    torch.cuda.synchronize()
    return y.cpu().numpy(), state_out.cpu().numpy(), dev["state"].cpu().numpy()


def f64(inputs: dict) -> dict:
    return {k: v.astype(np.float64) for k, v in inputs.items()}


def tolerances(act) -> tuple[float, float]:
    """(y, state): fp32 math throughout; fp16 y is rounded once on output (2^-11 relative)."""
    return (2e-3 if act == np.float16 else 1e-5), 1e-5


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("shape_name", SSM_SHAPES)
@gpu_test
def test_selective_state_update(kernels, shape_name, dtypes):
    shape, (act, weight) = SSM_SHAPES[shape_name], DTYPES[dtypes]
    y_tol, s_tol = tolerances(act)
    rng = np.random.default_rng(0)
    # Out of place, gated: state_in must stay as it was.
    inputs = ssm_inputs(shape, None, act, weight, rng)
    y, state_out, state_in = run_ssm(kernels, shape, inputs, None, in_place=False, gated=True)
    y_ref, s_ref = kref.selective_state_update(**f64(inputs))
    assert_close("y", y, y_ref, y_tol)
    assert_close("state_out", state_out, s_ref, s_tol)
    np.testing.assert_array_equal(state_in, inputs["state"])
    # In place, ungated, Δ clamped: fresh inputs.
    inputs = ssm_inputs(shape, None, act, weight, rng)
    clamp = dict(dt_min=0.001, dt_max=0.05)
    y, state, _ = run_ssm(kernels, shape, inputs, None, in_place=True, gated=False, **clamp)
    y_ref, s_ref = kref.selective_state_update(**{**f64(inputs), "z": None}, **clamp)
    assert_close("y (in place)", y, y_ref, y_tol)
    assert_close("state (in place)", state, s_ref, s_tol)


SCAN_CASES = {"mamba-130m": 300, "mamba2-130m": 64, "mamba2-130m-g2": 33, "n6-scalar-path": 17}


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("shape_name", SCAN_CASES)
@gpu_test
def test_selective_scan(kernels, shape_name, dtypes):
    """A prefill chunk (300 tokens for mamba-130m: nothing grows with the chunk length)."""
    shape, (act, weight), seqlen = SSM_SHAPES[shape_name], DTYPES[dtypes], SCAN_CASES[shape_name]
    y_tol, s_tol = tolerances(act)
    rng = np.random.default_rng(1)
    for gated, in_place in ((True, False), (False, True)):
        inputs = ssm_inputs(shape, seqlen, act, weight, rng)
        y, state, _ = run_ssm(kernels, shape, inputs, seqlen, in_place=in_place, gated=gated)
        y_ref, s_ref = kref.selective_scan(**{**f64(inputs), "z": f64(inputs)["z"] if gated else None})
        assert_close(f"y (gated={gated})", y, y_ref, y_tol)
        assert_close(f"state (in_place={in_place})", state, s_ref, s_tol)


CONV_CASES = {  # name: (batch, channels, width, bias, silu)
    "mamba-130m": (2, 1536, 4, True, True),
    "mamba2-130m-xbc": (3, 1536 + 2 * 128, 4, True, True),
    "width2-nobias-linear": (2, 100, 2, False, False),
}


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
@gpu_test
def test_causal_conv1d_step(kernels, case, dtypes):
    import torch

    (batch, channels, width, has_bias, silu), (act, weight) = CONV_CASES[case], DTYPES[dtypes]
    rng = np.random.default_rng(2)
    for in_place in (False, True):
        x = rng.standard_normal((batch, channels)).astype(act)
        past = rng.standard_normal((batch, channels, width - 1)).astype(np.float32)
        w = (rng.standard_normal((channels, width)) / 2).astype(weight)
        bias = rng.standard_normal(channels).astype(weight) if has_bias else None
        d = {k: torch.from_numpy(v).cuda() for k, v in dict(x=x, past=past, w=w).items()}
        d_bias = torch.from_numpy(bias).cuda() if has_bias else None
        y = torch.full(d["x"].shape, float("nan"), dtype=d["x"].dtype, device="cuda")
        present = d["past"] if in_place else torch.full_like(d["past"], float("nan"))
        kernels.causal_conv1d_step(d["x"].data_ptr(), d["past"].data_ptr(), present.data_ptr(), d["w"].data_ptr(),
                                   d_bias.data_ptr() if has_bias else 0, y.data_ptr(), batch=batch, channels=channels,
                                   width=width, silu=silu, act_dtype=act, weight_dtype=weight,
                                   stream=torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        y_ref, present_ref = kref.causal_conv1d_step(x.astype(np.float64), past.astype(np.float64),
                                                     w.astype(np.float64),
                                                     None if bias is None else bias.astype(np.float64),
                                                     "silu" if silu else "none")
        assert_close("y", y.cpu().numpy(), y_ref, tolerances(act)[0])
        np.testing.assert_array_equal(present.cpu().numpy(), present_ref.astype(np.float32))  # a pure shift
