#!/usr/bin/env python3
"""edgemamba (`ort-cpu`) against llama.cpp on this CPU, side by side in one run (issue 6).

Both peers run the same checkpoints at matching precisions (f32/fp32, f16/fp16, Q8_0/int8,
Q4_0/int4), on 1 and 2 threads, interleaved (llama.cpp, edgemamba, llama.cpp, edgemamba, ...) so
that load from other processes on this shared machine hits both alike. Figures: decode ms/token,
prefill tokens/s for 16- and 512-token prompts, peak RSS (both read from `/usr/bin/time -v`), the
ratios edgemamba / llama.cpp and the issue's bars (decode <= 0.8x, prefill-512 >= 1.5x, RSS <= 1x).
Then the flat-latency check: edgemamba's decode p50 at context 32,768 against context 64.

Everything it builds is cached under `benchmarks/.cache/` (git-ignored) and reused:
  llamacpp/   the `llama-cpp-python` sdist, its vendored llama.cpp source and a CMake build
  models/     random-weight HF checkpoints built with transformers
  gguf/       GGUF conversions (f32, f16) and quantizations (Q8_0, Q4_0)
  edgemamba/  edgemamba artifacts, rebuilt when the edgemamba source changes
  runs/       the raw figures of every run, as JSON
An edgemamba precision that `edgemamba compile` refuses is reported as "not available yet";
rerunning the script once it exists measures it with no change here.

The table, with the exact command, replaces the block between this script's markers in
`benchmarks/RESULTS.md` (text around the markers is left alone).

Examples:
    python benchmarks/cpu_vs_llamacpp.py                       # everything, ~30-45 min on 2 cores
    python benchmarks/cpu_vs_llamacpp.py --models mamba-130m --threads 2 --rounds 1 --no-context-check --no-write
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cpu_vs_transformers import PAIRED_FLAT  # two Sessions of one process stepped alternately (this directory)

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "benchmarks" / ".cache"
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
SECTION = "## CPU: edgemamba vs llama.cpp (issue 6)"
BEGIN = "<!-- cpu_vs_llamacpp.py: begin generated block -->"
END = "<!-- cpu_vs_llamacpp.py: end generated block -->"

LLAMA_CPP_PYTHON = "0.3.36"
# CPU-only Release build of the tools this benchmark uses; GGML_NATIVE tunes for this CPU, as a
# user building llama.cpp on their own machine gets by default.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
)
LLAMA_TARGETS = ("llama-bench", "llama-quantize")

# The issue's bars, binding for the 130m shapes on 2 threads.
DECODE_BAR = 0.8  # edgemamba ms/token <= 0.8 x llama.cpp's
PREFILL_BAR = 1.5  # edgemamba tokens/s (512-token prompt) >= 1.5 x llama.cpp's
RSS_BAR = 1.0  # edgemamba peak RSS <= llama.cpp's
FLAT_BAR = 0.05  # p50 at 32,768 within 5% of p50 at 64
BINDING_THREADS = 2


@dataclass(frozen=True)
class Precision:
    edgemamba: str  # `edgemamba compile --precision`
    gguf: str  # llama.cpp type name
    convert: bool  # made by convert_hf_to_gguf.py (else by llama-quantize from the f32 file)


PRECISIONS = (
    Precision("fp32", "f32", True),
    Precision("fp16", "f16", True),
    Precision("int8", "Q8_0", False),
    Precision("int4", "Q4_0", False),
)


@dataclass(frozen=True)
class Model:
    name: str
    what: str
    binding: bool  # the issue's bars apply to it
    config_class: str = ""  # transformers config/model for a random-weight checkpoint
    model_class: str = ""
    config: dict = field(default_factory=dict)
    path: Path | None = None  # an existing checkpoint instead

    def checkpoint(self) -> Path:
        return self.path if self.path is not None else CACHE / "models" / self.name


MODELS = (
    Model("mamba-130m", "Mamba-1, mamba-130m shape, random weights", True, "MambaConfig", "MambaForCausalLM",
          dict(hidden_size=768, num_hidden_layers=24, vocab_size=50280)),
    # As the published mamba2-130m: its vocabulary is padded to a multiple of 16 (50288; llama.cpp's
    # converter assumes that padding and refuses 50280) and its output head is tied to the embedding
    # (Mamba2Config defaults to untied, which would add a 154 MB matrix the real model does not have).
    Model("mamba2-130m", "Mamba-2, mamba2-130m shape, random weights", True, "Mamba2Config", "Mamba2ForCausalLM",
          dict(hidden_size=768, num_hidden_layers=24, vocab_size=50288, num_heads=24, head_dim=64, n_groups=1,
               state_size=128, tie_word_embeddings=True)),
    Model("mamba-370m", "Mamba-1, 370m shape (d_model 1024, 48 layers), random weights", False, "MambaConfig",
          "MambaForCausalLM", dict(hidden_size=1024, num_hidden_layers=48, vocab_size=50280)),
    Model("demo-mamba", "the small trained model edgemamba/data/demo-mamba", False,
          path=REPO / "edgemamba" / "data" / "demo-mamba"),
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_process(cmd: list, *, cwd: Path | None = None, timeout: float = 3600) -> subprocess.CompletedProcess:
    """Run a command in its own process group, killed whole if this script stops or times out
    (`/usr/bin/time` does not pass a kill on to the benchmark it runs)."""
    cmd = [str(c) for c in cmd]
    with subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except BaseException:
            os.killpg(p.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def run(cmd: list, *, cwd: Path | None = None, timeout: float = 3600) -> str:
    """Run a command, return its stdout; on failure raise with the tail of its output."""
    p = run_process(cmd, cwd=cwd, timeout=timeout)
    if p.returncode != 0:
        tail = (p.stdout + p.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"{shlex.join(p.args)} exited {p.returncode}:\n" + "\n".join(tail))
    return p.stdout


def cpu_busy_s() -> float:
    """CPU seconds spent busy so far, all CPUs together (/proc/stat: everything but idle and iowait)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def others_busy(window_s: float) -> float:
    """Fraction of the machine's CPUs busy over the next `window_s` (nothing of ours runs meanwhile)."""
    b0 = cpu_busy_s()
    time.sleep(window_s)
    return (cpu_busy_s() - b0) / (window_s * os.cpu_count())


