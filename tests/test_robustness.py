"""Hostile inputs and failure paths a device app must survive without crashing or lying.

Integrity (checksums, --no-verify, tokenizers and state files from elsewhere), untrusted checkpoints
(pickles that run code, remote code, crafted headers), runtime inputs through the CLI, NaN/inf
logits, concurrency, and writes that fail half-way. The fuzz tests (test_fuzz.py) cover the same
loaders with random damage; these are the named cases, each checked against what a user expects.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import VOCAB, assert_logits_close, random_ids
from test_cli import assert_user_error, run_cli

import edgemamba
from edgemamba import EdgeMambaError, load_checkpoint
from edgemamba.artifact import atomic_write_bytes, compile_artifact, load_artifact, sha256_file
from edgemamba.cli import main as cli_main
from edgemamba.reference import Reference
from edgemamba.sampling import SamplingParams
from edgemamba.session import Session


# ---- fixtures and helpers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(hf_dirs):
    return load_checkpoint(hf_dirs("mamba")[1])


@pytest.fixture(scope="module")
def art(ckpt, tmp_path_factory):
    return compile_artifact(ckpt, tmp_path_factory.mktemp("robust") / "mamba.em")


def copy_artifact(art, dest: Path) -> Path:
    shutil.copytree(art.path, dest)
    return dest


def resign(art_dir: Path, name: str) -> None:
    """Update one file's size and checksum in the manifest, as a crafted artifact would."""
    mpath = art_dir / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["files"][name] = {"sha256": sha256_file(art_dir / name), "bytes": (art_dir / name).stat().st_size}
    mpath.write_text(json.dumps(manifest))


def flip_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= mask
    path.write_bytes(bytes(raw))


