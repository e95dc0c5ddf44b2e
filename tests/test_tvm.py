"""TVM backend: each TIR kernel against its NumPy reference, tvm-llvm artifacts against the model
reference (Mamba-1, Mamba-2, Falcon-Mamba, biases and untied head), loading with the runtime alone,
CUDA code generation for sm_87 and sm_90 without a GPU, and tvm-aarch64 under qemu-user."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_logits_close, random_ids

tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install apache-tvm==0.27.0.post1)")

from edgemamba import EdgeMambaError, Session, load_checkpoint  # noqa: E402
from edgemamba.artifact import compile_artifact, load_artifact  # noqa: E402
from edgemamba.kernels import tvm_prefill as P  # noqa: E402
from edgemamba.kernels.tvm_common import cpu_target  # noqa: E402
from edgemamba.kernels.tvm_gemv import GemvSpec, gemv_kernel, gemv_reference  # noqa: E402
from edgemamba.kernels.reference import greedy_pick  # noqa: E402
from edgemamba.kernels.tvm_greedy import greedy_kernel  # noqa: E402
from edgemamba.kernels.tvm_ssm import SsmStepSpec, ssm_step_kernel, ssm_step_reference  # noqa: E402
from edgemamba.reference import Reference  # noqa: E402
from edgemamba.spec import ModelSpec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BATCHES = (1, 2)  # compiled step batches: enough to exercise batch chunking, quick to build

M1 = ModelSpec(arch="mamba1", d_model=64, n_layer=2, vocab_size=96, d_inner=128, d_state=8, d_conv=4, dt_rank=4)
FALCON = ModelSpec(arch="mamba1", d_model=64, n_layer=2, vocab_size=96, d_inner=128, d_state=8, d_conv=4, dt_rank=5,
                   bcdt_rms_eps=1e-5)
M2 = ModelSpec(arch="mamba2", d_model=64, n_layer=2, vocab_size=96, d_inner=128, d_state=16, d_conv=4, n_heads=8,
               head_dim=16, n_groups=2, dt_limit=(0.001, 5.0))

GEMVS = {
    "rms": GemvSpec(n=96, k=64, batch=1, norm="rms"),
    "rms-conv-bias": GemvSpec(n=256, k=64, batch=3, norm="rms", bias=True, epilogue="conv", conv_lo=0, conv_hi=128),
    "rms-conv-mamba2": GemvSpec(n=352, k=64, batch=2, norm="rms", epilogue="conv", conv_lo=128, conv_hi=320,
                                conv_bias=False),
    "slice": GemvSpec(n=80, k=128, batch=2, x_cols=256),
    "residual-bias": GemvSpec(n=64, k=128, batch=2, epilogue="residual", bias=True),
    "rms-groups": GemvSpec(n=64, k=128, batch=2, norm="rms", groups=2, epilogue="residual"),
    "gated": GemvSpec(n=64, k=128, batch=2, norm="gated", groups=2, z_cols=352, epilogue="residual"),
    "gated-norm-first-fp16": GemvSpec(n=64, k=128, batch=2, wdtype="float16", norm="gated", groups=2, norm_on_x=True,
                                      z_cols=352, epilogue="residual"),
    "fp16-odd-k": GemvSpec(n=100, k=48, batch=1, wdtype="float16", norm="rms"),
    "int8-conv": GemvSpec(n=256, k=64, batch=2, wdtype="int8", norm="rms", bias=True, epilogue="conv", conv_lo=0,
                          conv_hi=128),
    "int8-residual": GemvSpec(n=64, k=128, batch=1, wdtype="int8", epilogue="residual"),
}
SSM_STEPS = {"mamba1": SsmStepSpec(M1, 3), "mamba1-dt16": SsmStepSpec(M1, 1, "float16"), "falcon": SsmStepSpec(FALCON, 1),
             "mamba2": SsmStepSpec(M2, 2),
             "mamba2-norm-first": SsmStepSpec(replace(M2, norm_before_gate=True), 1)}
MATMULS = {
    "plain": P.MatmulSpec(96, 64),
    "bias-residual": P.MatmulSpec(130, 48, bias=True, residual=True),
    "slice": P.MatmulSpec(128, 5, x_cols=21),
    "w-transposed": P.MatmulSpec(128, 5, x_cols=21, w_kn=True),
    "fp16": P.MatmulSpec(64, 128, "float16", "float16", residual=True),
    "int8": P.MatmulSpec(64, 128, "int8", "float32", bias=True, residual=True),
}
ROW_NORMS = {"rms": P.RowNormSpec(64), "rms-fp16": P.RowNormSpec(64, "float16"),
             "gated": P.RowNormSpec(128, groups=2, gated=True, z_cols=352),
             "gated-norm-first": P.RowNormSpec(128, groups=2, gated=True, norm_on_x=True, z_cols=352)}
CONVS = {"mamba1": P.ConvChunkSpec(256, 0, 128, 4, True), "mamba2": P.ConvChunkSpec(352, 128, 320, 4, False)}
SCANS = {"mamba1": P.ScanSpec(M1), "mamba2": P.ScanSpec(M2)}
# the GPU prefill's kernels, run here through their CPU builds (same per-thread code, one lane)
CONV_OUTS = {"mamba1-f16": P.ConvOutSpec(CONVS["mamba1"], half=True), "mamba2": P.ConvOutSpec(CONVS["mamba2"])}
SCAN_CHUNKS = {"mamba1": P.ScanChunkSpec(M1, max_chunks=4),
               "mamba1-fp16-delta": P.ScanChunkSpec(M1, "float16", max_chunks=4, strided=True, keep_delta=True),
               "mamba2": P.ScanChunkSpec(M2, max_chunks=4),
               "mamba2-2ch-no-delta": P.ScanChunkSpec(M2, max_chunks=4, channels=2, keep_delta=False)}


@pytest.fixture(scope="module")
def cpu_kernels():
    """Every kernel above compiled for this CPU in one module (one compile)."""
    funcs = [gemv_kernel(s, False) for s in GEMVS.values()]
    funcs += [ssm_step_kernel(s, False) for s in SSM_STEPS.values()]
    funcs += [P.matmul_kernel(s, False) for s in MATMULS.values()]
    funcs += [P.row_norm_kernel(s, False) for s in ROW_NORMS.values()]
    funcs += [P.conv_chunk_kernel(s, False) for s in CONVS.values()]
    funcs += [P.scan_kernel(s, False) for s in SCANS.values()]
    funcs += [P.conv_out_kernel(s, False) for s in CONV_OUTS.values()]
    funcs += [f for s in SCAN_CHUNKS.values() for f in P.scan_chunk_kernels(s, False)]
    funcs += [P.bcdt_norm_kernel(FALCON, False), P.embed_kernel(96, 64, "float16", False),
              P.embed_kernel(96, 64, "int8", False), greedy_kernel(6, 1000, False)]
    mod = tvm.IRModule({f.attrs["global_symbol"]: f for f in funcs})
    lib = tvm.compile(mod, target=cpu_target())
    return lambda f: lib[f.attrs["global_symbol"]]


def _call(kernel, names, arrays):
    """Run a kernel on copies of `arrays` (name -> ndarray) in `names` order; returns the copies."""
    tensors = {n: tvm.runtime.tensor(arrays[n]) for n in names}
    kernel(*(tensors[n] for n in names))
    return {n: t.numpy() for n, t in tensors.items()}


def _rel(actual, expected):
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("name", list(GEMVS))
def test_gemv_kernel_matches_numpy(name, cpu_kernels):
    s = GEMVS[name]
    rng = np.random.default_rng(0)
    C = max(s.n_conv, 1)
    a = {"x": rng.standard_normal((s.batch, s.xw)), "z": rng.standard_normal((s.batch, s.z_cols or 1)),
         "norm_w": 1 + 0.3 * rng.standard_normal(s.k), "W": rng.standard_normal((s.n, s.k)) / np.sqrt(s.k),
         "bias": rng.standard_normal(s.n), "conv_w": rng.standard_normal((C, s.d_conv)),
         "conv_b": rng.standard_normal(C), "conv_state": rng.standard_normal((s.batch, C, s.d_conv - 1)),
         "out": rng.standard_normal((s.batch, s.n))}
    a = {k: v.astype(np.float32) for k, v in a.items()}
    if s.quantized:
        from edgemamba.runtimes.tvm import quantize_rows

        a["W"], a["w_scale"] = quantize_rows(a["W"])
    else:
        a["W"] = a["W"].astype(s.wdtype)
    got = _call(cpu_kernels(gemv_kernel(s, False)), s.params, a)
    ref = {k: v.astype(np.float64) for k, v in a.items()}
    expected = gemv_reference(s, ref["x"], ref["W"], **{k: ref[k] for k in s.params if k not in ("x", "W")})
    assert _rel(got["out"], expected) < 1e-5
    if "conv_state" in s.params:  # the conv state moved by one step, in place
        assert _rel(got["conv_state"], ref["conv_state"]) < 1e-6
        assert np.array_equal(got["conv_state"][:, :, :-1], a["conv_state"][:, :, 1:])


@pytest.mark.parametrize("name", list(SSM_STEPS))
def test_ssm_step_kernel_updates_state_in_place(name, cpu_kernels):
    k = SSM_STEPS[name]
    s, rng = k.spec, np.random.default_rng(1)
    per = s.d_inner if s.arch == "mamba1" else s.n_heads
    a = {"proj": rng.standard_normal((k.batch, s.in_proj_dim)), "dbc": rng.standard_normal((k.batch, s.dt_rank + 2 * s.d_state)),
         "dt_w": 0.3 * rng.standard_normal((s.dt_rank, s.d_inner)), "dt_bias": rng.standard_normal(per),
         "A": -np.exp(rng.standard_normal((s.d_inner, s.d_state) if s.arch == "mamba1" else (s.n_heads,))),
         "D": rng.standard_normal(per), "ssm_state": rng.standard_normal(s.ssm_state_shape(k.batch)),
         "y": np.zeros((k.batch, s.d_inner))}
    a = {key: v.astype(np.float32) for key, v in a.items()}
    a["dt_w"] = a["dt_w"].astype(k.dt_dtype)  # fp16 libraries: dt_proj in fp16 (the reference reads the same values)
    got = _call(cpu_kernels(ssm_step_kernel(k, False)), k.params, a)
    ref = {key: v.astype(np.float64) for key, v in a.items()}
    y = ssm_step_reference(k, ref["proj"], ref["ssm_state"],
                           **{key: ref[key] for key in k.params if key not in ("proj", "ssm_state", "y")})
    assert _rel(got["y"], y) < 1e-5
    assert _rel(got["ssm_state"], ref["ssm_state"]) < 1e-5


@pytest.mark.parametrize("name", list(MATMULS))
def test_matmul_kernel_matches_numpy(name, cpu_kernels):
    s, rng, t = MATMULS[name], np.random.default_rng(2), 37  # 37 rows: a partial row tile
    a = {"x": rng.standard_normal((t, s.xw)).astype(s.adtype), "W": (rng.standard_normal(s.w_shape) * 40).astype(s.wdtype),
         "w_scale": rng.uniform(0.5, 2, s.n).astype(np.float32), "bias": rng.standard_normal(s.n).astype(np.float32),
         "res": rng.standard_normal((t, s.n)).astype(np.float32), "out": np.zeros((t, s.n), np.float32)}
    got = _call(cpu_kernels(P.matmul_kernel(s, False)), s.params, a)
    assert _rel(got["out"], P.matmul_reference(s, a["x"], a["W"], a["bias"], a["res"], a["w_scale"])) < 1e-5


@pytest.mark.parametrize("name", list(ROW_NORMS))
def test_row_norm_kernel_matches_numpy(name, cpu_kernels):
    s, rng, t = ROW_NORMS[name], np.random.default_rng(3), 11
    a = {"x": rng.standard_normal((t, s.k)).astype(np.float32), "z": rng.standard_normal((t, s.z_cols)).astype(np.float32),
         "w": rng.standard_normal(s.k).astype(np.float32), "out": np.zeros((t, s.k), s.out_dtype)}
    got = _call(cpu_kernels(P.row_norm_kernel(s, False)), s.params, a)
    expected = P.row_norm_reference(s, a["x"].astype(np.float64), a["w"], a["z"])
    assert _rel(got["out"], expected) < (1e-3 if s.out_dtype == "float16" else 1e-5)


@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize("t", [37, 2])  # a chunk shorter than the conv window too
def test_conv_chunk_kernel_carries_state(name, t, cpu_kernels):
    s, rng = CONVS[name], np.random.default_rng(4)
    C = s.hi - s.lo
    a = {"proj": rng.standard_normal((t, s.cols)), "conv_w": rng.standard_normal((C, s.d_conv)),
         "conv_b": rng.standard_normal(C), "conv_state": rng.standard_normal((1, C, s.d_conv - 1))}
    a = {k: v.astype(np.float32) for k, v in a.items()}
    got = _call(cpu_kernels(P.conv_chunk_kernel(s, False)), s.params, a)
    ref = {k: v.astype(np.float64) for k, v in a.items()}
    P.conv_chunk_reference(s, ref["proj"], ref["conv_w"], ref["conv_state"], ref["conv_b"] if s.conv_bias else None)
    assert _rel(got["proj"], ref["proj"]) < 1e-5 and _rel(got["conv_state"], ref["conv_state"]) < 1e-6


@pytest.mark.parametrize("name", list(SCANS))
def test_scan_kernel_equals_repeated_steps(name, cpu_kernels):
    k, rng, t = SCANS[name], np.random.default_rng(5), 23
    s = k.spec
    per = s.d_inner if s.arch == "mamba1" else s.n_heads
    a = {"proj": rng.standard_normal((t, s.in_proj_dim)), "dbc": rng.standard_normal((t, s.dt_rank + 2 * s.d_state)),
         "dt": rng.standard_normal((t, s.d_inner)), "dt_bias": rng.standard_normal(per),
         "A": -np.exp(rng.standard_normal((s.d_inner, s.d_state) if s.arch == "mamba1" else (s.n_heads,))),
         "D": rng.standard_normal(per), "ssm_state": rng.standard_normal(s.ssm_state_shape(1)),
         "y": np.zeros((t, s.d_inner))}
    a = {key: v.astype(np.float32) for key, v in a.items()}
    got = _call(cpu_kernels(P.scan_kernel(k, False)), k.params, a)
    ref = {key: v.astype(np.float64) for key, v in a.items()}
    y = P.scan_reference(k, ref["proj"], ref["ssm_state"],
                         **{key: ref[key] for key in k.params if key not in ("proj", "ssm_state", "y")})
    assert _rel(got["y"], y) < 1e-5 and _rel(got["ssm_state"], ref["ssm_state"]) < 1e-5


@pytest.mark.parametrize("name", list(CONV_OUTS))
@pytest.mark.parametrize("t", [37, 2, 1])  # chunks shorter than the conv window too
def test_conv_out_kernel_leaves_proj_and_carries_state(name, t, cpu_kernels):
    s, rng = CONV_OUTS[name], np.random.default_rng(8)
    C = s.conv.hi - s.conv.lo
    a = {"proj": rng.standard_normal((t, s.conv.cols)), "conv_w": rng.standard_normal((C, s.conv.d_conv)),
         "conv_b": rng.standard_normal(C), "conv_state": rng.standard_normal((1, C, s.conv.d_conv - 1)),
         "xc": np.full((t, C), np.nan)}
    a = {k: v.astype(np.float32) for k, v in a.items()} | {"xc16": np.full((t, C), np.nan, np.float16)}
    got = _call(cpu_kernels(P.conv_out_kernel(s, False)), s.params, a)
    ref = {k: v.astype(np.float64) for k, v in a.items()}
    xc = P.conv_out_reference(s, ref["proj"], ref["conv_w"], ref["conv_state"], ref["conv_b"] if s.conv.conv_bias else None)
    assert _rel(got["xc"], xc) < 1e-5 and _rel(got["conv_state"], ref["conv_state"]) < 1e-6
    assert np.array_equal(got["proj"], a["proj"])  # the raw in_proj output stays for z, dt and the gated norm
    if s.half:
        assert _rel(got["xc16"], xc) < 1e-3


@pytest.mark.parametrize("name", list(SCAN_CHUNKS))
@pytest.mark.parametrize("t", [1, 23, 70, 200])  # 1 to 4 pieces (of 16, 16, 32, 64), the last one partial
def test_scan_in_pieces_equals_the_sequential_scan(name, t, cpu_kernels):
    """scan_states then scan_pieces: y and the final state as the token-by-token scan (float64)."""
    k, rng = SCAN_CHUNKS[name], np.random.default_rng(9)
    s = k.spec
    xw = s.d_inner if k.m1 else s.conv_dim
    a = {"proj": rng.standard_normal((t, s.in_proj_dim)), "xc": rng.standard_normal((t, xw)),
         "dbc": rng.standard_normal((t, s.dt_rank + 2 * s.d_state)), "dt": rng.standard_normal((t, s.d_inner)),
         "dt_bias": rng.standard_normal(k.per_head),
         "A": -np.exp(rng.standard_normal((s.d_inner, s.d_state) if k.m1 else (s.n_heads,))),
         "D": rng.standard_normal(k.per_head), "ssm_state": rng.standard_normal(s.ssm_state_shape(1)),
         "hs": np.full(k.hs_shape, np.nan), "sdt": np.full(k.sdt_shape, np.nan), "dlt": np.full((t, k.per_head), np.nan)}
    a = {key: v.astype(np.float32) for key, v in a.items()} | {"y": np.full((t, s.d_inner), np.nan, k.y_dtype)}
    states, pieces = (cpu_kernels(f) for f in P.scan_chunk_kernels(k, False))
    a |= {key: v for key, v in _call(states, k.states_params, a).items() if key in ("hs", "sdt", "dlt")}
    got = _call(pieces, k.pieces_params, a)
    assert k.pieces(t)[1] == (1, 2, 3, 4)[[1, 23, 70, 200].index(t)]
    ref = {key: v.astype(np.float64) for key, v in a.items() if key != "y"}
    kw = {"dbc": ref["dbc"], "dt": ref["dt"]} if k.m1 else {}
    y = P.scan_chunk_reference(k, ref["proj"], ref["xc"], ref["ssm_state"], dt_bias=ref["dt_bias"], A=ref["A"],
                               D=ref["D"], **kw)
    assert _rel(got["y"], y) < (1e-3 if k.y_dtype == "float16" else 1e-5)
    assert _rel(got["ssm_state"], ref["ssm_state"]) < 1e-5


def test_bcdt_norm_and_embed_kernels(cpu_kernels):
    rng = np.random.default_rng(6)
    dbc = rng.standard_normal((9, FALCON.dt_rank + 2 * FALCON.d_state)).astype(np.float32)
    got = _call(cpu_kernels(P.bcdt_norm_kernel(FALCON, False)), ["dbc"], {"dbc": dbc})["dbc"]
    ref = dbc.astype(np.float64)
    P.bcdt_norm_reference(FALCON, ref)
    assert _rel(got, ref) < 1e-6
    E, ids = rng.standard_normal((96, 64)).astype(np.float16), rng.integers(0, 96, 7).astype(np.int32)
    got = _call(cpu_kernels(P.embed_kernel(96, 64, "float16", False)), ["ids", "E", "h"],
                {"ids": ids, "E": E, "h": np.zeros((7, 64), np.float32)})["h"]
    assert np.array_equal(got, E[ids].astype(np.float32))
    q, scale = rng.integers(-127, 128, (96, 64)).astype(np.int8), rng.uniform(0.01, 0.1, 96).astype(np.float32)
    got = _call(cpu_kernels(P.embed_kernel(96, 64, "int8", False)), ["ids", "E", "E_scale", "h"],
                {"ids": ids, "E": q, "E_scale": scale, "h": np.zeros((7, 64), np.float32)})["h"]
    assert np.allclose(got, q[ids] * scale[ids, None], rtol=1e-6)


def test_greedy_kernel_picks_the_first_largest_and_flags_non_finite_rows(cpu_kernels):
    logits = np.random.default_rng(8).standard_normal((6, 1000)).astype(np.float32)
    logits[1, [17, 400, 999]] = 9.0  # a tie: the first index, as numpy.argmax
    logits[2] = -3.5  # all equal: index 0
    logits[3, 5] = np.nan
    logits[4, 999] = np.inf
    logits[5, 0] = -np.inf
    got = _call(cpu_kernels(greedy_kernel(6, 1000, False)), ["logits", "ids"],
                {"logits": logits, "ids": np.zeros(6, np.int32)})["ids"]
    assert got.tolist() == greedy_pick(logits).tolist()
    assert got.tolist()[:3] == [int(np.argmax(logits[0])), 17, 0] and got.tolist()[3:] == [-1, -1, -1]


# ---------------------------------------------------------------------------------------------
# artifacts
# ---------------------------------------------------------------------------------------------
ARTIFACT_KINDS = {"mamba": "fp32", "mamba-untied-bias": "fp32", "falcon": "fp16", "mamba2-g2-tied": "fp32"}


@pytest.fixture(scope="module")
def llvm_artifacts(tmp_path_factory, hf_dirs):
    cache = {}

    def get(kind):
        if kind not in cache:
            ck = load_checkpoint(hf_dirs(kind)[1])
            art = compile_artifact(ck, tmp_path_factory.mktemp("tvm") / f"{kind}.em", "tvm-llvm", ARTIFACT_KINDS[kind],
                                   batches=BATCHES)
            cache[kind] = (ck, art)
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", list(ARTIFACT_KINDS))
def test_llvm_artifact_matches_reference(kind, llvm_artifacts):
    ck, art = llvm_artifacts(kind)
    assert art.manifest["tvm"]["params"] is not None and "weights.bin" in art.manifest["files"]
    assert (art.path / "model.so").stat().st_size < 2 << 20  # weights are parameters, not constants
    ids = random_ids((40,), seed=7)
    full, _ = Reference(ck).forward(ids[None])
    session = Session(art)
    session.prefill_chunk = 13  # several prefill calls carry the state between them
    logits = [session.prefill(ids[:30])] + [session.step([t])[0].copy() for t in ids[30:]]
    rel = 2e-3 if ARTIFACT_KINDS[kind] == "fp16" else 1e-4
    assert_logits_close(np.stack(logits), full[0, 29:], rel=rel)


@pytest.mark.parametrize("kind", ["mamba", "mamba2-g2-tied"])
def test_llvm_batch_beyond_compiled_sizes_and_state_snapshots(kind, llvm_artifacts):
    ck, art = llvm_artifacts(kind)
    ids = random_ids((3, 6), seed=3)  # batch 3 with step_1 and step_2 compiled: chunks of 2 and 1 rows
    full, _ = Reference(ck).forward(ids)
    session = Session(art, batch=3)
    got = np.stack([session.step(ids[:, t]).copy() for t in range(6)], axis=1)
    assert_logits_close(got, full, rel=1e-4)
    # a sequence's state moved to another row continues identically
    state = session.get_state(1)
    session.reset(0)
    session.set_state(state, 0)
    nxt = session.step([5, 5, 5])
    assert np.allclose(nxt[0], nxt[1], atol=1e-6)


@pytest.mark.parametrize("kind", ["mamba", "mamba2-g2-tied"])
def test_greedy_generation_equals_reference(kind, llvm_artifacts):
    # greedy decoding picks each token in the library (greedy_{B}); only the ids come back
    ck, art = llvm_artifacts(kind)
    prompt = random_ids((10,), seed=11)
    expected = Reference(ck).greedy(prompt, 15)
    session = Session(art)
    assert session.backend.can_step_greedy
    assert list(session.generate(prompt, 15, stop=[])) == expected
    # stopped halfway, then continued from the state and the logits left on the device
    session.reset()
    first = list(session.generate(prompt, 6, stop=[]))
    assert first + list(session.generate(None, 9, stop=[])) == expected
    # the library's pick and the host sampler's agree on the same state
    session.reset()
    session.prefill(prompt)
    picked = session.backend.step_greedy(np.array([expected[0]], np.int32))
    assert picked[0] == int(np.argmax(session.backend.logits()[0])) == expected[1]


def test_greedy_batch_generation_equals_reference(llvm_artifacts):
    # 3 sequences over the compiled step_2 and step_1 (chunks of 2 and 1 rows), picked on the device
    ck, art = llvm_artifacts("mamba2-g2-tied")
    prompts = [random_ids((n,), seed=20 + n).tolist() for n in (5, 9, 3)]
    session = Session(art, batch=3)
    assert session.backend.can_step_greedy
    assert session.generate_batch(prompts, 8, stop=[]) == [Reference(ck).greedy(p, 8) for p in prompts]


def test_greedy_generation_refuses_non_finite_logits(llvm_artifacts, monkeypatch):
    ck, art = llvm_artifacts("mamba")
    session = Session(art)
    prompt = random_ids((4,), seed=2)
    step_greedy = session.backend.step_greedy
    # what greedy_{B} returns for logits with a NaN or an infinity (the kernel's own test covers that)
    monkeypatch.setattr(session.backend, "step_greedy", lambda ids: step_greedy(ids) * 0 - 1)
    tokens = session.generate(prompt, 5, stop=[])
    assert next(tokens) == Reference(ck).greedy(prompt, 1)[0]
    with pytest.raises(EdgeMambaError, match="NaN/inf logits"):
        next(tokens)
    assert session.positions[0] == len(prompt) + 1  # the yielded token went through once, not twice


def test_library_loads_with_the_runtime_alone(llvm_artifacts):
    """A fresh process with no `tvm` import: only apache-tvm-ffi and libtvm_runtime.so."""
    ck, art = llvm_artifacts("mamba")
    code = f"""