def wait_for_quiet(threshold: float, max_wait_s: float) -> float:
    """Wait (up to max_wait_s) until other processes use less than `threshold` of the CPUs; return
    the last fraction seen. The machine is shared: this takes the quiet moments there are."""
    deadline = time.monotonic() + max_wait_s
    busy = others_busy(2.0)
    while busy >= threshold and time.monotonic() < deadline:
        busy = others_busy(5.0)
    return busy


@dataclass(frozen=True)
class Timed:
    stdout: str
    peak_rss_bytes: int  # the child's ru_maxrss, the same measurement for both peers
    wall_s: float
    others_cpu: float  # fraction of the machine's CPUs that other processes used meanwhile


def timed_run(cmd: list, *, timeout: float = 3600) -> Timed:
    """Run under `/usr/bin/time -v`, noting what the rest of the machine did meanwhile."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        b0, t0 = cpu_busy_s(), time.perf_counter()
        out = run(["/usr/bin/time", "-v", "-o", tf.name, *cmd], cwd=REPO, timeout=timeout)
        wall, busy = time.perf_counter() - t0, cpu_busy_s() - b0
        report = tf.read()
    field_ = lambda name: float(re.search(rf"{name}: ([\d.]+)", report).group(1))  # noqa: E731
    own = field_(r"User time \(seconds\)") + field_(r"System time \(seconds\)")
    others = max(0.0, busy - own) / (wall * os.cpu_count())
    return Timed(out, int(field_(r"Maximum resident set size \(kbytes\)")) * 1024, wall, others)


# ------------------------------------------------------------------------------------------ llama.cpp

@dataclass(frozen=True)
class LlamaCpp:
    src: Path  # vendor/llama.cpp
    build: Path
    commit: str  # llama.cpp commit of the vendored source
    commit_date: str

    @property
    def bench(self) -> Path:
        return self.build / "bin" / "llama-bench"

    @property
    def quantize(self) -> Path:
        return self.build / "bin" / "llama-quantize"

    @property
    def convert(self) -> Path:
        return self.src / "convert_hf_to_gguf.py"


def ensure_llamacpp(jobs: int) -> LlamaCpp:
    """Download the llama-cpp-python sdist, unpack it and build the tools (each step once)."""
    root = CACHE / "llamacpp"
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        log(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON} source")
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", root])
    pkg = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    if not (pkg / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        log("unpacking")
        with tarfile.open(sdist) as tar:
            tar.extractall(root, filter="data")
    src = pkg / "vendor" / "llama.cpp"
    build = root / "build"
    stamp = build / "edgemamba-bench-flags.txt"
    if not stamp.exists() or stamp.read_text() != " ".join(CMAKE_FLAGS):
        log("configuring llama.cpp (CMake)")
        shutil.rmtree(build, ignore_errors=True)
        run(["cmake", "-S", src, "-B", build, "-G", "Ninja", *CMAKE_FLAGS])
        stamp.write_text(" ".join(CMAKE_FLAGS))
    if not all((build / "bin" / t).exists() for t in LLAMA_TARGETS):
        log(f"building {', '.join(LLAMA_TARGETS)} with -j{jobs} (about 20 minutes on 2 busy cores)")
    run(["cmake", "--build", build, "-j", str(jobs), "--target", *LLAMA_TARGETS], timeout=7200)
    # The sdist carries the vendored llama.cpp's git metadata, so this is the upstream commit.
    commit, date = run(["git", "log", "-1", "--format=%h %cs"], cwd=src).split()
    return LlamaCpp(src, build, commit, date)


def checkpoint_fingerprint(model: Model) -> str:
    """Changes when the checkpoint is rebuilt or replaced, so its conversions are redone."""
    h = hashlib.sha256()
    for f in sorted(model.checkpoint().iterdir()):
        st = f.stat()
        h.update(f"{f.name} {st.st_size} {st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def ensure_gguf(llama: LlamaCpp, model: Model, prec: Precision) -> Path:
    out = CACHE / "gguf" / f"{model.name}.{prec.gguf}.gguf"
    stamp = out.with_name(out.name + ".source")
    source = f"{checkpoint_fingerprint(model)} {llama.commit}"
    if out.exists() and stamp.exists() and stamp.read_text() == source:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if prec.convert:
        log(f"converting {model.name} to GGUF {prec.gguf}")
        run([sys.executable, llama.convert, weights_only_view(model), "--outfile", tmp, "--outtype", prec.gguf.lower()],
            cwd=llama.src)
    else:
        base = ensure_gguf(llama, model, PRECISIONS[0])
        log(f"quantizing {model.name} to {prec.gguf}")
        run([llama.quantize, base, tmp, prec.gguf, "2"])
    os.replace(tmp, out)
    stamp.write_text(source)
    return out


def weights_only_view(model: Model) -> Path:
    """The checkpoint's config and weights without its tokenizer files.

    llama-bench feeds random token ids and never tokenizes, so the GGUF only needs a vocabulary of
    the right size. With no tokenizer files, convert_hf_to_gguf.py writes its built-in GPT-NeoX
    vocabulary (the tokenizer of the published Mamba models) cut to the model's vocab_size. A
    tokenizer.json it does not recognise by hash (the demo model's own 4096-token BPE) is refused
    ("BPE pre-tokenizer was not recognized"), so every model goes through this view alike."""
    ckpt = model.checkpoint()
    view = CACHE / "gguf" / f"{model.name}.weights-only"
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for f in ckpt.iterdir():
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json"):
            (view / f.name).symlink_to(f.resolve())
    return view


def llama_bench(llama: LlamaCpp, gguf: Path, threads: int, reps: int) -> dict:
    """One llama-bench process: pp16, pp512 and tg128, each `reps` times."""
    cmd = [llama.bench, "-m", gguf, "-t", threads, "-p", "16,512", "-n", 128, "-r", reps, "-o", "json"]
    t = timed_run(cmd)
    tests = json.loads(t.stdout)
    res = {"cmd": shlex.join(str(c) for c in cmd), "peak_rss_bytes": t.peak_rss_bytes, "wall_s": t.wall_s,
           "others_cpu": t.others_cpu,
           "build_commit": tests[0].get("build_commit"), "build_number": tests[0].get("build_number"),
           "cpu_info": tests[0].get("cpu_info"), "model_size": tests[0].get("model_size")}
    for test in tests:
        if test["n_gen"]:  # per-repetition mean ms/token
            res["decode_ms"] = [ns / test["n_gen"] / 1e6 for ns in test["samples_ns"]]
        else:
            res[f"prefill{test['n_prompt']}_tps"] = [test["n_prompt"] / (ns / 1e9) for ns in test["samples_ns"]]
    return res


# ------------------------------------------------------------------------------------------ edgemamba

def edgemamba_source_hash() -> str:
    """Hash of the package source, so a changed edgemamba gets its artifacts rebuilt."""
    h = hashlib.sha256()
    pkg = REPO / "edgemamba"
    for f in sorted(pkg.rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts and f.parts[len(pkg.parts)] != "data":
            h.update(str(f.relative_to(pkg)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def edgemamba_cmd(*args) -> list:
    return [sys.executable, "-m", "edgemamba", *args]


def ensure_artifact(model: Model, prec: Precision, source_hash: str) -> tuple[Path | None, str]:
    """(artifact, "") or (None, why not). A refusal by `compile` (exit 2, one `error:` line) is
    "not available yet"; anything else is a failure worth reporting."""
    art = CACHE / "edgemamba" / f"{model.name}.{prec.edgemamba}.em"
    stamp = art.with_name(art.name + ".source")
    source = f"{checkpoint_fingerprint(model)} {source_hash}"
    if art.exists() and stamp.exists() and stamp.read_text() == source:
        return art, ""
    log(f"edgemamba compile {model.name} --precision {prec.edgemamba}")
    cmd = edgemamba_cmd("compile", model.checkpoint(), "--target", "ort-cpu", "--precision", prec.edgemamba,
                        "-o", art, "--force")
    p = run_process(cmd, cwd=REPO)
    if p.returncode == 0:
        stamp.write_text(source)
        return art, ""
    lines = p.stderr.strip().splitlines() or ["(no output)"]
    if p.returncode == 2 and lines[-1].startswith("error:"):
        return None, f"not available yet ({lines[-1].removeprefix('error: ')})"
    return None, f"compile failed, exit {p.returncode}: {lines[-1]}"


def edgemamba_bench(art: Path, threads: int, *, prompt_len: int, tokens: int, repeats: int, context: int = 0) -> dict:
    cmd = edgemamba_cmd("bench", art, "--tokens", tokens, "--threads", threads, "--prompt-len", prompt_len,
                        "--repeats", repeats, "--json")
    if context:
        cmd += ["--context", context]
    t = timed_run(cmd)
    res = json.loads(t.stdout)
    res.update(cmd="edgemamba " + shlex.join(str(c) for c in cmd[3:]), time_peak_rss_bytes=t.peak_rss_bytes,
               wall_s=t.wall_s, others_cpu=t.others_cpu)
    return res


# ------------------------------------------------------------------------------------------ the runs

def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def memory_read_gbps(threads: int) -> float | None:
    """This machine's memory read speed now (GB/s, median of benchmarks/stream_read.cc's 15 reads),
    the ceiling of a memory-bound decode step; None where it cannot be built (it needs AVX-512)."""
    exe = CACHE / "stream_read"
    src = REPO / "benchmarks" / "stream_read.cc"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        p = run_process(["g++", "-O2", "-mavx512f", "-pthread", src, "-o", exe])
        if p.returncode:
            return None
    p = run_process([exe, threads])
    m = re.search(r"([\d.]+) GB/s median", p.stdout)
    return float(m.group(1)) if p.returncode == 0 and m else None


def measure(llama: LlamaCpp, gguf: Path, art: Path | None, threads: int, rounds: int, args) -> dict:
    """Rounds of (llama.cpp, edgemamba), each peer's figures pooled over the rounds; the decode ratio
    paired by round."""
    raw = {"llama": [], "edgemamba": []}
    rounds = rounds if art is not None else 1  # llama.cpp alone: no noise to share
    mem = []  # memory read GB/s before each round
    for r in range(rounds):
        busy = wait_for_quiet(args.quiet, args.max_wait)
        mem.append(memory_read_gbps(threads))
        log(f"  round {r + 1}/{rounds}: other processes use {busy:.0%} of the CPUs; memory reads at "
            f"{mem[-1] or 0:.1f} GB/s")
        raw["llama"].append(llama_bench(llama, gguf, threads, args.llama_reps))
        log(f"  round {r + 1}/{rounds}: llama.cpp decode {median(raw['llama'][-1]['decode_ms']):.2f} ms/token")
        if art is not None:
            for prompt_len in (16, 512):
                raw["edgemamba"].append(edgemamba_bench(art, threads, prompt_len=prompt_len, tokens=args.tokens,
                                                        repeats=args.llama_reps))
            log(f"  round {r + 1}/{rounds}: edgemamba decode {raw['edgemamba'][-1]['decode_ms']['mean']:.2f} ms/token")
    ll = raw["llama"]
    fig = {"llama": {
        "decode_ms": median([x for run_ in ll for x in run_["decode_ms"]]),
        "prefill16_tps": median([x for run_ in ll for x in run_["prefill16_tps"]]),
        "prefill512_tps": median([x for run_ in ll for x in run_["prefill512_tps"]]),
        "peak_rss_bytes": max(run_["peak_rss_bytes"] for run_ in ll),
        "model_bytes": ll[0]["model_size"],
    }}
    fig["others_cpu"] = max(x["others_cpu"] for x in ll + raw["edgemamba"])
    em = raw["edgemamba"]
    if em:
        # mean ms/token of each run, as llama-bench reports per repetition; p50 alongside
        fig["edgemamba"] = {
            "decode_ms": median([e["decode_ms"]["mean"] for e in em]),
            "decode_p50_ms": median([e["decode_ms"]["p50"] for e in em]),
            "prefill16_tps": median([e["prefill_tokens_per_s"] for e in em if e["prefill_tokens"] == 16]),
            "prefill512_tps": median([e["prefill_tokens_per_s"] for e in em if e["prefill_tokens"] == 512]),
            "peak_rss_bytes": max(e["time_peak_rss_bytes"] for e in em),
            "model_bytes": em[0]["weight_bytes"],
            "engine": em[0].get("engine", "ort"),
        }
        # decode, paired: each round's edgemamba runs against the llama.cpp run just before them (the
        # machine's memory speed, which decides both, moves between rounds), median over the rounds
        per_em = len(em) // len(ll)
        fig["decode_rounds"] = [
            {"ratio": statistics.mean(e["decode_ms"]["mean"] for e in em[i * per_em : (i + 1) * per_em])
             / median(ll[i]["decode_ms"]), "mem_gbps": mem[i]} for i in range(len(ll))]
        a, b = fig["edgemamba"], fig["llama"]
        fig["ratios"] = {"decode": median([x["ratio"] for x in fig["decode_rounds"]]),
                         "prefill16": a["prefill16_tps"] / b["prefill16_tps"],
                         "prefill512": a["prefill512_tps"] / b["prefill512_tps"],
                         "rss": a["peak_rss_bytes"] / b["peak_rss_bytes"]}
    return {"figures": fig, "raw": raw}


def context_check(art: Path, threads: int, args) -> dict:
    """edgemamba decode p50 after 64 and after 32,768 context tokens: two sessions of one process,
    stepped alternately token by token, so both see the same machine noise at the same moment
    (separate processes saw the machine's speed change by 30% between runs)."""
    runs = []
    for _ in range(args.context_rounds):
        busy = wait_for_quiet(args.quiet, args.max_wait)
        log(f"  contexts 64 and {args.long_context}, stepped alternately (other processes use {busy:.0%} of the CPUs)")
        t = timed_run([sys.executable, "-c", PAIRED_FLAT, art, threads, 64, args.long_context, args.tokens])
        near, far, engine = t.stdout.split()
        runs.append({"near": float(near), "far": float(far), "engine": engine, "others_cpu": t.others_cpu})
    p50 = {64: median([r["near"] for r in runs]), args.long_context: median([r["far"] for r in runs])}
    return {"threads": threads, "p50_ms": p50, "ratio": p50[args.long_context] / p50[64],
            "others_cpu": max(r["others_cpu"] for r in runs), "raw": runs}


@dataclass
class Run:
    """One invocation: what it measured so far. Saved (and the RESULTS.md block rewritten) after
    every row, so a run cut short still leaves its figures."""
    args: argparse.Namespace
    command: str
    llama: LlamaCpp
    started: datetime.datetime
    planned_rows: int = 0
    rows: list = field(default_factory=list)
    flat: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    finished: bool = False
    resumed: dict | None = None  # the earlier, cut-short run whose complete rows this one keeps

    @property
    def json_path(self) -> Path:
        return CACHE / "runs" / f"cpu_vs_llamacpp-{self.started:%Y%m%d-%H%M%S}.json"

    def save(self) -> None:
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(
            {"started": self.started.isoformat(), "command": self.command, "llama_commit": self.llama.commit,
             "settings": settings(self.args), "finished": self.finished, "rows": self.rows, "flat": self.flat,
             "skipped": self.skipped, "resumed": self.resumed},
            indent=1, default=str))
        if self.args.write:
            write_block(render(self))