def write_tokenizer(path: Path, n_tokens: int) -> None:
    """A word-level tokenizer with ids 0..n_tokens-1."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n_tokens)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def cli(*args):
    """The CLI in-process (fast); real processes are used where the process itself matters."""
    result = CliRunner().invoke(cli_main, [str(a) for a in args])
    result.returncode = result.exit_code  # the shape assert_user_error expects
    return result


def no_temporaries(d: Path) -> bool:
    return not [p for p in d.iterdir() if p.name.startswith(".")]


# ---- integrity ---------------------------------------------------------------------------------------
def test_checksums_verified_on_load_and_no_verify_skips_them(art, ckpt, tmp_path):
    d = copy_artifact(art, tmp_path / "a.em")
    flip_byte(d / "weights.bin", 0)  # lowest mantissa bits of one embedding weight: still runs fine
    with pytest.raises(EdgeMambaError, match="weights.bin: checksum does not match"):
        Session(d)
    assert_user_error(cli("run", d, "--prompt-ids", "1,2,3", "-n", "4", "--json"), "checksum does not match")
    r = cli("run", d, "--prompt-ids", "1,2,3", "-n", "4", "--json", "--no-verify")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tokens"] == Reference(ckpt).greedy(np.array([1, 2, 3]), 4)
    # the size check stays on with --no-verify: a truncated file is refused whatever the flag
    (d / "weights.bin").write_bytes((d / "weights.bin").read_bytes()[:-4])
    assert_user_error(cli("run", d, "--prompt-ids", "1", "--no-verify"), "does not match the manifest")


def test_newer_format_and_edited_spec_are_refused(art, tmp_path):
    d = copy_artifact(art, tmp_path / "a.em")
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    assert_user_error(cli("run", d, "--prompt-ids", "1"), "newer than this edgemamba supports", "upgrade")
    # a spec edited by hand would run graphs built for another shape: refused by its hash
    edited = {**manifest, "spec": {**manifest["spec"], "d_state": 16}}
    (d / "manifest.json").write_text(json.dumps(edited))
    assert_user_error(cli("run", d, "--prompt-ids", "1"), "does not match its spec_hash")
    # ... and with the hash updated too, the graphs' declared state shapes disagree with it
    spec = edgemamba.ModelSpec.from_dict(edited["spec"])
    (d / "manifest.json").write_text(json.dumps({**edited, "spec_hash": spec.spec_hash()}))
    with pytest.raises(EdgeMambaError, match="past_ssm_state.0.*this model needs"):
        Session(d)


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m["graphs"].update(step=[]), "'step' file [] is not among the listed files"),
    (lambda m: m["graphs"].update(step="../step.onnx"), "is not among the listed files"),
    (lambda m: m.update(tokenizer="../../etc/passwd"), "'tokenizer' file '../../etc/passwd' is not among"),
    (lambda m: m["files"].update({"a\nb": {"bytes": 1}}), "must be a plain name"),
    (lambda m: m["files"].pop("weights.bin"), "the manifest lists no 'weights.bin'"),
    (lambda m: m.update(target=["ort-cpu"]), "field 'target' is missing or not a str"),
])
def test_hand_edited_manifests_are_refused(art, tmp_path, edit, fragment):
    d = copy_artifact(art, tmp_path / "a.em")
    manifest = json.loads((d / "manifest.json").read_text())
    edit(manifest)
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgeMambaError) as e:
        Session(d)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_tokenizer_must_fit_the_vocabulary(hf_dirs, tmp_path):
    src = hf_dirs("mamba")[1]
    ck_dir = tmp_path / "ckpt"
    shutil.copytree(src, ck_dir)
    write_tokenizer(ck_dir / "tokenizer.json", VOCAB + 10)  # ids up to 105 for a 96-row model
    too_big = compile_artifact(load_checkpoint(ck_dir), tmp_path / "big.em")
    with pytest.raises(EdgeMambaError, match="tokenizer has 106 tokens but the model's vocabulary has 96 rows"):
        Session(too_big)
    assert_user_error(cli("run", too_big.path, "--prompt", "w1 w2"), "tokenizer has 106 tokens")

    write_tokenizer(ck_dir / "tokenizer.json", VOCAB - 6)  # a padded vocabulary is fine
    ok = compile_artifact(load_checkpoint(ck_dir), tmp_path / "ok.em")
    assert Session(ok).encode("w1 w5 w89") == [1, 5, 89]

    unreadable = copy_artifact(ok, tmp_path / "unreadable.em")
    (unreadable / "tokenizer.json").write_text('{"model": {"type": "WordLevel"')
    with pytest.raises(EdgeMambaError, match="tokenizer.json: size .* does not match the manifest"):
        Session(unreadable)
    resign(unreadable, "tokenizer.json")
    with pytest.raises(EdgeMambaError, match="tokenizer.json: not a readable tokenizer"):
        Session(unreadable)


def test_state_files_damaged_or_foreign_are_refused(art, ckpt, hf_dirs, tmp_path):
    s = Session(art)
    list(s.generate([3, 4, 5], 6, stop=[]))
    good = tmp_path / "good.state"
    s.save_state(good)
    raw = good.read_bytes()
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    target = Session(art)

    for cut in (0, 7, 100, header_end, len(raw) - 1):
        (tmp_path / "cut.state").write_bytes(raw[:cut])
        with pytest.raises(EdgeMambaError, match="not a readable state file"):
            target.load_state(tmp_path / "cut.state")
    for offset in (header_end + 5, len(raw) - 3):  # tensor data: a change nothing else would notice
        flipped = tmp_path / "flipped.state"
        flipped.write_bytes(raw)
        flip_byte(flipped, offset)
        with pytest.raises(EdgeMambaError, match="checksum does not match"):
            target.load_state(flipped)
    pos = raw.index(b'"position":"') + len('"position":"')
    digit = b"1" if raw[pos:pos + 1] != b"1" else b"2"
    (tmp_path / "pos.state").write_bytes(raw[:pos] + digit + raw[pos + 1:])  # the position, edited
    with pytest.raises(EdgeMambaError, match="checksum does not match"):
        target.load_state(tmp_path / "pos.state")
    # the failed loads left the target untouched, and the good file still restores exactly
    assert all(not v.any() for v in target.backend.state.values())
    target.load_state(good)
    assert list(target.generate(None, 5, stop=[])) == list(s.generate(None, 5, stop=[]))

    other = compile_artifact(load_checkpoint(hf_dirs("mamba2")[1]), tmp_path / "other.em")
    with pytest.raises(EdgeMambaError, match="state is from another model"):
        Session(other).load_state(good)
    with pytest.raises(EdgeMambaError, match="NaN or infinity"):
        target.set_state({k: np.full_like(v, np.nan) for k, v in s.get_state().items()})


# ---- untrusted checkpoints -------------------------------------------------------------------------
class _Exploit:
    """Unpickling this creates a directory: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_that_runs_code_is_refused_and_runs_nothing(hf_dirs, tmp_path):
    import torch

    model, src = hf_dirs("mamba")
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(src / "config.json", d)
    marker = tmp_path / "code-ran"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["backbone.embeddings.weight"] = _Exploit(marker)
    torch.save(state, d / "pytorch_model.bin")

    with pytest.raises(EdgeMambaError, match="refused: .* unpickling them could run code"):
        load_checkpoint(d)
    assert_user_error(cli("inspect", d), "pytorch_model.bin: refused")
    assert not marker.exists()
    # the file really is an exploit: an unrestricted load runs it
    torch.load(d / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_remote_code_in_a_checkpoint_is_never_imported(hf_dirs, ckpt, tmp_path):
    src = hf_dirs("mamba")[1]
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    marker = tmp_path / "code-ran"
    (d / "modeling_evil.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n")
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.Config", "AutoModelForCausalLM": "modeling_evil.Model"}
    (d / "config.json").write_text(json.dumps(config))
    loaded = load_checkpoint(d)  # a plain Mamba config: loaded by us, its code ignored
    assert all(np.array_equal(loaded.weights[k], ckpt.weights[k]) for k in ckpt.weights)
    assert not marker.exists()
    # and no code path in the package could enable it
    source = "\n".join(p.read_text() for p in Path(edgemamba.__file__).parent.rglob("*.py"))
    for forbidden in ("trust_remote_code=True", "weights_only=False", "pickle.load(", "pickle.loads("):
        assert forbidden not in source, forbidden


def _safetensors(path: Path, header: dict, data_bytes: int) -> None:
    """A safetensors file with this header and `data_bytes` of (sparse) zero data."""
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.truncate(8 + len(h) + data_bytes)


def test_crafted_headers_cannot_make_us_allocate(hf_dirs, tmp_path, monkeypatch):
    import edgemamba.checkpoint as checkpoint_mod

    def no_reads(self, name):
        raise AssertionError(f"tensor data read ({name}) before the checks refused the file")

    monkeypatch.setattr(checkpoint_mod._SafetensorsTensors, "read", no_reads)
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(hf_dirs("mamba")[1] / "config.json", d)

    # a shape whose byte size overflows: refused by the header parser
    _safetensors(d / "model.safetensors", {"backbone.embeddings.weight": {
        "dtype": "F32", "shape": [2**40, 2**30], "data_offsets": [0, 16]}}, 16)
    with pytest.raises(EdgeMambaError, match="not a readable safetensors file"):
        load_checkpoint(d)

    # a consistent header whose shapes disagree with config.json: refused from the header alone
    _safetensors(d / "model.safetensors", {"backbone.embeddings.weight": {
        "dtype": "F32", "shape": [1 << 20, 1 << 12], "data_offsets": [0, 1 << 34]}}, 1 << 34)  # 16 GiB, sparse
    with pytest.raises(EdgeMambaError, match=r"has shape \(1048576, 4096\), expected \(96, 64\)"):
        load_checkpoint(d)

    # a config within the spec's bounds and a matching (sparse) half terabyte of weights: refused
    # before reading, because it cannot fit this machine
    config = {"model_type": "mamba", "hidden_size": 32768, "num_hidden_layers": 1, "vocab_size": 4_194_304,
              "state_size": 16, "expand": 1}
    (d / "config.json").write_text(json.dumps(config))
    spec = checkpoint_mod.spec_from_config(config)
    source_name = {v: k for k, v in {**checkpoint_mod._GLOBAL_NAMES, **{
        f"backbone.layers.0.{k}": f"layers.0.{v}" for k, v in checkpoint_mod._LAYER_NAMES.items()}}.items()}
    header, offset = {}, 0
    for canon, shape in spec.weight_shapes().items():
        name, n = source_name[canon], 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    try:
        _safetensors(d / "model.safetensors", header, offset)
    except OSError as e:
        pytest.skip(f"this filesystem cannot hold a sparse {offset / 2**40:.1f} TiB file ({e})")
    assert offset > 2**39
    with pytest.raises(EdgeMambaError, match="the weights need .* GiB as float32, more than this machine's memory"):
        load_checkpoint(d)


# ---- runtime inputs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragments", [
    (["--prompt-ids", "1,96"], ["token id 96 is outside the vocabulary [0, 96)"]),
    (["--prompt-ids", "-1"], ["token id -1 is outside the vocabulary"]),
    (["--prompt-ids", ""], ["empty prompt"]),
    (["--prompt-ids", "1,x"], ["--prompt-ids must be comma-separated integers"]),
    (["--prompt-ids", "1", "-n", "99999999999999999999"], ["max-new-tokens", "is not in the range"]),
    (["--prompt-ids", "1", "-n", "-1"], ["max-new-tokens"]),
    (["--prompt-ids", "1", "--temperature", "-1"], ["temperature must be"]),
    (["--prompt-ids", "1", "--top-p", "0"], ["top_p must be in (0, 1]"]),
    (["--prompt", "hello"], ["this artifact has no tokenizer"]),
    (["--prompt-ids", "1", "--state-in", "/nonexistent/x.state"], ["no such state file"]),
])
def test_bad_runtime_inputs_through_the_cli(art, args, fragments):
    assert_user_error(cli("run", art.path, *args), *fragments)