import sys, numpy as np
sys.path.insert(0, {str(ROOT)!r})
from edgemamba.artifact import load_artifact
from edgemamba.runtimes.tvm import TvmBackend
backend = TvmBackend(load_artifact({str(art.path)!r}), 1)
logits = backend.prefill(np.array([1, 2, 3]), 0)
maps = open("/proc/self/maps").read()
print(int("tvm" in sys.modules), int("libtvm_compiler" in maps), int("libtvm_runtime.so" in maps))
np.save(sys.argv[1], logits)
"""
    out = Path(art.path).parent / "runtime_only.npy"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["0", "0", "1"]
    full, _ = Reference(ck).forward(np.array([[1, 2, 3]]))
    assert_logits_close(np.load(out), full[0, -1], rel=1e-4)


def test_int8_weights_keep_the_trained_demo_model_s_predictions(tmp_path):
    """Weight-only int8 (per-row scales, dequantized in the kernels) on a real trained model: the
    next-token choice over held-out text stays the float32 reference's."""
    from tokenizers import Tokenizer

    demo = ROOT / "edgemamba" / "data" / "demo-mamba"
    ck = load_checkpoint(demo)
    ids = np.array(Tokenizer.from_file(str(demo / "tokenizer.json")).encode(
        (ROOT / "edgemamba" / "data" / "heldout.txt").read_text()[:3000]).ids[:200])
    art = compile_artifact(ck, tmp_path / "int8.em", "tvm-llvm", "int8", batches=(1,))
    assert art.manifest["files"]["weights.bin"]["bytes"] < 0.3 * 4 * ck.spec.n_params
    full, _ = Reference(ck).forward(ids[None])
    session = Session(art)
    got = np.stack([session.prefill(ids[:100])] + [session.step([t])[0].copy() for t in ids[100:]])
    expected = full[0, 99:]
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.97
    assert_logits_close(got, expected, rel=0.03)