def measure_row(run_: Run, model: Model, prec: Precision, threads: int, source_hash: str) -> None:
    binding = model.binding and threads == BINDING_THREADS
    gguf = ensure_gguf(run_.llama, model, prec)
    art, why = ensure_artifact(model, prec, source_hash)
    log(f"{model.name} {prec.gguf}/{prec.edgemamba} threads {threads}" + (f": edgemamba {why}" if why else ""))
    try:
        m = measure(run_.llama, gguf, art, threads, run_.args.rounds if binding else run_.args.info_rounds, run_.args)
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError, KeyError) as e:
        m = {"figures": {}, "error": str(e)}
        log(f"  FAILED: {e}")
    run_.rows.append({"model": model.name, "binding": binding, "gguf": prec.gguf, "precision": prec.edgemamba,
                      "threads": threads, "edgemamba_note": why, "edgemamba_source": source_hash,
                      "run": run_.started.isoformat(), **m})
    run_.save()


def flat_check(run_: Run, model: Model, source_hash: str) -> None:
    art, why = ensure_artifact(model, PRECISIONS[0], source_hash)
    log(f"flat-latency check {model.name} fp32")
    try:
        if art is None:
            raise RuntimeError(why)
        run_.flat.append({"model": model.name, "run": run_.started.isoformat(),
                          **context_check(art, BINDING_THREADS, run_.args)})
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError, KeyError) as e:
        run_.flat.append({"model": model.name, "error": str(e)})
        log(f"  FAILED: {e}")
    run_.save()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(m.name for m in MODELS))
    ap.add_argument("--precisions", default=",".join(p.edgemamba for p in PRECISIONS),
                    help="edgemamba names: fp32,fp16,int8,int4")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=2,
                    help="llama.cpp/edgemamba alternations for the rows the issue's bars bind (130m, 2 threads)")
    ap.add_argument("--info-rounds", type=int, default=1, help="alternations for the other rows")
    ap.add_argument("--llama-reps", type=int, default=5, help="llama-bench -r, and edgemamba prefill --repeats")
    ap.add_argument("--tokens", type=int, default=256, help="edgemamba bench --tokens (decode steps timed)")
    ap.add_argument("--no-context-check", dest="context_check", action="store_false")
    ap.add_argument("--long-context", type=int, default=32768)
    ap.add_argument("--context-rounds", type=int, default=2, help="alternations of the two contexts")
    ap.add_argument("--quiet", type=float, default=0.25,
                    help="before each round, wait until other processes use less than this fraction of the CPUs")
    ap.add_argument("--max-wait", type=float, default=60, help="... but no longer than this many seconds")
    ap.add_argument("--jobs", type=int, default=2, help="parallel jobs for the llama.cpp build")
    ap.add_argument("--resume", type=Path, metavar="RUN_JSON",
                    help="keep the complete, uncontended rows of an earlier run (benchmarks/.cache/runs/*.json), "
                         "measure the rest")
    ap.add_argument("--no-write", dest="write", action="store_false", help=f"do not update {RESULTS_MD.name}")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the benchmark running now is killed too
    command = "python benchmarks/cpu_vs_llamacpp.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])

    llama = ensure_llamacpp(args.jobs)
    log(f"llama.cpp {llama.commit} ({llama.commit_date}) built in {llama.build}")
    run_ = Run(args, command, llama, datetime.datetime.now().astimezone())
    source_hash = edgemamba_source_hash()

    models = []
    for model in (m for m in MODELS if m.name in args.models.split(",")):
        if model.path is None:
            build_checkpoint(model)
        elif not (model.path / "config.json").exists():
            run_.skipped.append(f"{model.name}: {model.path.relative_to(REPO)} is not present")
            log(f"skipping {run_.skipped[-1]}")
            continue
        models.append(model)
    precs = [p for p in PRECISIONS if p.edgemamba in args.precisions.split(",")]
    jobs = [(m, p, int(t)) for m in models for p in precs for t in args.threads.split(",")]
    run_.planned_rows = len(jobs)
    if args.resume:
        resume(run_, json.loads(args.resume.read_text()))
        done = {(r["model"], r["precision"], r["threads"]) for r in run_.rows}
        jobs = [j for j in jobs if (j[0].name, j[1].edgemamba, j[2]) not in done]
    # The rows the issue's bars bind first, then the flat-latency check, then the rest: a run
    # cut short has the figures that matter most.
    binding = [j for j in jobs if j[0].binding and j[2] == BINDING_THREADS]
    for job in binding:
        measure_row(run_, *job, source_hash)
    if args.context_check:
        for model in (m for m in models if m.binding and not any(f["model"] == m.name for f in run_.flat)):
            flat_check(run_, model, source_hash)
    for job in (j for j in jobs if j not in binding):
        measure_row(run_, *job, source_hash)

    run_.finished = True
    run_.save()
    print(render(run_))
    log(f"raw figures in {run_.json_path.relative_to(REPO)}" + (f"; updated {RESULTS_MD.relative_to(REPO)}" if args.write else ""))
    return 0


