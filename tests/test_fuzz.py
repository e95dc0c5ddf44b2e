"""Property-based fuzzing of everything edgemamba reads from disk.

Malformed config.json fields, truncated and bit-flipped safetensors / pytorch_model.bin, bit-flipped
or truncated ONNX graphs inside an artifact (with the manifest re-signed, so the checksum does not
simply refuse them first), random edits of manifest.json, and damaged state files. The only outcomes
allowed are success or `EdgeMambaError` with a message, within a time limit per case (hypothesis'
`deadline`). Anything else (an ONNX Runtime exception, a KeyError, a crash) fails the test.

Cases are derandomized so CI is reproducible; EDGEMAMBA_FUZZ_SCALE=10 (say) runs ten times as many,
and EDGEMAMBA_FUZZ_RANDOM=1 draws fresh random cases, for a longer campaign on a workstation.
The number of cases tried per target is printed at the end of the module.
"""

from __future__ import annotations

import collections
import copy
import json
import os
import shutil
import struct
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgemamba import EdgeMambaError, load_checkpoint
from edgemamba.artifact import compile_artifact, load_artifact, sha256_file
from edgemamba.checkpoint import spec_from_config
from edgemamba.session import Session
from edgemamba.spec import ModelSpec

SCALE = float(os.environ.get("EDGEMAMBA_FUZZ_SCALE", "1"))


def fuzz_settings(examples: int, seconds_per_case: float):
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=timedelta(seconds=seconds_per_case),
                    derandomize=os.environ.get("EDGEMAMBA_FUZZ_RANDOM") != "1", database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


# ---- counting ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tally(request):
    """target -> Counter(outcome): every case tried, printed when the module ends."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    yield counts
    total = sum(sum(c.values()) for c in counts.values())
    lines = [f"fuzz: {total} cases tried"] + [
        f"  {target:<22} {sum(c.values()):>5} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
        for target, c in counts.items()]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # shown in CI logs without -s
        print("\n" + "\n".join(lines))


def outcome(counts: collections.Counter, fn) -> object:
    """Run one case: success or EdgeMambaError (with a message) are the only allowed outcomes."""
    try:
        result = fn()
    except EdgeMambaError as e:
        msg = str(e)
        assert msg and "\n" not in msg, f"an error message must be one non-empty line: {msg!r}"
        counts["refused"] += 1
        return None
    counts["ok"] += 1
    return result


# ---- mutations --------------------------------------------------------------------------------
json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.sampled_from([0, -1, 1, 2, 3, 7, 64, 2**31, 2**63, 10**30])
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6)
                | st.sampled_from(["auto", "mamba", "mamba2", "Mamba1", "Mamba2", "Infinity", "1e400", "", "nan"]))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                                            max_size=3), max_leaves=5)


@st.composite
def damaged_bytes(draw, data: bytes, header_len: int = 0):
    """A truncation, or a few bit flips (half of them aimed at the first `header_len` bytes)."""
    if draw(st.booleans()):
        return data[: draw(st.integers(0, len(data) - 1))], "truncated"
    raw = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        hi = header_len if header_len and draw(st.booleans()) else len(raw)
        raw[draw(st.integers(0, hi - 1))] ^= 1 << draw(st.integers(0, 7))
    return bytes(raw), "flipped"


def json_paths(obj, prefix=()):
    """Every (path) into a JSON object, for edits anywhere in it."""
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from json_paths(v, prefix + (k,))


@st.composite
def json_edits(draw, base, n_max=3):
    """base with 1..n_max random edits: replace a value, delete a key, or add a key."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, n_max))):
        paths = [p for p in json_paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
        else:
            parent[path[-1]] = draw(json_values)
    return doc


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="edgemamba-fuzz-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def artifact(hf_dirs, workdir):
    _, d = hf_dirs("mamba")
    return compile_artifact(load_checkpoint(d), workdir / "base.em")


def _fresh_copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


# ---- configs -----------------------------------------------------------------------------------
def _mamba_ssm_config():
    return {"d_model": 64, "n_layer": 2, "vocab_size": 90, "pad_vocab_size_multiple": 8, "d_intermediate": 0,
            "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 1, "expand": 2,
                        "dt_limit": [0.0, 1e9]},
            "rms_norm": True, "residual_in_fp32": True, "tie_embeddings": True, "attn_layer_idx": []}


def test_fuzz_config_json(hf_dirs, tally):
    bases = [json.loads((hf_dirs(k)[1] / "config.json").read_text()) for k in ("mamba", "mamba2", "falcon")]
    bases.append(_mamba_ssm_config())
    for base in bases:
        spec_from_config(base)  # every base is valid: the fuzzing starts from real configs

    @fuzz_settings(examples=400, seconds_per_case=2)
    @given(st.sampled_from(range(len(bases))).flatmap(lambda i: json_edits(bases[i], n_max=4)))
    def case(config):
        spec = outcome(tally["config.json"], lambda: spec_from_config(config))
        if spec is not None:  # an accepted config gives a spec that survives the manifest round trip
            assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec

    case()
    assert tally["config.json"]["refused"] > 0 and tally["config.json"]["ok"] > 0


def test_fuzz_config_json_bytes(hf_dirs, workdir, tally):
    """Damaged config.json bytes in a checkpoint directory (not just bad values)."""
    src = hf_dirs("mamba")[1]
    d = _fresh_copy(src, workdir / "cfg-bytes")
    raw = (src / "config.json").read_bytes()

    @fuzz_settings(examples=100, seconds_per_case=2)
    @given(damaged_bytes(raw))
    def case(mutation):
        (d / "config.json").write_bytes(mutation[0])
        outcome(tally["config.json bytes"], lambda: load_checkpoint(d))

    case()


