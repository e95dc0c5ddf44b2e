"""The native CPU engine (edgemamba/kernels/cpu/emcpu.cc) against independent references.

The oracle is the NumPy reference in float64 on the artifact's effective weights: the matrices read
back from the step graph's initializers, widened from float16 or dequantized with `unpack_nbits`, so
what is left is the engine's own arithmetic. Two checks on every run of ops:
- the whole run against the reference (errors accumulate through the state over ~200 tokens);
- each op from the engine's own state before it, against the reference with the engine's
  documented activation quantization for MatMulNBits weights (emcpu.cc, "Integer dot products"):
  in chunks of up to SMALL_M rows, activations are quantized per weight block, to int16 for 8-bit
  weights and to int8 for 4-bit weights (~1e-2 of the logit scale for int4: the whole-run tolerance
  allows it, this check pins it down); larger chunks run on float32 activations.

x86, through ctypes (`Session(engine="native")`): every config in conftest.KINDS × fp32/fp16/int8/int4
with prefills past the engine's 64-row chunks; native against ONNX Runtime; batch 1..6 steps against
single-sequence runs; the artifacts it refuses. aarch64 (issue 6): tests/native/driver.cc with
emcpu.cc, cross-compiled and run under qemu-aarch64 (the generic C++ loops and __fp16, no AVX2),
and the same driver built for x86 (AVX2 and generic), on cases written from the same artifacts.
"""

import dataclasses
import platform
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import KINDS, random_ids
from onnx import numpy_helper

from edgemamba import EdgeMambaError, Session, load_checkpoint
from edgemamba.artifact import compile_artifact
from edgemamba.passes.pipelines import Recipe
from edgemamba.passes.quantize import unpack_nbits
from edgemamba.reference import Reference, State

ROOT = Path(__file__).resolve().parent.parent
CPU_DIR = ROOT / "edgemamba" / "kernels" / "cpu"
PRECISIONS = ("fp32", "fp16", "int8", "int4")
MAX_ROWS = 64  # rows per engine chunk in the C++ driver's runs (NativeBackend's default: 128)
SMALL_M = 4  # chunks of up to this many rows stream the weights (emcpu.cc kSmallM); larger ones: panel GEMM
# Max abs error / max |logit| (and the same for the final state), whole run against the reference on
# the effective weights: float32 rounding for fp32/fp16; int16 activations (int8); int8 activations
# on 4-bit weights (int4: ~5e-2 measured over 200 tokens, as ONNX Runtime's accuracy_level 4).
REL_RUN = {"fp32": 1e-5, "fp16": 1e-5, "int8": 1e-3, "int4": 1e-1}
# Each op from the engine's own state, against the reference with the same activation rounding. Where
# activations are rounded, a value within float32 rounding of a boundary between two codes can round
# to one code in the engine (float32) and the other in the reference (float64): a few ops in ten
# may then differ by up to REL_RUN.
REL_OP = {"fp32": 1e-5, "fp16": 1e-5, "int8": 1e-4, "int4": 1e-4}
TIES_ALLOWED = {"fp32": 0.0, "fp16": 0.0, "int8": 0.2, "int4": 0.2}
# Activation codes for MatMulNBits weights in the engine's integer dot products (its default):
# int16 for 8-bit weights, int8 for 4-bit weights.
ACT_QMAX = {"q8": 32767.0, "q4": 127.0}
PREFILL, STEP = 1, 2
# emcpu.h's weight formats
EM_NONE, EM_F32_KN, EM_F16_KN, EM_F32_NK, EM_F16_NK, EM_Q8_NK, EM_Q4_NK = range(7)


def native_unavailable() -> str | None:
    from edgemamba.runtimes.native import NativeUnavailable, load_library

    try:
        load_library()
    except NativeUnavailable as e:
        return f"native engine unavailable: {e} (python setup.py build_ext --inplace)"
    return None


needs_native = pytest.mark.skipif(native_unavailable() is not None, reason=str(native_unavailable()))


# ---------------------------------------------------------------------------------------------
# what the artifact stores, read from the step graph's initializers (not through native.py)
# ---------------------------------------------------------------------------------------------
_STORED = re.compile(r"^(?P<base>.+?)(?:\.float16|\.q(?P<bits>[48])b(?P<block>\d+))?$")