def settings(args: argparse.Namespace) -> dict:
    """The options that shape the figures: a run resumes only one made with the same."""
    keys = ("rounds", "info_rounds", "llama_reps", "tokens", "long_context", "context_rounds")
    return {k: getattr(args, k) for k in keys}


def resume(run_: Run, prev: dict) -> None:
    """Keep an earlier run's rows that have both peers' figures, measured while the machine was
    quiet enough, and its completed flat checks likewise; the rest is measured again (a row with
    llama.cpp alone too: edgemamba may have that precision now)."""
    if prev.get("settings") != settings(run_.args):
        sys.exit(f"cannot resume: that run used {prev.get('settings')}, this one {settings(run_.args)}")
    quiet = run_.args.quiet
    run_.resumed = {"started": prev["started"], "command": prev["command"]}
    run_.rows = [r for r in prev["rows"] if "ratios" in r["figures"] and r["figures"]["others_cpu"] <= quiet]
    run_.flat = [f for f in prev["flat"] if "error" not in f and f["others_cpu"] <= quiet]
    for r in run_.rows:
        r.setdefault("run", prev["started"])
    for f in run_.flat:  # JSON turned the context lengths into strings
        f["p50_ms"] = {int(k): v for k, v in f["p50_ms"].items()}
        f.setdefault("run", prev["started"])
    log(f"resuming {prev['started']}: keeping {len(run_.rows)} rows and {len(run_.flat)} flat checks")