def test_fuzz_model_spec(artifact, tally):
    base = artifact.manifest["spec"]

    @fuzz_settings(examples=300, seconds_per_case=2)
    @given(json_edits(base, n_max=3))
    def case(d):
        outcome(tally["ModelSpec.from_dict"], lambda: ModelSpec.from_dict(d))

    case()
    assert tally["ModelSpec.from_dict"]["refused"] > 0


# ---- checkpoint weights ----------------------------------------------------------------------------
def test_fuzz_safetensors(hf_dirs, workdir, tally):
    src = hf_dirs("mamba")[1]
    d = _fresh_copy(src, workdir / "st")
    raw = (src / "model.safetensors").read_bytes()
    header_len = 8 + struct.unpack("<Q", raw[:8])[0]

    @fuzz_settings(examples=150, seconds_per_case=3)
    @given(damaged_bytes(raw, header_len))
    def case(mutation):
        data, kind = mutation
        (d / "model.safetensors").write_bytes(data)
        ck = outcome(tally[f"safetensors {kind}"], lambda: load_checkpoint(d))
        if ck is not None:  # whatever loaded has the spec's shapes and finite values
            assert all(np.isfinite(w).all() and w.shape == s for (w, s) in
                       zip(ck.weights.values(), ck.spec.weight_shapes().values()))

    case()
    assert tally["safetensors truncated"]["refused"] > 0


def test_fuzz_pytorch_bin(hf_dirs, workdir, tally):
    from conftest import write_mamba_ssm_checkpoint

    model, _ = hf_dirs("mamba")
    d = write_mamba_ssm_checkpoint(model, workdir / "bin")
    raw = (d / "pytorch_model.bin").read_bytes()

    @fuzz_settings(examples=60, seconds_per_case=3)
    @given(damaged_bytes(raw))
    def case(mutation):
        (d / "pytorch_model.bin").write_bytes(mutation[0])
        outcome(tally[f"pytorch_model.bin {mutation[1]}"], lambda: load_checkpoint(d))

    case()


# ---- artifacts -------------------------------------------------------------------------------------
def _resign(art_dir: Path, name: str) -> None:
    """Update the manifest's size and checksum of one file, as a crafted artifact would."""
    mpath = art_dir / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["files"][name] = {"sha256": sha256_file(art_dir / name), "bytes": (art_dir / name).stat().st_size}
    mpath.write_text(json.dumps(manifest))


def _run_artifact(path: Path, verify: bool):
    """Load, prefill and step: everything a device app does first."""
    s = Session(path, threads=1, verify=verify)
    s.prefill([1, 2, 3])
    s.step([4])
    return s


def test_fuzz_onnx_graphs(artifact, workdir, tally):
    d = _fresh_copy(artifact.path, workdir / "onnx")
    originals = {g: (artifact.path / f"{g}.onnx").read_bytes() for g in ("step", "prefill")}
    manifest = (artifact.path / "manifest.json").read_text()

    @fuzz_settings(examples=60, seconds_per_case=15)
    @given(st.sampled_from(["step", "prefill"]).flatmap(
        lambda g: st.tuples(st.just(g), damaged_bytes(originals[g]), st.booleans())))
    def case(args):
        graph, (data, kind), resign = args
        (d / "manifest.json").write_text(manifest)
        for g, raw in originals.items():
            (d / f"{g}.onnx").write_bytes(data if g == graph else raw)
        if resign:
            _resign(d, f"{graph}.onnx")
        outcome(tally[f"onnx {kind}{' resigned' if resign else ''}"],
                lambda: _run_artifact(d, verify=resign))

    case()


def test_fuzz_manifest(artifact, workdir, tally):
    d = _fresh_copy(artifact.path, workdir / "manifest")
    base = json.loads((artifact.path / "manifest.json").read_text())

    @fuzz_settings(examples=150, seconds_per_case=15)
    @given(json_edits(base, n_max=3))
    def case(manifest):
        (d / "manifest.json").write_text(json.dumps(manifest))
        outcome(tally["manifest.json"], lambda: _run_artifact(d, verify=True))

    case()
    assert tally["manifest.json"]["refused"] > 0


def test_fuzz_state_files(artifact, workdir, tally):
    s = Session(artifact, threads=1)
    list(s.generate([5, 6, 7], 4, stop=[]))
    s.save_state(workdir / "good.state")
    raw = (workdir / "good.state").read_bytes()
    header_len = 8 + struct.unpack("<Q", raw[:8])[0]
    expected = s.get_state()
    target = Session(artifact, threads=1)
    path = workdir / "fuzzed.state"

    @fuzz_settings(examples=200, seconds_per_case=2)
    @given(damaged_bytes(raw, header_len))
    def case(mutation):
        data, kind = mutation
        path.write_bytes(data)
        target.reset()
        if outcome(tally[f"state {kind}"], lambda: target.load_state(path) or True):
            # a damaged file that still loads must give exactly the saved state: never a silent change
            got = target.get_state()
            assert all(np.array_equal(got[k], expected[k]) for k in expected), "state file damage went unnoticed"
            assert target.positions[0] == s.positions[0], "state file damage changed the position"

    case()
    assert tally["state flipped"]["refused"] > 0 and tally["state truncated"]["refused"] > 0