def test_weightless_library_takes_weights_packed_elsewhere(tmp_path):
    from edgemamba.kernels.tvm_build import compile_tvm_library
    from edgemamba.checkpoint import Checkpoint
    from edgemamba.runtimes.tvm import TvmBackend, pack_weights

    art = compile_tvm_library(M1, tmp_path / "lib.em", "tvm-llvm", "fp32", batches=(1,))
    assert "weights.bin" not in art.manifest["files"]
    with pytest.raises(EdgeMambaError, match="no weights"):
        TvmBackend(art, 1)
    rng = np.random.default_rng(8)
    weights = {k: (0.1 * rng.standard_normal(shape)).astype(np.float32) for k, shape in M1.weight_shapes().items()}
    backend = TvmBackend(art, 1, weights=pack_weights(M1, weights, "fp32"))
    full, _ = Reference(Checkpoint(M1, weights)).forward(np.array([[3, 1, 4, 1]]))
    assert_logits_close(backend.prefill(np.array([3, 1, 4, 1]), 0), full[0, -1], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# CUDA: code generation and cubin without a GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("spec,arch,precision", [(M2, "sm_87", "fp16"), (M2, "sm_90", "int8"), (FALCON, "sm_90", "fp16")],
                         ids=["mamba2-sm_87-fp16", "mamba2-sm_90-int8", "falcon-sm_90-fp16"])
