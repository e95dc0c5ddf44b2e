"""The CLI as a user meets it: real processes, exit codes, one-line errors."""

import json
import subprocess
import sys

import pytest


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "edgemamba", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_inspect_json(hf_dirs):
    model, d = hf_dirs("mamba2-g2-tied")
    r = run_cli("inspect", d, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["n_params"] == sum(p.numel() for p in model.parameters())
    assert info["weight_bytes_by_dtype"] == {"F32": 4 * info["n_params"]}
    assert info["spec"]["n_groups"] == 2 and info["spec"]["arch"] == "mamba2"
    assert info["ssm_state_shape"] == [1, 8, 16, 16]
    r = run_cli("inspect", d)
    assert r.returncode == 0 and "Mamba-2" in r.stdout and "per sequence" in r.stdout


def _broken_copy(tmp_path, src, mutate):
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    mutate(d)
    return d


@pytest.mark.parametrize(
    "case, mutate, fragments",
    [
        ("truncated", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
         ["model.safetensors"]),
        ("corrupt", lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64 + (d / "model.safetensors").read_bytes()[64:]),
         ["model.safetensors", "not a readable safetensors file"]),
        ("malformed-config", lambda d: (d / "config.json").write_text('{"model_type": "mamba", '),
         ["config.json", "malformed JSON"]),
        ("bad-field", lambda d: (d / "config.json").write_text('{"model_type": "mamba", "hidden_size": "big"}'),
         ["config.json", "hidden_size"]),
        ("no-weights", lambda d: (d / "model.safetensors").unlink(), ["no weights found"]),
    ],
)
def test_bad_checkpoints_get_one_line_errors(case, mutate, fragments, tmp_path, hf_dirs):
    d = _broken_copy(tmp_path, hf_dirs("mamba")[1], mutate)
    for cmd in (["inspect", d], ["inspect", d, "--json"]):
        assert_user_error(run_cli(*cmd), *fragments)


def test_missing_directory(tmp_path):
    assert_user_error(run_cli("inspect", tmp_path / "nope"), "no such checkpoint directory")