@dataclasses.dataclass
class Stored:
    """One matrix as weights.bin holds it, in emcpu.h's terms: `fmt`, K (in), N (out), `block`."""

    fmt: int
    k: int
    n: int
    block: int
    data: np.ndarray
    scales: np.ndarray | None = None

    @property
    def quantized(self) -> bool:
        return self.fmt in (EM_Q8_NK, EM_Q4_NK)

    def dense(self) -> np.ndarray:
        """The float32 matrix this stands for, as the checkpoint holds it: (N out, K in)."""
        if self.quantized:
            bits = 8 if self.fmt == EM_Q8_NK else 4
            return unpack_nbits(self.data, self.scales.reshape(self.n, -1), bits, self.k).T  # (k, n) -> (n, k)
        w = self.data.astype(np.float32)
        return w.T if self.fmt in (EM_F32_KN, EM_F16_KN) else w


def graph_tensors(art) -> dict[str, np.ndarray]:
    model = onnx.load(str(art.file("step")))  # external data from weights.bin
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def stored_matrices(tensors: dict[str, np.ndarray], ck) -> dict[str, Stored]:
    """Checkpoint name (embedding, lm_head, layers.i.in_proj, ...) -> how the artifact stores it."""
    out = {}
    for name, arr in tensors.items():
        m = _STORED.match(name)
        if name.endswith(".scales") or m is None:
            continue
        base = m["base"]
        table = base in ("embedding", "lm_head")  # (N, K); the layers' matrices are stored transposed, (K, N)
        if not table and not base.endswith(".T"):
            continue
        key = base if table else base.removesuffix(".T")
        if key not in ck.weights:
            continue
        n, k = ck.weights[key].shape  # (out, in)
        if m["bits"]:
            fmt = EM_Q8_NK if m["bits"] == "8" else EM_Q4_NK
            out[key] = Stored(fmt, k, n, int(m["block"]), arr, tensors[name + ".scales"])
        else:
            half = arr.dtype == np.float16
            fmt = (EM_F16_NK if half else EM_F32_NK) if table else (EM_F16_KN if half else EM_F32_KN)
            out[key] = Stored(fmt, k, n, 0, arr)
    return out


def effective_checkpoint(ck, stored: dict[str, Stored]):
    out = dataclasses.replace(ck, weights=dict(ck.weights))
    for key, s in stored.items():
        out.weights[key] = s.dense()
        assert out.weights[key].shape == ck.weights[key].shape, key
    return out