def test_cuda_library_and_cubin_build_without_a_gpu(spec, arch, precision, tmp_path):
    from edgemamba.kernels.tvm_build import compile_tvm_library

    art = compile_tvm_library(spec, tmp_path / f"{arch}.em", "tvm-cuda", precision, arch=arch, batches=(1,))
    info = art.manifest["tvm"]
    cubin = (art.path / f"kernels.{arch}.cubin").read_bytes()
    assert info["device"] == "cuda" and info["arch"] == arch and list(info["cubins"]) == [f"kernels.{arch}.cubin"]
    assert cubin[:4] == b"\x7fELF"
    e_flags = int.from_bytes(cubin[48:52], "little")
    assert (e_flags >> 8) & 0xFF == int(arch[3:])  # machine code for that SM, not PTX for the driver to compile


@pytest.mark.parametrize("spec,precision,pdl", [(M1, "fp16", None), (M2, "int8", "early"), (FALCON, "fp32", "late")],
                         ids=["mamba1-fp16-default", "mamba2-int8-early", "falcon-fp32-late"])
def test_sm90_step_kernels_launch_early_but_read_only_weights_before_the_wait(spec, precision, pdl):
    """Programmatic dependent launch (sm_90+): a step kernel may start while the previous one still
    writes its inputs, so before `griddepcontrol.wait` it may only prefetch, or load weights (preload);
    parameters other than weights, and weights read before the wait, lose __restrict__ (nvcc would read
    them with non-coherent loads that ptxas moves across the wait); the launch flag goes exactly with
    the wait; prefill kernels and sm_87 are untouched."""
    import re

    from edgemamba.kernels.tvm_build import TARGETS, _coherent_pdl_loads, _cuda_postproc, _cuda_source
    from edgemamba.kernels.tvm_common import DEFAULT_PDL, PDL_CONSTANT_PARAMS, PDL_LAUNCH_TAG, PDL_MODES
    from edgemamba.kernels.tvm_model import build_module, relax_pipeline

    target = TARGETS["tvm-cuda"].make("sm_90")
    mode = PDL_MODES[pdl or DEFAULT_PDL]
    mod = build_module(spec, precision, True, target, (1, 2), pdl=pdl)
    for gv, f in mod.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc):
            flagged = list(f.attrs.get("tirx.kernel_launch_params", [])) == [PDL_LAUNCH_TAG]
            assert flagged == ('griddepcontrol("wait"' in f.script()), gv.name_hint
    with target, _cuda_postproc(_coherent_pdl_loads):
        source = _cuda_source(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline()).mod)

    defs = list(re.finditer(r'^extern "C" __global__ void __launch_bounds__\(\d+\) (\w+)\(([^)]*)\) \{$', source, re.M))

    def layer_kind(name):  # which kernel of a layer (by the fusions in its name); "": lm_head
        for kind, mark in (("in_proj", "_conv_"), ("x_proj", "_store_x0of"), ("out_proj", "_residual"),
                           ("ssm", "ssm_step_")):
            if mark in name:
                return kind
        return ""

    def kernel_mode(name):  # the mode of a step kernel (the embedding: batch 1's), None: no PDL
        batch = re.search(r"_b(\d+)_", name)
        if name.startswith("embed_"):
            return mode.for_batch(1)
        greedy = re.match(r"greedy_(?:part|final)_(\d+)x", name)  # the greedy pick after the step
        if greedy:
            return mode.for_batch(int(greedy.group(1)))
        if not (name.startswith(("gemv_", "ssm_step_")) and batch):
            return None
        m = mode.for_batch(int(batch.group(1)))
        return None if m is None else m.kernel(layer_kind(name))

    step = {m.group(1) for m in defs if kernel_mode(m.group(1)) is not None}
    assert len(step) >= 4 * (1 if mode.for_batch(2) is None else 2) and len(defs) > len(step)
    weights = {f"{p}_ptr" for p in PDL_CONSTANT_PARAMS}
    preloading = fused = 0
    for m, end in zip(defs, [d.start() for d in defs[1:]] + [len(source)]):
        name, params, body = m.group(1), m.group(2), source[m.end() : end]
        if name not in step:  # prefill kernels, and steps of larger batches where the mode leaves them: plain
            assert "griddepcontrol" not in body and "__restrict__" in params, name
            continue
        km = kernel_mode(name)
        assert body.count("griddepcontrol_wait();") == 1 and body.count("launch_dependents();") == 1, name
        names = re.findall(r"(\w+_ptr)\b", params)
        before, after = body.split("griddepcontrol_wait();")
        read_before = set()
        for line in before.splitlines():
            touched = [p for p in names if re.search(rf"\b{p}\b", line)]
            assert not touched or "prefetch" in line or set(touched) <= weights, f"{name}: {line.strip()}"
            read_before |= set() if "prefetch" in line else set(touched)
        restricted = {f"{p}_ptr" for p in re.findall(r"__restrict__ (\w+)_ptr", params)}
        assert restricted <= weights - read_before, name
        kind = "gemv" if name.startswith("gemv_") else "ssm" if name.startswith("ssm_step_") else ""
        # an in_proj with x_proj fused loads its share of x_proj's weights first thing, whatever the mode
        fused_x = re.search(r"_xp\d+_", name) is not None
        assert ("xw_ptr" in read_before) == fused_x, name
        assert bool(read_before - {"xw_ptr"}) == (km.preloads(kind) and kind != ""), name
        preloading += bool(read_before - {"xw_ptr"})
        fused += fused_x
        prefetched = any("prefetch" in line for line in before.splitlines())
        assert prefetched == (km.prefetch and kind != ""), name
        assert ("launch_dependents" in before) == km.early, name
    assert (preloading > 0) == (pdl is None)  # the default preloads; "early" and "late" do not
    # the default fuses x_proj into in_proj (Mamba-1, from the second layer on, not int8)
    assert (fused > 0) == (pdl is None and spec.arch == "mamba1" and precision != "int8")

    mod87 = build_module(spec, precision, True, TARGETS["tvm-cuda"].make("sm_87"), (1,))
    assert "griddepcontrol" not in mod87.script() and "programtic" not in mod87.script()