def build_checkpoint(model: Model) -> None:
    """A random-weight transformers model saved as an HF checkpoint (safetensors), rebuilt only
    when its config here changes."""
    out = model.checkpoint()
    if (out / "config.json").exists():
        saved = json.loads((out / "config.json").read_text())
        if all(saved.get(k) == v for k, v in model.config.items()):
            return
    import torch
    import transformers

    log(f"building random-weight checkpoint {model.name}")
    config = getattr(transformers, model.config_class)(**model.config)
    torch.manual_seed(0)
    hf = getattr(transformers, model.model_class)(config).eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


# ------------------------------------------------------------------------------------------ report

def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def _engines(run_: Run) -> str:
    found = sorted({r["figures"]["edgemamba"].get("engine", "ort") for r in run_.rows if "edgemamba" in r["figures"]})
    return ", ".join(found) or "none yet"


def _per_round(fig: dict) -> str:
    """Each round's decode ratio, with the memory read speed before it: "0.74 (76) / 0.81 (45)"."""
    rounds = fig.get("decode_rounds", [])  # absent in rows of runs before 2026-11-23 (resumed)
    return " / ".join(f"{x['ratio']:.2f}" + (f" ({x['mem_gbps']:.0f})" if x["mem_gbps"] else "") for x in rounds)


