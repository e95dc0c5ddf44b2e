"""Helpers shared by the TVM TIR kernels (`tvm_gemv`, `tvm_ssm`, `tvm_prefill`)."""

import re
from dataclasses import dataclass, replace

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T


# Buffers the runtime passes as views of rows of its (batch, ...) arrays: the state, ids and logits.
# Such a view need not start on the 64-byte boundary TVM otherwise assumes (and its CPU code relies
# on), and on a GPU it carries a byte offset: float alignment and any element offset are accepted.
ROW_VIEW = {"align": 4, "offset_factor": 1}

# Warp shuffles name every lane: each kernel has all 32 lanes reach its shuffles (guards only on
# stores), and __activemask() would not wait for lanes still diverged.
FULL_MASK = tirx.const(0xFFFFFFFF, "uint32")


def exp_expr(x, fast: bool = False):
    """exp(x). fast: Cephes' expf as plain arithmetic (range reduction, degree-6 polynomial, 2^n
    by building the float's bits), within 2 ulp for |x| < 88; for CPU kernels, where LLVM has no
    vector exp and calls libm's expf once per element."""
    if not fast:
        return tirx.exp(x)
    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    x = tirx.max(tirx.min(x, f32(88.3762626647949)), f32(-88.3762626647949))
    n = tirx.floor(x * f32(1.44269504088896341) + f32(0.5))
    r = x - n * f32(0.693359375) + n * f32(2.12194440e-4)  # x - n·ln 2, in two parts
    p = f32(1.9875691500e-4)
    for coef in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + f32(coef)
    p = p * r * r + r + f32(1.0)
    two_n = tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", n) + 127, 23))
    return p * two_n


def silu_expr(x, fast: bool = False):
    """x·sigmoid(x) as x / (1 + exp(-x)): exp overflows to inf for very negative x, giving -0, not NaN."""
    return x / (tirx.const(1.0, "float32") + exp_expr(-x, fast))


def softplus_expr(x, fast: bool = False):
    """softplus with the usual guard: x itself above 20 (DESIGN.md numerics)."""
    return tirx.Select(x > tirx.const(20.0, "float32"), x,
                       tirx.log1p(exp_expr(tirx.min(x, tirx.const(20.0, "float32")), fast)))


def clip_dt_expr(dt, dt_limit: tuple[float, float]):
    lo, hi = dt_limit
    if lo > 0.0:
        dt = tirx.max(dt, tirx.const(lo, "float32"))
    if np.isfinite(hi):
        dt = tirx.min(dt, tirx.const(hi, "float32"))
    return dt