@pytest.mark.gpu
def test_cuda_artifact_on_the_gpu(tmp_path, hf_dirs):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or shutil.which("nvcc") is None:
        pytest.skip("needs a CUDA GPU and nvcc")
    major, minor = torch.cuda.get_device_capability()
    ck = load_checkpoint(hf_dirs("mamba")[1])
    art = compile_artifact(ck, tmp_path / "cuda.em", "tvm-cuda", "fp32", arch=f"sm_{major}{minor}", batches=(1,))
    ids = random_ids((20,), seed=9)
    full, _ = Reference(ck).forward(ids[None])
    session = Session(art)
    logits = [session.prefill(ids[:12])] + [session.step([t])[0].copy() for t in ids[12:]]
    assert_logits_close(np.stack(logits), full[0, 11:], rel=1e-3)
    session.reset()  # greedy generation: each token picked by the library's CUDA greedy kernel
    assert session.backend.can_step_greedy
    assert list(session.generate(ids[:12], 8, stop=[])) == Reference(ck).greedy(ids[:12], 8)


# ---------------------------------------------------------------------------------------------
# aarch64: cross-compiled library and host program, run under qemu-user
# ---------------------------------------------------------------------------------------------
A64_RUNTIME = os.environ.get("EDGEMAMBA_TVM_AARCH64_RUNTIME")  # folder with aarch64 libtvm_runtime.so, libtvm_ffi.so