def test_absurd_inputs_in_a_real_process(art):
    """The same one-line contract when the process itself exits (no click test runner around it)."""
    assert_user_error(run_cli("run", art.path, "--prompt-ids", "5", "-n", str(2**41)), "max-new-tokens")


def test_infinite_logits_are_reported_not_streamed(ckpt, tmp_path):
    weights = {**ckpt.weights, "norm_f": ckpt.weights["norm_f"] * np.float32(1e38)}
    broken = type(ckpt)(ckpt.spec, weights)
    with np.errstate(over="ignore"):
        logits, _ = Reference(broken).forward(np.array([[1, 2, 3]]))
    assert not np.isfinite(logits[0, -1]).all()  # the model itself overflows (independent check)
    art = compile_artifact(broken, tmp_path / "inf.em")
    with pytest.raises(EdgeMambaError, match="NaN/inf logits; refusing to sample"):
        list(Session(art).generate([1, 2, 3], 5))
    for extra in ([], ["--json"], ["--temperature", "0.8", "--seed", "1"]):
        r = cli("run", art.path, "--prompt-ids", "1,2,3", "-n", "5", *extra)
        assert_user_error(r, "NaN/inf logits")
        assert r.stdout.strip() == "", "no token may be printed from non-finite logits"


# ---- concurrency ---------------------------------------------------------------------------------------
def test_threads_with_their_own_sessions_match_one_thread(art, ckpt):
    """N threads, each with its own Session on one loaded artifact: exactly the one-thread outputs."""
    prompts = [random_ids((n,), seed=n) for n in (3, 9, 5, 12)]
    params = [SamplingParams(temperature=0.9, top_k=30, seed=i) for i in range(len(prompts))]

    def work(session, order):
        out = {}
        for i in order:
            session.reset()
            logits = session.prefill(prompts[i]).copy()
            session.reset()
            out[i] = (logits, list(session.generate(prompts[i], 24, sampling=params[i], stop=[])))
        return out

    expected = work(Session(art, threads=1), range(len(prompts)))
    assert expected[0][1] != expected[1][1]  # the cases differ, so a mix-up would show
    greedy = list(Session(art, threads=1).generate(prompts[0], 24, stop=[]))
    assert greedy == Reference(ckpt).greedy(prompts[0], 24)  # the one-thread run is itself right

    n_threads = 4
    barrier = threading.Barrier(n_threads)
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def run(t):
        try:
            session = Session(art, threads=1)
            barrier.wait()
            order = [(t + k) % len(prompts) for k in range(len(prompts))] * 2  # every prompt, twice
            results[t] = work(session, order)
        except BaseException as e:  # reported below, with the thread's failure
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    assert len(results) == n_threads
    for out in results.values():
        for i, (logits, tokens) in out.items():
            assert np.array_equal(logits, expected[i][0]) and tokens == expected[i][1]


