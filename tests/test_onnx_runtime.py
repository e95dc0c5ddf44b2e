"""Export + ONNX Runtime + Session against the NumPy reference and transformers."""

import json

import numpy as np
import onnx
import pytest
from conftest import KINDS, assert_logits_close, build_hf_model, hf_greedy, random_ids

from edgemamba import EdgeMambaError, Session, load_checkpoint
from edgemamba.artifact import compile_artifact
from edgemamba.reference import Reference
from edgemamba.sampling import SamplingParams


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, hf_dirs):
    cache = {}

    def get(kind):
        if kind not in cache:
            _, d = hf_dirs(kind)
            ck = load_checkpoint(d)
            cache[kind] = (ck, compile_artifact(ck, tmp_path_factory.mktemp("art") / f"{kind}.em"))
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", list(KINDS))
def test_exported_graphs_are_standard_onnx(kind, hf_dirs, tmp_path):
    # `edgemamba export` (no target passes) must run on any ONNX runtime: standard operators only.
    # Target artifacts may add their runtime's fused ops (ort-cpu: SimplifiedLayerNormalization).
    from edgemamba.export import export

    ck = load_checkpoint(hf_dirs(kind)[1])
    files = export(ck, tmp_path)
    for graph in ("step", "prefill"):
        path = files[graph]
        onnx.checker.check_model(str(path), full_check=True)  # includes shape inference
        model = onnx.load(str(path), load_external_data=False)
        assert {o.domain for o in model.opset_import} == {""} and model.opset_import[0].version >= 17
        names_in = [i.name for i in model.graph.input]
        names_out = [o.name for o in model.graph.output]
        assert names_in[0] == "input_ids" and names_out[0] == "logits"
        n = ck.spec.n_layer
        assert names_in[1:] == [f"past_{k}_state.{i}" for i in range(n) for k in ("conv", "ssm")]
        assert names_out[1:] == [f"present_{k}_state.{i}" for i in range(n) for k in ("conv", "ssm")]
        assert all(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer
                   if init.name.startswith("layers.0.in_proj"))
    prefill = onnx.load(str(files["prefill"]), load_external_data=False)
    assert sum(node.op_type == "Scan" for node in prefill.graph.node) == ck.spec.n_layer  # one scan per layer


@pytest.mark.parametrize("kind", list(KINDS))
def test_prefill_and_step_match_reference(kind, artifacts):
    ck, art = artifacts(kind)
    ref = Reference(ck)
    ids = random_ids((72,), seed=7)
    full, _ = ref.forward(ids[None])
    session = Session(art)
    session.prefill_chunk = 24  # several prefill chunks carry the state between graph calls
    logits = [session.prefill(ids[:40])]
    for t in range(40, 72):
        logits.append(session.step([ids[t]])[0].copy())
    assert_logits_close(np.stack(logits), full[0, 39:])
    # score() gives teacher-forced logits at every position
    assert_logits_close(session.score(ids), full[0])


@pytest.mark.parametrize("kind", ["mamba", "falcon", "mamba2-g2-tied"])
def test_greedy_generation_equals_reference_and_transformers(kind, artifacts, hf_dirs):
    ck, art = artifacts(kind)
    model, _ = hf_dirs(kind)
    prompt = random_ids((10,), seed=11)
    got = list(Session(art).generate(prompt, 20, stop=[]))
    assert got == Reference(ck).greedy(prompt, 20)
    assert got == hf_greedy(model, prompt, 20)


def test_saved_state_continues_identically(artifacts, tmp_path):
    _, art = artifacts("mamba2")
    prompt = random_ids((16,), seed=2)
    whole = list(Session(art).generate(prompt, 30, stop=[]))
    s = Session(art)
    first = list(s.generate(prompt, 12, stop=[]))
    s.save_state(tmp_path / "conv.state")
    resumed = Session(art)
    resumed.load_state(tmp_path / "conv.state")
    assert resumed.positions[0] == 16 + 12
    rest = list(resumed.generate(None, 18, stop=[]))
    assert first + rest == whole
    # in-memory snapshot round trip too
    snap = s.get_state()
    s.reset()
    s.set_state(snap, position=28)
    assert all(np.array_equal(snap[k], v[0]) for k, v in s.backend.state.items())