@pytest.mark.skipif(not (A64_RUNTIME and shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64")),
                    reason="needs aarch64-linux-gnu-g++, qemu-aarch64 and EDGEMAMBA_TVM_AARCH64_RUNTIME "
                           "(scripts/tvm_aarch64_runtime.sh prepares it)")
def test_aarch64_artifact_under_qemu(tmp_path, hf_dirs):
    import tvm_ffi

    ck = load_checkpoint(hf_dirs("mamba2-g2-tied")[1])
    art = compile_artifact(ck, tmp_path / "a64.em", "tvm-aarch64", "fp32", batches=(1,))
    assert b"\xb7\x00" == (art.path / "model.so").read_bytes()[18:20]  # ELF e_machine: AArch64
    host = tmp_path / "tvm_host"
    include = Path(tvm_ffi.__file__).parent / "include"
    subprocess.run(["aarch64-linux-gnu-g++", "-std=c++17", "-O1", str(ROOT / "edgemamba/runtimes/tvm_host.cc"),
                    f"-I{include}", f"-L{A64_RUNTIME}", "-ltvm_runtime", "-ltvm_ffi", "-o", str(host)], check=True)
    ids = random_ids((12,), seed=4)
    plan = tmp_path / "plan.txt"
    plan.write_text("prefill " + " ".join(map(str, ids[:8])) + "\n" + "".join(f"step {t}\n" for t in ids[8:]))
    sysroot = "/usr/aarch64-linux-gnu"
    subprocess.run(["qemu-aarch64", "-L", sysroot, "-E", f"LD_LIBRARY_PATH={A64_RUNTIME}", str(host), str(art.path),
                    str(plan), str(tmp_path / "out.bin")], check=True, timeout=300)
    got = np.fromfile(tmp_path / "out.bin", np.float32).reshape(5, -1)
    full, _ = Reference(ck).forward(ids[None])
    assert_logits_close(got, full[0, 7:], rel=1e-4)
    assert json.loads((art.path / "manifest.json").read_text())["target"] == "tvm-aarch64"
    assert load_artifact(art.path).target == "tvm-aarch64"


# ---------------------------------------------------------------------------------------------
# devices: the latency prediction counts the kernels the step really launches
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [M1, M2], ids=["mamba1", "mamba2"])
def test_prediction_counts_the_kernels_of_the_tvm_cuda_step(spec):
    from edgemamba.devices.predict import workload
    from edgemamba.kernels.tvm_build import TARGETS
    from edgemamba.kernels.tvm_model import build_module

    from edgemamba.kernels.tvm_model import step_launches

    # the estimate from a spec alone: a library without fusions that need PDL (sm_87, Jetson Orin)
    mod = build_module(spec, "fp16", True, TARGETS["tvm-cuda"].make("sm_87"), (1,))
    launched = mod["step_1"].script().count("R.call_tir")  # call_tir and call_tir_inplace: one kernel each
    assert launched == workload(spec, "tvm-cuda", "fp16").step_launches == step_launches(mod, 1)
    # sm_90: Mamba-1's x_proj runs inside in_proj from the second layer on (what the manifest records)
    mod90 = build_module(spec, "fp16", True, TARGETS["tvm-cuda"].make("sm_90"), (1,))
    fused = spec.n_layer - 1 if spec.arch == "mamba1" else 0
    assert mod90["step_1"].script().count("R.call_tir") == step_launches(mod90, 1) == launched - fused


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
@pytest.mark.parametrize("spec", [M1, M2], ids=["mamba1", "mamba2"])
def test_prediction_counts_the_kernels_of_the_tvm_cuda_prefill(spec, precision):
    from edgemamba.devices.predict import workload
    from edgemamba.kernels.tvm_build import TARGETS
    from edgemamba.kernels.tvm_model import build_module

    mod = build_module(spec, precision, True, TARGETS["tvm-cuda"].make("sm_90"), (1,))
    assert mod["prefill"].script().count("R.call_tir") == workload(spec, "tvm-cuda", precision).chunk_launches