def test_one_session_from_two_threads_is_refused_clearly(art, ckpt):
    s = Session(art, threads=1)
    inside, release = threading.Event(), threading.Event()
    real_step = s.backend.step

    def slow_step(ids):  # holds the session inside a step until the main thread has tried
        inside.set()
        release.wait(30)
        return real_step(ids)

    s.backend.step = slow_step
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("logits", s.step([7]).copy()))
    worker.start()
    assert inside.wait(30)
    with pytest.raises(EdgeMambaError, match="in use by another thread; give each thread its own Session"):
        s.step([8])
    with pytest.raises(EdgeMambaError, match="in use by another thread"):
        s.prefill([8, 9])
    release.set()
    worker.join(30)
    s.backend.step = real_step
    expected, _ = Reference(ckpt).forward(np.array([[7]]))
    assert_logits_close(out["logits"][0], expected[0, -1])  # the worker's step ran whole

    # between the tokens of an unfinished generate(), another thread cannot slip in a step
    s.reset()
    gen = s.generate([1, 2, 3], 8, stop=[])
    first = [next(gen), next(gen)]
    caught = []
    t = threading.Thread(target=lambda: caught.extend(_refusal(lambda: s.step([5]))))
    t.start()
    t.join(30)
    assert caught and "in use by another thread" in caught[0]
    rest = list(gen)
    assert first + rest == Reference(ckpt).greedy(np.array([1, 2, 3]), 8)  # the stream was not disturbed
    s.step([5])  # and once it ends, the session is free again