def _verdict(ratio: float, bar: float, at_most: bool) -> str:
    ok = ratio <= bar if at_most else ratio >= bar
    shown = f"{ratio:.2f}" if f"{ratio:.2f}" != f"{bar:.2f}" else f"{ratio:.3f}"  # no "1.50 FAIL" against 1.5
    return f"{shown} {'pass' if ok else 'FAIL'}"


def render(run_: Run) -> str:
    args, llama = run_.args, run_.llama
    git_head = run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO).strip()
    dirty = run(["git", "status", "--porcelain", "--", "edgemamba"], cwd=REPO).strip()
    first = next((r["raw"]["llama"][0] for r in run_.rows if r.get("raw")), {})
    others = [r["figures"]["others_cpu"] for r in run_.rows if "others_cpu" in r["figures"]]
    status = (f"finished {datetime.datetime.now():%H:%M}" if run_.finished else
              f"**in progress or cut short: {len(run_.rows)} of {run_.planned_rows} rows**, last saved "
              f"{datetime.datetime.now():%H:%M}")
    out = [
        BEGIN,
        f"Run {run_.started:%Y-%m-%d %H:%M %Z}, {status}: `{run_.command}`",
        "",
        f"- machine: {first.get('cpu_info', platform.processor())}, {os.cpu_count()} cores, shared with other "
        "engineers' tests and benchmarks. Before each round the script waits (up to "
        f"{args.max_wait:.0f} s) for other processes to use less than {args.quiet:.0%} of the CPUs, and it measures "
        "what they used during each run (/proc/stat minus the run's own CPU time): column `others`, the worst run "
        f"of the row; {min(others, default=0):.0%}-{max(others, default=0):.0%} over the rows. A row above "
        f"{args.quiet:.0%} is marked `*`: under such load the two peers slow down by different factors (llama.cpp's "
        "threads wait for each other at every op), so its ratios say little about the bars.",
        f"- llama.cpp {llama.commit} ({llama.commit_date}), the source vendored in llama-cpp-python {LLAMA_CPP_PYTHON} "
        f"(llama-bench reports build_commit {first.get('build_commit')}, build_number {first.get('build_number')}); "
        f"CMake `{' '.join(CMAKE_FLAGS)}`, Ninja, gcc {_gcc_version()}, `-j{args.jobs}`; per row one process of "
        f"`llama-bench -m M -t T -p 16,512 -n 128 -r {args.llama_reps} -o json`. GGUF from `convert_hf_to_gguf.py "
        "--outtype f32|f16`, Q8_0 and Q4_0 by `llama-quantize` from the f32 file.",
        f"- edgemamba at git {git_head}" + (" plus uncommitted changes under edgemamba/" if dirty else "") +
        f": `edgemamba compile CKPT --target ort-cpu --precision P -o ART`, then per row `edgemamba bench ART --tokens "
        f"{args.tokens} --threads T --prompt-len L --repeats {args.llama_reps} --json` for L = 16 and 512 "
        f"(engine: {_engines(run_)}, what `bench` reported).",
        f"- Per row the peers alternate (llama.cpp, edgemamba, ...): rounds {args.rounds} on the rows the bars bind, "
        f"{args.info_rounds} on the others. decode: mean ms/token of each run (llama.cpp: each of its 128-token "
        f"repetitions; edgemamba: each process's {args.tokens} tokens, its per-token p50 in brackets), median over "
        "runs; its ratio is paired: per round, edgemamba's two runs against the llama.cpp run just before them, "
        "median over the rounds (column `per round`, with the machine's memory read speed measured before the "
        "round by benchmarks/stream_read.cc: both peers' decode is memory-bound, and that speed moved between "
        "42 and 78 GB/s within minutes on this machine). "
        "prefill: tokens/s, median over repetitions. RSS: peak resident set of the whole process "
        "(`/usr/bin/time -v`: model, runtime and, for edgemamba, the Python interpreter), largest over the row's runs.",
        "- ratios are edgemamba / llama.cpp; bars from issue 6: decode <= 0.8, prefill-512 >= 1.5, RSS <= 1. "
        "They bind for the 130m shapes on 2 threads (**bold** rows); the other rows are for information.",
    ]
    out += [f"- skipped: {s}" for s in run_.skipped]
    if run_.resumed:
        out.append(f"- resumed a run cut short ({run_.resumed['started'][:16]}, `{run_.resumed['command']}`): the "
                   "rows and checks marked † were measured by it, with the same settings.")
    order = {p.edgemamba: i for i, p in enumerate(PRECISIONS)}
    for model, what in ((m.name, m.what) for m in MODELS if any(r["model"] == m.name for r in run_.rows)):
        out += ["", f"**{model}**: {what}", "",
                "| precision | threads | others | decode ms/token llama.cpp | edgemamba [p50] | ratio (<=0.8) "
                "| per round (GB/s) "
                "| prefill-16 tok/s llama.cpp | edgemamba | ratio "
                "| prefill-512 tok/s llama.cpp | edgemamba | ratio (>=1.5) "
                "| peak RSS MiB llama.cpp | edgemamba | ratio (<=1) |",
                "|" + "---|" * 16]
        rows = sorted((r for r in run_.rows if r["model"] == model), key=lambda r: (order[r["precision"]], r["threads"]))
        for r in rows:
            name = f"{r['gguf']} / {r['precision']}"
            name = f"**{name}**" if r["binding"] else name
            f = r["figures"]
            if "llama" not in f:
                out.append(f"| {name} | {r['threads']} | | failed: {r.get('error', '?').strip().splitlines()[-1]} |"
                           + " |" * 12)
                continue
            ll = f["llama"]
            mark = "*" if f["others_cpu"] > args.quiet else ""
            carried = "†" if r["run"] != run_.started.isoformat() else ""
            cells = [name, f"{r['threads']}{carried}", f"{f['others_cpu']:.0%}{mark}", f"{ll['decode_ms']:.2f}"]
            if "edgemamba" in f:
                em, ra = f["edgemamba"], f["ratios"]
                cells += [f"{em['decode_ms']:.2f} [{em['decode_p50_ms']:.2f}]",
                          _verdict(ra["decode"], DECODE_BAR, True) + mark, _per_round(f),
                          f"{ll['prefill16_tps']:.0f}", f"{em['prefill16_tps']:.0f}", f"{ra['prefill16']:.2f}",
                          f"{ll['prefill512_tps']:.0f}", f"{em['prefill512_tps']:.0f}",
                          _verdict(ra["prefill512"], PREFILL_BAR, False) + mark,
                          _mib(ll["peak_rss_bytes"]), _mib(em["peak_rss_bytes"]), _verdict(ra["rss"], RSS_BAR, True)]
            else:
                note = r["edgemamba_note"] or r.get("error", "no figures")
                cells += [note, "", "", f"{ll['prefill16_tps']:.0f}", "", "", f"{ll['prefill512_tps']:.0f}", "", "",
                          _mib(ll["peak_rss_bytes"]), "", ""]
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
    if run_.flat:
        out += ["", f"**Flat latency** (edgemamba fp32, {BINDING_THREADS} threads: decode p50 after C context tokens, "
                f"two Sessions in one process, one prefilled with 64 tokens and one with {args.long_context:,}, stepped "
                f"alternately for {args.tokens} tokens (`PAIRED_FLAT` in benchmarks/cpu_vs_transformers.py), median of {args.context_rounds} "
                "processes; bar: within 5%)", "",
                f"| model | others | p50 at 64, ms | p50 at {args.long_context:,}, ms | ratio | within 5% |",
                "|---|---|---|---|---|---|"]
        for fl in run_.flat:
            if "error" in fl:
                out.append(f"| {fl['model']} | | failed: {fl['error'].strip().splitlines()[-1]} | | | |")
                continue
            p = fl["p50_ms"]
            mark = "*" if fl["others_cpu"] > args.quiet else ""
            carried = "†" if fl["run"] != run_.started.isoformat() else ""
            out.append(f"| {fl['model']}{carried} | {fl['others_cpu']:.0%}{mark} | {p[64]:.2f} | {p[args.long_context]:.2f} | "
                       f"{fl['ratio']:.3f} | {'pass' if abs(fl['ratio'] - 1) <= FLAT_BAR else 'FAIL'}{mark} |")
    out.append(END)
    return "\n".join(out)


def _gcc_version() -> str:
    return run(["gcc", "-dumpfullversion"]).strip()


def write_block(block: str) -> None:
    """Replace the generated block inside this script's section (creating either if absent)."""
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    elif SECTION in text:
        head, rest = text.split(SECTION, 1)
        text = head + SECTION + "\n\n" + block + "\n" + rest
    else:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n"
    tmp = RESULTS_MD.with_name(f".{RESULTS_MD.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, RESULTS_MD)


if __name__ == "__main__":
    sys.exit(main())