def quantize_rows(x: np.ndarray, block: int, qmax: float) -> np.ndarray:
    """x (..., k) rounded as the engine rounds activations: per block of k, symmetric, to ±qmax."""
    *lead, k = x.shape
    nb = -(-k // block)
    xb = np.zeros((*lead, nb * block), x.dtype)
    xb[..., :k] = x
    xb = xb.reshape(*lead, nb, block)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    step = np.where(amax > 0, amax / qmax, 1.0)
    return (np.rint(xb / step) * step).reshape(*lead, nb * block)[..., :k]


class RoundedInput:
    """Stands in for W.T in the reference's `x @ W.T`: rounds x as the engine does, then multiplies."""

    __array_ufunc__ = None  # numpy defers `x @ self` to __rmatmul__

    def __init__(self, w: np.ndarray, s: Stored):
        self.w, self.block, self.qmax = w, s.block, ACT_QMAX["q8" if s.fmt == EM_Q8_NK else "q4"]

    @property
    def T(self):
        return self

    def __rmatmul__(self, x):
        return quantize_rows(x, self.block, self.qmax) @ self.w.T


def rounding_reference(ck_eff, stored: dict[str, Stored]) -> Reference:
    """The reference with the engine's activation rounding before every quantized matrix (decode and
    prefill chunks alike)."""
    ref = Reference(ck_eff, dtype=np.float64)
    for key, s in stored.items():
        if not s.quantized:
            continue
        if key in ("embedding", "lm_head"):
            if key == "lm_head" or ref.spec.tie_embeddings:
                ref.lm_head = RoundedInput(ref.lm_head, s)
        else:
            ref.w[key] = RoundedInput(ref.w[key], s)
    return ref


@dataclasses.dataclass
class Built:
    ck: object
    art: object
    tensors: dict
    stored: dict
    ref: Reference  # float64, on the effective weights
    ref_round: Reference  # ... with the engine's activation rounding


EXPECTED_FORMATS = {"fp32": {EM_F32_KN, EM_F32_NK}, "fp16": {EM_F16_KN, EM_F16_NK},
                    "int8": {EM_Q8_NK}, "int4": {EM_Q4_NK, EM_Q8_NK}}  # int4: 8-bit head and embedding


@pytest.fixture(scope="module")
def built(hf_dirs, tmp_path_factory):
    cache = {}

    def get(kind: str, precision: str) -> Built:
        if (kind, precision) not in cache:
            ck = load_checkpoint(hf_dirs(kind)[1])
            art = compile_artifact(ck, tmp_path_factory.mktemp(f"{kind}-{precision}") / "a.em", precision=precision)
            tensors = graph_tensors(art)
            stored = stored_matrices(tensors, ck)
            matrices = [k for k in ck.weights if k.split(".")[-1] in ("in_proj", "x_proj", "dt_proj", "out_proj",
                                                                      "lm_head", "embedding")]
            assert sorted(stored) == sorted(matrices), "every matrix is read from the artifact"
            assert {s.fmt for s in stored.values()} <= EXPECTED_FORMATS[precision]
            if precision == "int4":
                assert stored["layers.0.in_proj"].fmt == EM_Q4_NK
            eff = effective_checkpoint(ck, stored)
            cache[kind, precision] = Built(ck, art, tensors, stored, Reference(eff, dtype=np.float64),
                                           rounding_reference(eff, stored))
        return cache[kind, precision]

    return get


# ---------------------------------------------------------------------------------------------
# runs: lists of ops (PREFILL, seq, ids) / (STEP, n, ids of sequences 0..n-1)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    logits: list  # per op: (vocab,) for a prefill, (n, vocab) for a step
    states: list  # per op: the state of every sequence after it, [{name: array}] * batch


def session_run(session: Session, ops) -> Run:
    run = Run([], [])
    for kind, arg, ids in ops:
        if kind == PREFILL:
            run.logits.append(session.prefill(ids, seq=arg).copy())
        else:
            assert arg == session.batch, "a Session steps every sequence"
            run.logits.append(session.step(ids).copy())
        run.states.append([session.get_state(s) for s in range(session.batch)])
    return run


def reference_run(ref: Reference, batch: int, ops) -> Run:
    states = [ref.new_state(1) for _ in range(batch)]
    run = Run([], [])
    for kind, arg, ids in ops:
        if kind == PREFILL:
            logits, states[arg] = ref.forward(ids[None], states[arg])
            run.logits.append(logits[0, -1])
        else:
            rows = []
            for s in range(arg):
                logits, states[s] = ref.step(ids[s : s + 1], states[s])
                rows.append(logits[0])
            run.logits.append(np.stack(rows))
        run.states.append([as_dict(st) for st in states])
    return run


def as_dict(state: State) -> dict[str, np.ndarray]:
    """A batch-1 reference state as Session.get_state names it."""
    out = {}
    for i, (conv, ssm) in enumerate(zip(state.conv, state.ssm)):
        out[f"conv_state.{i}"], out[f"ssm_state.{i}"] = conv[0], ssm[0]
    return out


def as_state(b: Built, dicts: list[dict]) -> State:
    """Per-sequence state dicts (engine float32) as one float64 reference State."""
    n = b.ck.spec.n_layer
    return State([np.stack([d[f"conv_state.{i}"] for d in dicts]).astype(np.float64) for i in range(n)],
                 [np.stack([d[f"ssm_state.{i}"] for d in dicts]).reshape(b.ck.spec.ssm_state_shape(len(dicts)))
                  .astype(np.float64) for i in range(n)])


def op_errors(b: Built, batch: int, ops, run: Run) -> list[float]:
    """Each op's logit error, the op run by the rounding reference from the engine's state before it."""
    spec, errs = b.ck.spec, []
    before = [{k: np.zeros(v) for k, v in _state_shapes(spec).items()} for _ in range(batch)]
    for (kind, arg, ids), logits, after in zip(ops, run.logits, run.states, strict=True):
        if kind == PREFILL:
            state = as_state(b, [before[arg]])
            # activations are rounded per row: the engine's chunks (of MAX_ROWS or 128) change nothing
            expected, state = b.ref_round.forward(ids[None], state)
            expected = expected[0, -1]
        else:
            expected, _ = b.ref_round.step(ids, as_state(b, before[:arg]))
        errs.append(relative_error(logits, expected))
        before = after
    return errs


def _state_shapes(spec) -> dict[str, tuple]:
    out = {}
    for i in range(spec.n_layer):
        out[f"conv_state.{i}"], out[f"ssm_state.{i}"] = spec.conv_state_shape(1)[1:], spec.ssm_state_shape(1)[1:]
    return out


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape}, expected {expected.shape}"
    assert np.all(np.isfinite(actual)), "non-finite values"
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def assert_close(actual, expected, rel: float, what: str):
    err = relative_error(actual, expected)
    assert err <= rel, f"{what}: max abs error {err:.3g} of the scale (max |expected|), allowed {rel}"