def test_state_from_another_model_is_refused(artifacts, tmp_path):
    _, a = artifacts("mamba")
    _, b = artifacts("falcon")  # same tensor shapes, different numerics: must still be refused
    s = Session(a)
    s.prefill([1, 2, 3])
    s.save_state(tmp_path / "a.state")
    with pytest.raises(EdgeMambaError, match="state is from another model"):
        Session(b).load_state(tmp_path / "a.state")
    (tmp_path / "junk.state").write_bytes(b"\x00" * 100)
    with pytest.raises(EdgeMambaError, match="not a readable state file"):
        Session(a).load_state(tmp_path / "junk.state")


def test_batch_of_three_equals_three_single_runs(artifacts):
    _, art = artifacts("mamba2-g2-tied")
    prompts = [random_ids((n,), seed=n) for n in (5, 13, 8)]
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=4)
    batched = Session(art, batch=3).generate_batch(prompts, 16, sampling=params, stop=[])
    for i, p in enumerate(prompts):
        single = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=4 + i)
        assert batched[i] == list(Session(art).generate(p, 16, sampling=single, stop=[]))


def test_sampling_is_seeded_and_respects_top_k(artifacts):
    _, art = artifacts("mamba")
    p = SamplingParams(temperature=1.5, top_k=3, seed=9)
    a = list(Session(art).generate([1, 2, 3], 24, sampling=p, stop=[]))
    b = list(Session(art).generate([1, 2, 3], 24, sampling=p, stop=[]))
    assert a == b
    # every sampled token is among the 3 most likely under the reference
    ck, _ = artifacts("mamba")
    ref = Reference(ck)
    logits, state = ref.forward(np.array([[1, 2, 3]]))
    last = logits[0, -1]
    for tok in a:
        assert tok in np.argsort(-last)[:3]
        last, state = ref.step(np.array([tok]), state)
        last = last[0]
    c = list(Session(art).generate([1, 2, 3], 24, sampling=SamplingParams(temperature=1.5, top_k=3, seed=10), stop=[]))
    assert c != a


def test_stop_tokens_and_bad_runtime_inputs(artifacts):
    ck, art = artifacts("mamba")
    greedy = Reference(ck).greedy(np.array([4, 5, 6]), 10)
    out = list(Session(art).generate([4, 5, 6], 10, stop=[greedy[3]]))
    assert out == greedy[: greedy.index(greedy[3]) + 1]
    s = Session(art)
    with pytest.raises(EdgeMambaError, match="outside the vocabulary"):
        s.prefill([1, 96])
    with pytest.raises(EdgeMambaError, match="empty prompt"):
        s.prefill([])
    with pytest.raises(EdgeMambaError, match="max_new_tokens"):
        list(s.generate([1], -1))


def test_artifact_manifest_and_integrity(artifacts, tmp_path):
    import shutil

    from edgemamba.artifact import load_artifact

    ck, art = artifacts("mamba2")
    m = art.manifest
    assert m["format_version"] == 1 and m["target"] == "ort-cpu" and m["precision"] == "fp32"
    assert m["spec"] == ck.spec.to_dict() and m["spec_hash"] == ck.spec.spec_hash()
    assert [s["name"] for s in m["state"]][:2] == ["conv_state.0", "ssm_state.0"]
    assert m["state"][1]["shape"] == ["batch", 8, 16, 16]
    bad = tmp_path / "bad.em"
    shutil.copytree(art.path, bad)
    raw = bytearray((bad / "weights.bin").read_bytes())
    raw[100] ^= 0xFF
    (bad / "weights.bin").write_bytes(bytes(raw))
    with pytest.raises(EdgeMambaError, match="checksum does not match"):
        load_artifact(bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgeMambaError, match="newer than this edgemamba supports"):
        load_artifact(bad)


def test_failed_compile_leaves_nothing(tmp_path, monkeypatch):
    import edgemamba.export as export_mod

    ck = load_checkpoint(build_hf_model("mamba"))

    def boom(*a, **k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(export_mod, "save_graphs", boom)
    with pytest.raises(RuntimeError):
        compile_artifact(ck, tmp_path / "out.em")
    assert list(tmp_path.iterdir()) == []