def rsum(terms):
    """Sum of a non-empty list of PrimExprs, left to right."""
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def lane_reduce(lanes: int):
    """Macro: sum buf[w, 0] over groups of `lanes` consecutive threads; lane 0 ends with it."""

    @T.macro
    def reduce(buf, w):
        if lanes > 1:
            for i in T.unroll(int(np.log2(lanes))):
                buf[w, 0] = buf[w, 0] + T.tvm_warp_shuffle_down(FULL_MASK, buf[w, 0], (lanes // 2) >> i, lanes, 32)

    return reduce


def lane_allreduce(lanes: int):
    """Macro: sum buf[w, 0] over groups of `lanes` consecutive threads; every lane ends with it."""

    @T.macro
    def reduce(buf, w):
        if lanes > 1:
            for i in T.unroll(int(np.log2(lanes))):
                buf[w, 0] = buf[w, 0] + T.tvm_warp_shuffle_xor(FULL_MASK, buf[w, 0], (lanes // 2) >> i, lanes, 32)

    return reduce


# Programmatic dependent launch (PDL; Hopper, sm_90 and newer). A decode step is a chain of ~100
# short kernels, each waiting for the one before. A step kernel launched with this flag (TVM's own
# spelling of the launch tag) may start while the previous kernel still runs: once every block of
# that kernel has called `griddepcontrol.launch_dependents` (or exited), this one's blocks are
# scheduled, may prefetch their weights into L2, and wait (`griddepcontrol.wait`) until the previous
# kernel has finished and its writes are visible before reading anything else. A CUDA graph
# captured from such launches keeps these programmatic edges. The wait is a no-op where no
# dependency was relaxed (plain launches after a copy, or kernels launched without the flag), so
# the kernels stay correct however they are launched.
PDL_LAUNCH_TAG = "tirx.use_programtic_dependent_launch"


@dataclass(frozen=True)
class Pdl:
    """How a decode-step kernel takes part in programmatic dependent launch."""

    trigger: str = "late"  # "early": the next kernel may launch once all this kernel's blocks run;
    # "late": once they have issued all their loads (GEMVs: after the main loop; others: at the end)
    prefetch: bool = True  # before the wait, the kernel's weights (and state) into L2
    max_batch: int | None = None  # the steps of at most this many sequences (None: all) ...
    beyond: "Pdl | None" = None  # ... and of more: this mode (None: no PDL)
    preload: str = ""  # before the wait, weights into registers (loads that nothing in a step can make
    # stale): "gemv" (a warp's first sweeps of W and its epilogue's weights), "ssm" (the state update's
    # parameters), "all"; "": none
    # Per kernel of a layer ("in_proj", "x_proj", "ssm", "out_proj"): those that trigger early whatever
    # `trigger` says, and those that prefetch whatever `prefetch` says. x_proj and the state update
    # leave the memory idle; triggering early, they let out_proj launch while they run and bring its
    # weights into L2 meanwhile, and the state update, launched while x_proj runs, its state.
    early_kinds: tuple = ()
    prefetch_kinds: tuple = ()
    # A GEMV's prefetch brings at most about this many bytes of W into L2, every D-th row (D =
    # ceil(bytes of W / budget)): the prefetch shares the memory with the loads of the kernels still
    # running (x_proj, the state update), which the next kernels wait for. mamba-1.4b's out_proj
    # (16.8 MB) on an H100, all of it / every 2nd / 3rd / 4th / 6th row: 1.310 / 1.252 / 1.233 /
    # 1.239 / 1.250 ms a step; with half of their out_proj's 2.4 MB, mamba-130m lost 5% and
    # mamba2-130m 1%.
    prefetch_budget: int = 6 << 20
    # Mamba-1 from its second layer on: x_proj inside in_proj's kernel (GemvSpec.xproj: each block
    # of conv rows adds its share in fixed point, exact), the state update reading the sums; a layer
    # is then 3 kernels, and x_proj's wait-load-reduce no longer sits between in_proj and the state
    # update (on an H100 at batch 1, 2.9 µs of a mamba-1.4b layer's 23.5)
    fuse_x_proj: bool = False

    def preloads(self, kind: str) -> bool:
        return self.preload in (kind, "all")

    def kernel(self, kind: str) -> "Pdl":
        """This mode for one kernel of a layer."""
        return replace(self, trigger="early" if kind in self.early_kinds else self.trigger,
                       prefetch=self.prefetch or kind in self.prefetch_kinds)

    def for_batch(self, batch: int) -> "Pdl | None":
        return self if self.max_batch is None or batch <= self.max_batch else self.beyond

    @property
    def early(self) -> bool:
        return self.trigger == "early"

    @property
    def late(self) -> bool:
        return self.trigger == "late"


PDL_MODES = {"off": None, "late": Pdl("late"), "late-noprefetch": Pdl("late", False), "early": Pdl("early"),
             "early-noprefetch": Pdl("early", False), "late-noprefetch-b1": Pdl("late", False, max_batch=1),
             "late-preload-b1": Pdl("late", False, max_batch=1, preload="all"),
             "late-preload-gemv-b1": Pdl("late", False, max_batch=1, preload="gemv"),
             "late-preload-ssm-b1": Pdl("late", False, max_batch=1, preload="ssm"),
             "late-preload-ssm": Pdl("late", False, preload="ssm"),
             "late-preload": Pdl("late", False, max_batch=1, preload="ssm", beyond=Pdl("late", False, preload="all")),
             "overlap": Pdl("late", False, max_batch=1, preload="ssm", early_kinds=("x_proj", "ssm"),
                            prefetch_kinds=("out_proj", "ssm"), beyond=Pdl("late", False, preload="all"))}
PDL_MODES["overlap-fx"] = replace(PDL_MODES["overlap"], fuse_x_proj=True)  # "overlap" with x_proj fused
# Where the target has it (`supports_pdl`). Measured on an H100 (benchmarks/RESULTS.md, TVM section):
# at batch 1, "late-noprefetch" was 9% and 7% faster than "off" on mamba-130m and mamba2-130m and
# level on mamba-1.4b; at batch 8 every mode was slower than "off" on mamba-1.4b (+8% or more), and
# the prefetching and early modes lost elsewhere (L2 traffic for kernels not yet running). Preloading
# into registers instead (2026-11-23): the state update's parameters gained at batch 1 on all three
# models (-2 to -7%), the GEMVs' first sweeps of W lost on the 130m shapes (+3 to +8%); at batch 8 PDL
# with both preloads gained (-8 to -17%, where PDL alone had lost). "overlap" over "late-preload" at
# batch 1, out_proj's prefetch alone: -0.6% (mamba-1.4b), -1% to -8% (mamba-130m, whose late-preload
# step is bimodal), -6.5% (mamba2-130m); the same at batch 8: -6%, +1.3%, -0.6% (not taken); the state
# update's state prefetch on top: -8% (mamba-130m), -3.5% (mamba-1.4b; +3.4% while it also prefetched
# the parameters it preloads), -3.6% (mamba2-130m); x_proj prefetching its weights: within 0.6%.
# Also measured: out_proj triggering early too, with in_proj prefetching (+4% on mamba-1.4b: 33 MB
# into the 50 MB L2), in_proj triggering early (+11% on mamba-1.4b), and in_proj (and x_proj)
# preloading their first sweeps of W (+2.6% to +4%).
# "overlap-fx" over "overlap" (x_proj fused into in_proj; A/B at batch 1, two rounds each): mamba-1.4b
# -4.5% (1.204 -> 1.150 ms), mamba-130m -4.1%, with the sums spread over XACC_REPLICAS = 4 copies
# (16: -1.1% and +3%; 8: -3.9% on mamba-1.4b; 2: -3.8%; one copy: +10%, every block adding into the
# same 160 words).
DEFAULT_PDL = "overlap-fx"

# Parameters of the step kernels that nothing in a step writes: the weights. They keep __restrict__
# in PDL kernels (see `with_pdl`) unless the kernel reads them before its wait (preload); every other
# parameter loses it (`tvm_build._coherent_pdl_loads`).
PDL_CONSTANT_PARAMS = frozenset({"W", "w_scale", "norm_w", "bias", "conv_w", "conv_b", "dt_w", "dt_bias", "A", "D",
                                 "E", "E_scale", "xw"})


def supports_pdl(target) -> bool:
    """True for CUDA targets of compute capability 9.0 and above (griddepcontrol exists there)."""
    if target is None or target.kind.name != "cuda":
        return False
    m = re.fullmatch(r"sm_(\d+)[a-z]?", str(target.attrs.get("arch", "")))
    return m is not None and int(m.group(1)) >= 90


def pdl_for(target, mode: str | None) -> Pdl | None:
    """The PDL mode (a key of PDL_MODES) for a target; None: DEFAULT_PDL where the target has it."""
    from edgemamba.errors import EdgeMambaError

    if mode is None:
        mode = DEFAULT_PDL if supports_pdl(target) else "off"
    if mode not in PDL_MODES:
        raise EdgeMambaError(f"unknown PDL mode {mode!r}; known: {', '.join(PDL_MODES)}")
    if PDL_MODES[mode] is not None and not supports_pdl(target):
        raise EdgeMambaError(f"PDL mode {mode!r} needs a CUDA target of sm_90 or newer")
    return PDL_MODES[mode]


def pdl_marks(pdl: "Pdl | None"):
    """Macros (head, tail) for a step kernel that reads nothing but its inputs: head at the start
    of its thread body (early trigger, then the wait), tail at the end (late trigger)."""
    early, late = pdl is not None and pdl.early, pdl is not None and pdl.late

    @T.macro
    def head():
        if early:
            T.evaluate(T.ptx.griddepcontrol.launch_dependents())
        if pdl is not None:
            T.evaluate(T.ptx.griddepcontrol.wait())

    @T.macro
    def tail():
        if late:
            T.evaluate(T.ptx.griddepcontrol.launch_dependents())

    return head, tail


def with_pdl(func: tirx.PrimFunc, pdl: "Pdl | None") -> tirx.PrimFunc:
    """The kernel launched with programmatic dependent launch (TVM adds the thread tags itself).
    Only for kernels whose body waits (`griddepcontrol.wait`) before reading anything but weights,
    and prefetches nothing but into L2.

    In such a kernel, only the weights' parameters may keep `__restrict__` (the build strips the
    others from the CUDA source: `tvm_build._coherent_pdl_loads`): nvcc reads a restrict-qualified
    input the kernel never writes with non-coherent loads (`ld.global.nc`, data promised constant
    for the kernel's whole life), and ptxas moves such loads above the wait (seen: Mamba-2's dt read
    from `proj` before `griddepcontrol.wait`), reading what the previous kernel has not written yet."""
    return func if pdl is None else func.with_attr("tirx.kernel_launch_params", [PDL_LAUNCH_TAG])


def cpu_workers(items: int, max_workers: int = 64) -> tuple[int, int]:
    """(workers, items per worker) for a CPU kernel's parallel loop. Scratch a work item needs is
    allocated once per call, a 64-byte row per worker, outside the parallel loop: TVM turns an
    allocation inside a parallel loop into a heap call (TVMBackendAllocWorkspace) per iteration."""
    workers = min(items, max_workers)
    return workers, (items + workers - 1) // workers


def padded(n: int, quantum: int = 16) -> int:
    """n rounded up to whole 64-byte rows of float32: scratch rows of neighbouring workers never
    share a cache line."""
    return (n + quantum - 1) // quantum * quantum


def vector_width(dtype: str, k: int, nbytes: int = 16) -> int:
    """Elements per load of `nbytes` bytes of `dtype`, halved until it divides k."""
    vec = max(1, nbytes // np.dtype(dtype).itemsize)
    while k % vec:
        vec //= 2
    return vec


def c_name(name: str) -> str:
    """A kernel name usable as a C identifier (CUDA source and object symbols)."""
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def drop_unused_params(func: tirx.PrimFunc, names: list[str], symbol: str) -> tirx.PrimFunc:
    """The kernel with only the parameters its body reads or writes, named `symbol`.

    Kernels are written once with every optional input; a static Python flag removes the uses of
    the ones a variant lacks, and this removes their parameters. `names` is what must remain, in
    order: a mismatch means the flags and the kernel body disagree."""
    used = tirx.analysis.undefined_vars(func.body, [])
    keep = [p for p in func.params if any(p.same_as(u) for u in used)]
    kept = [p.name for p in keep]
    assert kept == names, f"{symbol}: kernel uses {kept}, its spec says {names}"
    return tirx.PrimFunc(keep, func.body, func.ret_type, func.attrs).with_attr("global_symbol", c_name(symbol))


def cpu_target(triple: str | None = None) -> tvm.target.Target:
    """This machine's CPU (its own instruction set extensions), or a cross target by triple."""
    if triple is None:
        from tvm.target import codegen

        return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    return tvm.target.Target({"kind": "llvm", "mtriple": triple})