def assert_states_close(got: dict, expected: dict, rel: float, what: str):
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert_close(np.reshape(got[name], expected[name].shape), expected[name], rel, f"{what}, {name}")


def check_run(b: Built, precision: str, batch: int, ops, run: Run, what: str):
    """The whole run against the reference, then each op against the rounding reference."""
    expected = reference_run(b.ref, batch, ops)
    for j, (a, e) in enumerate(zip(run.logits, expected.logits, strict=True)):
        assert_close(a, e, REL_RUN[precision], f"{what}: op {j} logits (whole run)")
    for s in range(batch):
        assert_states_close(run.states[-1][s], expected.states[-1][s], REL_RUN[precision], f"{what}: final state {s}")
    errs = op_errors(b, batch, ops, run)
    off = [f"op {j}: {e:.2g}" for j, e in enumerate(errs) if e > REL_OP[precision]]
    assert max(errs) <= REL_RUN[precision] and len(off) <= TIES_ALLOWED[precision] * len(errs), (
        f"{what}: ops off the rounding reference by more than {REL_OP[precision]} × the scale: {', '.join(off)}")


def single_ops(seed: int = 3):
    """One sequence: a prefill spanning two engine chunks (128 + 6 rows), one of 3 rows (the small-M
    kernels), one of 129 (128 + 1), then 4 steps."""
    ids = random_ids((270,), seed=seed)
    return [(PREFILL, 0, ids[:134]), (PREFILL, 0, ids[134:137]), (PREFILL, 0, ids[137:266])] + [
        (STEP, 1, ids[j : j + 1]) for j in range(266, 270)]


# ---------------------------------------------------------------------------------------------
# x86 through ctypes
# ---------------------------------------------------------------------------------------------
def _has_avx512() -> bool:
    cpu = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    return all(f in cpu for f in ("avx512f", "avx512vl", "avx512bw", "avx512dq"))


# The engine picks its prefill kernels per CPU (emcpu.cc): AVX-512 where the CPU has it, and AVX2
# where it does not or EDGEMAMBA_NATIVE_ISA=avx2 asks; on an AVX-512 machine both paths are tested.
ISAS = ["avx512", "avx2"]


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_native_matches_reference_on_effective_weights(kind, precision, isa, built, monkeypatch):
    if isa == "avx512" and not _has_avx512():
        pytest.skip("this CPU has no AVX-512 (the AVX2 kernels are tested)")
    if isa == "avx2":
        monkeypatch.setenv("EDGEMAMBA_NATIVE_ISA", "avx2")
    b = built(kind, precision)
    session = Session(b.art, engine="native", threads=2)
    assert session.engine == "native" and session.backend.isa.startswith(isa)
    ops = single_ops()
    check_run(b, precision, 1, ops, session_run(session, ops), f"{kind} {precision}")