def _refusal(fn) -> list[str]:
    try:
        fn()
    except EdgeMambaError as e:
        return [str(e)]
    return []


# ---- failed writes -------------------------------------------------------------------------------------
def _fail(monkeypatch, target, name, err, when=lambda *a, **k: True):
    real = getattr(target, name)

    def failing(*args, **kwargs):
        if when(*args, **kwargs):
            raise OSError(err, os.strerror(err))
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)


def test_state_write_that_fails_leaves_the_old_file_and_no_temporary(art, tmp_path, monkeypatch):
    s = Session(art)
    s.prefill([1, 2, 3])
    path = tmp_path / "chat.state"
    s.save_state(path)
    before = path.read_bytes()
    s.step([4])

    with monkeypatch.context() as m:
        _fail(m, os, "fsync", errno.ENOSPC)  # the disk fills while the new state is written
        with pytest.raises(EdgeMambaError, match=r"chat.state: write failed \(No space left on device\); nothing"):
            s.save_state(path)
    assert path.read_bytes() == before and no_temporaries(tmp_path)

    with monkeypatch.context() as m:  # no permission to create a file here
        _fail(m, os, "open", errno.EACCES, when=lambda p, *a, **k: str(p).startswith(str(tmp_path)))
        with pytest.raises(EdgeMambaError, match=r"write failed \(Permission denied\)"):
            s.save_state(tmp_path / "new.state")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.state"]
    # through the CLI: a state path that cannot exist (under a regular file)
    assert_user_error(cli("run", art.path, "--prompt-ids", "1", "-n", "1", "--state-out", path / "x.state"),
                      "write failed")


def test_artifact_write_that_fails_leaves_nothing_half_written(ckpt, art, tmp_path, monkeypatch):
    import edgemamba.export as export_mod

    real_save = export_mod.save_graphs

    def save_then_disk_full(models, out_dir):
        real_save(models, out_dir)  # a whole set of files written into the temporary ...
        with open(out_dir / "weights.bin", "ab") as f:
            f.write(b"\0" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # ... then the disk is full

    monkeypatch.setattr(export_mod, "save_graphs", save_then_disk_full)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(EdgeMambaError, match=r"new.em: write failed \(No space left on device\); nothing was written"):
        compile_artifact(ckpt, out / "new.em")
    assert list(out.iterdir()) == []

    existing = copy_artifact(art, out / "old.em")  # --force over an artifact: the old one survives
    with pytest.raises(EdgeMambaError, match="No space left on device"):
        compile_artifact(ckpt, existing, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["old.em"]
    load_artifact(existing)  # still whole: every checksum verifies
    monkeypatch.setattr(export_mod, "save_graphs", real_save)

    # the final rename fails: the previous artifact is put back, not left aside
    real_replace = os.replace
    _fail(monkeypatch, os, "replace", errno.EIO, when=lambda src, *a, **k: str(src).endswith(".tmp"))
    with pytest.raises(EdgeMambaError, match="write failed"):
        compile_artifact(ckpt, existing, force=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in out.iterdir()) == ["old.em"]
    load_artifact(existing)

    # no permission / not a directory: one line from the CLI, nothing created
    assert_user_error(cli("export", ckpt.path, "-o", existing / "manifest.json" / "x"), "cannot write here")
    with monkeypatch.context() as m:
        _fail(m, os, "mkdir", errno.EACCES, when=lambda p, *a, **k: str(p).startswith(str(out)))
        assert_user_error(cli("compile", ckpt.path, "-o", out / "denied.em"), "cannot write here (Permission denied)")
    assert sorted(p.name for p in out.iterdir()) == ["old.em"]


def test_atomic_write_bytes_leaves_whole_files(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(path, b"second version")
    assert path.read_bytes() == b"second version" and no_temporaries(tmp_path)
    with pytest.raises(EdgeMambaError, match="write failed"):
        atomic_write_bytes(tmp_path / "missing-dir" / "f.bin", b"x")
