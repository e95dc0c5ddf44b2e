"""edgemamba verify: its figures against torch's own definitions, and its exit codes."""

import json

import numpy as np
import torch
from conftest import build_hf_model
from test_cli import run_cli

from edgemamba.verify import compare_logits


def test_metrics_match_torch_definitions():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((50, 30)).astype(np.float32) * 3
    art = ref + rng.standard_normal((50, 30)).astype(np.float32) * 0.5
    ids = rng.integers(0, 30, 50)
    r = compare_logits(ref, art, ids)
    t_ref, t_art, t_ids = torch.from_numpy(ref).double(), torch.from_numpy(art).double(), torch.from_numpy(ids)
    ppl = lambda x: torch.exp(torch.nn.functional.cross_entropy(x[:-1], t_ids[1:])).item()  # noqa: E731
    assert np.isclose(r["ppl_reference"], ppl(t_ref)) and np.isclose(r["ppl_artifact"], ppl(t_art))
    kl = torch.nn.functional.kl_div(t_art[:-1].log_softmax(-1), t_ref[:-1].log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    assert np.isclose(r["mean_kl"], kl)
    assert r["top1_agreement"] == float((ref.argmax(-1) == art.argmax(-1)).mean())
    assert compare_logits(ref, ref, ids)["mean_kl"] == 0.0


def test_verify_cli_passes_and_fails(tmp_path):
    a, b = build_hf_model("mamba", seed=1), build_hf_model("mamba", seed=2)  # same spec, other weights
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    text = tmp_path / "ids.txt"
    text.write_text(" ".join(str(i) for i in np.random.default_rng(3).integers(0, 96, 200)))
    assert run_cli("compile", tmp_path / "a", "--precision", "fp16", "-o", tmp_path / "a.em").returncode == 0
    ok = run_cli("verify", tmp_path / "a.em", "--reference", tmp_path / "a", "--text", text, "--tokens", "128", "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["passed"] and report["top1_agreement"] >= 0.995 and report["greedy_identical_tokens"] == 64
    bad = run_cli("verify", tmp_path / "a.em", "--reference", tmp_path / "b", "--text", text, "--tokens", "128")
    assert bad.returncode == 1 and bad.stdout.startswith("FAIL fp16")