@needs_native
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("kind", KINDS)
def test_float_projections_read_as_rows_or_as_stored_match_the_reference(kind, precision, layout, built, monkeypatch):
    """x86: the engine transposes float projections to (N, K) rows in its copy of the weights (the
    decode step's dot products, prefill panels packed by 16x16 transposes); EDGEMAMBA_NATIVE_LAYOUT=kn
    and a mapped weights.bin keep them (K, N) as stored. Both layouts, both ISAs' kernels, on the
    reference; and no RSS: the copy is transposed in place, block by block from the file."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the (N, K) layout is for x86 (aarch64 keeps the stored one)")
    b = built(kind, precision)
    monkeypatch.setenv("EDGEMAMBA_NATIVE_LAYOUT", layout)
    for isa in ISAS if _has_avx512() else ["avx2"]:
        monkeypatch.setenv("EDGEMAMBA_NATIVE_ISA", isa)
        session = Session(b.art, engine="native", threads=2)
        assert session.backend.isa.startswith(isa)
        layers = session.backend._desc[4]
        fmts = {(w.k, w.n): w.fmt for L in layers for w in (L.in_proj, L.x_proj, L.dt_proj, L.out_proj) if w.fmt}
        rows = {EM_F32_NK, EM_F16_NK} if layout == "nk" else {EM_F32_KN, EM_F16_KN}
        assert all((f in rows) == (layout == "kn" or min(k, n) >= 64) for (k, n), f in fmts.items()), fmts
        big = any(min(k, n) >= 64 for k, n in fmts)  # not so in the 48-wide model
        assert any(f in {EM_F32_NK, EM_F16_NK} for f in fmts.values()) == (layout == "nk" and big)
        ops = single_ops(seed=5)
        check_run(b, precision, 1, ops, session_run(session, ops), f"{kind} {precision} {layout} {isa}")


@needs_native
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("kind", KINDS)
def test_native_matches_onnx_runtime(kind, precision, built):
    # The same weights on both engines; for fp16 both multiply float32 activations by the float16
    # weights (ORT's CPU provider computes the graph's float16 MatMuls in float32: measured, the two
    # agree to ~1e-6 of the logit scale, as for fp32).
    b = built(kind, precision)
    ops = single_ops(seed=5)
    ops = ops[:1] + ops[3:]  # a prefill of 134 (two engine chunks), 4 steps
    native = session_run(Session(b.art, engine="native", threads=2), ops)
    ort_session = Session(b.art, engine="ort", threads=2)
    assert ort_session.engine == "ort"
    ort = session_run(ort_session, ops)
    for j, (a, e) in enumerate(zip(native.logits, ort.logits)):
        assert_close(a, e, 1e-5, f"{kind} {precision} native vs ort, op {j}")
    assert_states_close(native.states[-1][0], ort.states[-1][0], 1e-5, f"{kind} {precision} native vs ort state")


@needs_native
@pytest.mark.parametrize("kind,precision", [("mamba", "fp32"), ("mamba2", "fp16"), ("falcon", "int8"),
                                            ("mamba2-g2-tied", "int4")])
def test_batched_steps_equal_single_sequence_runs(kind, precision, built):
    # Steps of up to SMALL_M sequences stream the weights; 5 and 6 go through the packed panel GEMM
    # (integer dot products with VNNI for int8/int4; activations rounded the same way in both).
    b = built(kind, precision)
    n_max, n_steps = 6, 3
    prompts = [random_ids((1 + 4 * s,), seed=10 + s) for s in range(n_max)]  # 1 .. 21 tokens
    steps = random_ids((n_steps, n_max), seed=20)
    alone = []
    for s in range(n_max):
        ops = [(PREFILL, 0, prompts[s])] + [(STEP, 1, steps[j, s : s + 1]) for j in range(n_steps)]
        run = session_run(Session(b.art, engine="native", threads=2), ops)
        alone.append((np.stack([x[0] for x in run.logits[1:]]), run.states[-1][0]))
    for batch in range(1, n_max + 1):
        session = Session(b.art, batch=batch, engine="native", threads=2)
        ops = [(PREFILL, s, prompts[s]) for s in range(batch)]
        ops += [(STEP, batch, steps[j, :batch]) for j in range(n_steps)]
        run = session_run(session, ops)
        check_run(b, precision, batch, ops, run, f"{kind} {precision} batch {batch}")
        rel = REL_OP[precision]
        for s in range(batch):
            what = f"{kind} {precision} batch {batch} row {s} vs alone"
            assert_close(np.stack([x[s] for x in run.logits[batch:]]), alone[s][0], rel, what)
            assert_states_close(run.states[-1][s], alone[s][1], rel, what + " state")


@needs_native
def test_unsupported_artifacts_refuse_native_and_fall_back_with_a_reason(hf_dirs, tmp_path):
    ck = load_checkpoint(hf_dirs("mamba")[1])
    cases = [
        (compile_artifact(ck, tmp_path / "w8a8.em", precision="w8a8", calib_ids=random_ids((64,), seed=7)),
         "w8a8 is not run natively"),
        (compile_artifact(ck, tmp_path / "h.em", precision="fp32", recipe=Recipe(state_dtype="float16")),
         "state dtype"),
    ]
    ids = random_ids((5,), seed=8)
    for art, reason in cases:
        with pytest.raises(EdgeMambaError, match="native CPU engine cannot run this artifact") as err:
            Session(art, engine="native")
        assert reason in str(err.value) and "\n" not in str(err.value)
        auto = Session(art, engine="auto")
        assert auto.engine == "ort" and reason in auto.backend.fallback_reason
        np.testing.assert_array_equal(auto.prefill(ids), Session(art, engine="ort").prefill(ids))
    with pytest.raises(EdgeMambaError, match="unknown engine 'cuda'"):
        Session(cases[1][0], engine="cuda")


# ---------------------------------------------------------------------------------------------
# the C++ driver: x86 (AVX2 and generic) and aarch64 under qemu-user
# ---------------------------------------------------------------------------------------------
FLAGS = ["-O3", "-std=c++17", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-pthread"]
DRIVER_THREADS = 2


def _x86_reason(avx2: bool) -> str | None:
    if os.uname().machine != "x86_64" or not shutil.which("g++"):
        return "needs an x86-64 host with g++"
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if avx2 and not all(f in cpu.split() for f in ("avx2", "fma", "f16c")):
        return "this CPU lacks AVX2/FMA/F16C"
    return None


BUILDS = {  # name -> (compiler, extra flags, runner prefix, expected em_isa(), why it cannot run here)
    "x86-avx2": ("g++", ["-mavx2", "-mfma", "-mf16c"], [], "avx2", _x86_reason(True)),  # setup.py's flags
    "x86-generic": ("g++", [], [], "generic", _x86_reason(False)),
    "aarch64-qemu": ("aarch64-linux-gnu-g++", ["-static"], ["qemu-aarch64"], "generic",
                     None if shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64") else
                     "needs aarch64-linux-gnu-g++ and qemu-aarch64 (apt-get install g++-aarch64-linux-gnu qemu-user)"),
}


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """build name -> the driver built for it (once per module)."""
    made = {}

    def get(name: str) -> Path:
        compiler, extra, _, _, why_not = BUILDS[name]
        if why_not:
            pytest.skip(why_not)
        if name not in made:
            exe = tmp_path_factory.mktemp("driver") / f"driver-{name}"
            cmd = [compiler, *FLAGS, *extra, f"-I{CPU_DIR}", str(CPU_DIR / "emcpu.cc"),
                   str(ROOT / "tests" / "native" / "driver.cc"), "-o", str(exe)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}"
            made[name] = exe
        return made[name]

    return get


def engine_config(spec) -> tuple[list[int], list[float]]:
    """em_config's fields, in emcpu.h's order."""
    lo, hi = spec.dt_limit
    ints = [1 if spec.arch == "mamba1" else 2, spec.d_model, spec.n_layer, spec.vocab_size, spec.d_inner, spec.d_state,
            spec.d_conv, spec.dt_rank, spec.n_heads, spec.head_dim, spec.n_groups, int(spec.norm_before_gate)]
    return ints, [spec.norm_eps, lo, hi, spec.bcdt_rms_eps or 0.0]  # hi may be inf: the engine clamps to it


def engine_vectors(b: Built) -> dict[str, np.ndarray]:
    """The float32 vectors the engine reads, from the artifact (A folded at export; Mamba-2's D per
    channel, as emcpu.h wants it, whether the graph holds it per head or per channel)."""
    s, t = b.ck.spec, b.tensors
    out = {"norm_f": t["norm_f"]}
    for i in range(s.n_layer):
        p = f"layers.{i}."
        for name in ("norm", "conv_weight", "conv_bias", "in_proj_bias", "out_proj_bias", "dt_bias", "A", "D",
                     "gate_norm"):
            if p + name in t:
                out[p + name] = t[p + name].reshape(-1)
        if s.arch == "mamba2" and out[p + "D"].size == s.n_heads:
            out[p + "D"] = np.repeat(out[p + "D"], s.head_dim)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def write_case(path: Path, b: Built, batch: int, ops) -> None:
    """The case file tests/native/driver.cc reads (its header describes the format)."""
    ints, floats = engine_config(b.ck.spec)
    buf = bytearray(b"EMCASE1\n")
    buf += struct.pack("<12i4f3i", *ints, *floats, DRIVER_THREADS, MAX_ROWS, batch)
    stored = dict(b.stored)
    if b.ck.spec.tie_embeddings:
        stored["lm_head"] = stored["embedding"]
    entries = [(k, s.fmt, s.k, s.n, s.block, s.data, s.scales) for k, s in stored.items()]
    entries += [(k, EM_NONE, v.size, v.size, 0, v, None) for k, v in engine_vectors(b).items()]
    buf += struct.pack("<i", len(entries))
    for name, fmt, k, n, block, data, scales in entries:
        raw = np.ascontiguousarray(data).tobytes()
        buf += struct.pack("<i", len(name)) + name.encode() + struct.pack("<4iq", fmt, k, n, block, len(raw)) + raw
        sc = b"" if scales is None else np.ascontiguousarray(scales, np.float32).tobytes()
        buf += struct.pack("<q", len(sc) // 4) + sc
    buf += struct.pack("<i", len(ops))
    for kind, arg, ids in ops:
        buf += struct.pack("<3i", kind, arg, len(ids)) + np.asarray(ids, "<i8").tobytes()
    path.write_bytes(bytes(buf))


def read_output(path: Path, spec, batch: int, ops) -> Run:
    data = np.fromfile(path, np.float32)
    run, at = Run([], []), 0

    def take(shape):
        nonlocal at
        size = int(np.prod(shape))
        assert at + size <= data.size, "the driver wrote too little"
        at += size
        return data[at - size : at].reshape(shape)

    for kind, arg, _ in ops:
        run.logits.append(take((spec.vocab_size,)) if kind == PREFILL else take((arg, spec.vocab_size)))
        states = [{} for _ in range(batch)]
        for i in range(spec.n_layer):
            for name, shape in ((f"conv_state.{i}", spec.conv_state_shape(batch)),
                                (f"ssm_state.{i}", spec.ssm_state_shape(batch))):
                arr = take(shape)
                for s in range(batch):
                    states[s][name] = arr[s]
        run.states.append(states)
    assert at == data.size, f"the driver wrote {data.size} floats, expected {at}"
    return run


def driver_ops(seed: int = 6):
    """Six sequences: prefills of 70 tokens (64 + 6 rows), of 1..4 (each small-M kernel) and of 9
    (a 6-row tile and 3 rows), then steps of all six (the panel GEMM), of 3 and of 1 (streamed)."""
    lengths, steps = [70, 1, 2, 3, 4, 9], [6, 6, 3, 1]
    ids = random_ids((sum(lengths) + sum(steps),), seed=seed)
    ops, at = [], 0
    for s, n in enumerate(lengths):
        ops.append((PREFILL, s, ids[at : at + n]))
        at += n
    for n in steps:
        ops.append((STEP, n, ids[at : at + n]))
        at += n
    return ops


def run_driver(target: str, exe: Path, tmp_path: Path, b: Built, batch: int, ops) -> Run:
    case, out = tmp_path / "case.bin", tmp_path / "out.bin"
    write_case(case, b, batch, ops)
    done = subprocess.run([*BUILDS[target][2], str(exe), str(case), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"driver failed ({done.returncode}): {done.stderr[-2000:]}"
    assert done.stdout.strip() == f"isa={BUILDS[target][3]}"
    return read_output(out, b.ck.spec, batch, ops)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", ["mamba-untied-bias", "mamba2-g2-tied"])
@pytest.mark.parametrize("target", list(BUILDS))
def test_driver_matches_reference(target, kind, precision, built, driver, tmp_path):
    exe = driver(target)
    b = built(kind, precision)
    ops = driver_ops()
    check_run(b, precision, 6, ops, run_driver(target, exe, tmp_path, b, 6, ops), f"{target} {kind} {precision}")


@needs_native
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_x86_driver_matches_the_ctypes_engine(precision, built, driver, tmp_path, monkeypatch):
    # The driver's own reading of the case (config, formats, pointers) against native.py's reading of
    # the artifact: the same build flags and thread count, so the same arithmetic. The driver reads the
    # projections as stored, (K, N): native.py too, here.
    monkeypatch.setenv("EDGEMAMBA_NATIVE_LAYOUT", "kn")
    exe = driver("x86-avx2")
    b = built("mamba2-g2-tied", precision)
    ops = [op for op in driver_ops() if op[0] == PREFILL or op[1] == 6]  # a Session steps every sequence
    got = run_driver("x86-avx2", exe, tmp_path, b, 6, ops)
    expected = session_run(Session(b.art, batch=6, engine="native", threads=DRIVER_THREADS), ops)
    for j, (a, e) in enumerate(zip(got.logits, expected.logits, strict=True)):
        assert_close(a, e, 1e-6, f"driver vs ctypes {precision}, op {j}")
    for s in range(6):
        assert_states_close(got.states[-1][s], expected.states[-1][s], 1e-6, f"driver vs ctypes {precision} state {s}")


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler here: pip install could not build the engine")
def test_the_engine_was_built_and_is_the_default(tmp_path, hf_dirs):
    # Where a compiler exists, `pip install` must have built the engine, and ort-cpu artifacts must
    # run on it by default: a failed optional build would otherwise fall back to ONNX Runtime silently.
    assert native_unavailable() is None, native_unavailable()
    art = compile_artifact(load_checkpoint(hf_dirs("mamba")[1]), tmp_path / "a.em")
    assert Session(art).engine == "native"


@needs_native
def test_weights_copied_to_huge_pages_or_mapped_give_the_same_run(built, monkeypatch):
    # The default copies weights.bin into memory that asks for 2 MiB pages; EDGEMAMBA_NATIVE_WEIGHTS=map
    # maps the file. Same bytes, so the same logits and states, bit for bit.
    b = built("mamba2", "int8")
    ops = single_ops(seed=9)
    copied = Session(b.art, engine="native", threads=2)
    assert copied.backend._weights.base is not None and not copied.backend._weights.flags.writeable
    run_copied = session_run(copied, ops)
    monkeypatch.setenv("EDGEMAMBA_NATIVE_WEIGHTS", "map")
    mapped = Session(b.art, engine="native", threads=2)
    assert isinstance(mapped.backend._weights, np.memmap)
    run_mapped = session_run(mapped, ops)
    for a, e in zip(run_copied.logits, run_mapped.logits, strict=True):
        np.testing.assert_array_equal(a, e)


@needs_native
@pytest.mark.parametrize("damage", [
    lambda ix: ix["linear"].update({"layers.0.in_proj.T": ["a", "list"]}),
    lambda ix: next(iter(ix["tensors"].values())).update(offset="12"),
    lambda ix: next(iter(ix["tensors"].values())).update(bytes=1 << 40),
    lambda ix: ix.update(act_bits={"x": "sixteen"}),
])
def test_damaged_weights_index_is_one_clear_error(damage, tmp_path, hf_dirs):
    # The manifest's weights_index tells the engine where to point into weights.bin: a damaged one
    # must be refused with one line naming it, never reach the C++ side.
    import json

    art = compile_artifact(load_checkpoint(hf_dirs("mamba")[1]), tmp_path / "a.em")
    manifest = json.loads((art.path / "manifest.json").read_text())
    damage(manifest["weights_index"])
    (art.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgeMambaError, match="weights_index"):
        Session(art.path, engine="native")