@pytest.mark.parametrize("precision", ["fp16", "fp32", "int8"])
@pytest.mark.parametrize("spec", [M1, M2, FALCON], ids=["mamba1", "mamba2-dt-limit", "falcon"])
def test_probe_names_the_prefill_conv_and_scan_as_the_library_does(spec, precision):
    """`devices --probe --tvm-library` finds a library's conv and scan by name without TVM's compiler:
    the names must be the kernels' own, and the layout the kernels take must be what it passes."""
    import torch
    import tvm_ffi

    from edgemamba.devices.probe import sequential_shape, tvm_prefill_kernel_names, tvm_sequential_kernels
    from edgemamba.kernels.tvm_common import c_name
    from edgemamba.kernels.tvm_model import _Builder, _Layer

    layer = _Layer(_Builder(None, True, None), spec, {"fp16": "float16", "fp32": "float32", "int8": "int8"}[precision],
                   {}, "", None, None)
    conv = P.ConvChunkSpec(spec.in_proj_dim, layer.conv_lo, layer.conv_lo + spec.conv_dim, spec.d_conv,
                           spec.use_conv_bias)
    scan = P.ScanSpec(spec, layer.act if spec.arch == "mamba1" else "float32")  # as tvm_model._prefill_layer
    names = tvm_prefill_kernel_names(spec, precision)
    assert (names["conv"], names["scan"], names["y"]) == (c_name(conv.name()), c_name(scan.name()), scan.y_dtype)

    # the probe's buffers, as it passes them, through the kernels (CPU builds) against the references
    shape, t = sequential_shape(spec), 6
    lib = tvm.compile(tvm.IRModule({f.attrs["global_symbol"]: f for f in (P.conv_chunk_kernel(conv, False),
                                                                          P.scan_kernel(scan, False))}),
                      target=cpu_target())
    g = torch.Generator().manual_seed(0)
    e, n, h = shape["e"], shape["n"], shape["heads"]
    b = {"proj": torch.randn(t, shape["cols"], generator=g), "conv_w": torch.randn(shape["conv"], 4, generator=g),
         "conv_b": torch.randn(shape["conv"], generator=g), "conv_state": torch.randn(shape["conv"], 3, generator=g),
         "ssm_state": torch.randn(e * n, generator=g), "y": torch.empty(t, e, dtype=getattr(torch, names["y"]))}
    if spec.arch == "mamba1":
        b |= {"dbc": torch.randn(t, shape["r"] + 2 * n, generator=g), "dt": torch.randn(t, e, generator=g),
              "dt_bias": torch.randn(e, generator=g), "A": -torch.rand(e * n, generator=g),
              "D": torch.randn(e, generator=g)}
    else:
        b |= {"dt_bias": torch.randn(h, generator=g), "A": -torch.rand(h, generator=g),
              "D": torch.randn(h, generator=g)}
    ref = {k: v.numpy().copy() for k, v in b.items() if v.dtype == torch.float32}
    conv_fn, scan_fn = tvm_sequential_kernels(lib.mod, names, shape, tvm_ffi)
    conv_fn(b, t)
    scan_fn(b, t)
    conv_state = ref["conv_state"].reshape(1, -1, 3)
    P.conv_chunk_reference(conv, ref["proj"], ref["conv_w"], conv_state, ref["conv_b"] if spec.use_conv_bias else None)
    ssm_state = ref["ssm_state"].reshape(spec.ssm_state_shape(1))
    A = ref["A"].reshape(e, n) if spec.arch == "mamba1" else ref["A"]
    kw = {"dbc": ref["dbc"], "dt": ref["dt"]} if spec.arch == "mamba1" else {}
    y = P.scan_reference(scan, ref["proj"], ssm_state, dt_bias=ref["dt_bias"], A=A, D=ref["D"], **kw)
    assert _rel(b["proj"].numpy(), ref["proj"]) < 1e-5 and _rel(b["conv_state"].numpy(), conv_state[0]) < 1e-5
    assert _rel(b["ssm_state"].numpy(), ssm_state.ravel()) < 1e-4
    assert _rel(b["y"].float().numpy(), y.astype(np.float32)) < (2e-3 if names["y"] == "float16" else 1e-4)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_bench_predicts_a_tvm_cuda_artifact_without_a_gpu(tmp_path):
    from click.testing import CliRunner

    from edgemamba.cli import main
    from edgemamba.devices.profiles import get_profile
    from edgemamba.kernels.tvm_build import compile_tvm_library

    compile_tvm_library(M1, tmp_path / "m.em", "tvm-cuda", "fp16", arch="sm_90", batches=(1,))
    r = CliRunner().invoke(main, ["bench", str(tmp_path / "m.em"), "--predict", "h100-sxm-80gb", "--no-measure",
                                  "--json"])
    assert r.exit_code == 0, r.output
    pred = json.loads(r.output)["prediction"]
    cost = get_profile("h100-sxm-80gb").cost("tvm-cuda")
    # the step's kernels as the library records them: 4 in the first Mamba-1 layer, 3 in the others
    # (x_proj fused into in_proj on sm_90), the embedding, the lm_head
    launches = 4 + 3 * (M1.n_layer - 1) + 2
    overhead = launches * cost.launch_s.value + cost.call_s.value
    assert pred["decode_overhead_ms"] == pytest.approx(1e3 * overhead, rel=1e-6)
