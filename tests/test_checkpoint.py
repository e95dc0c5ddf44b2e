"""Loaders: every checkpoint layout maps onto the same spec and the same weights."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import KINDS, build_hf_model, hf_logits, random_ids, write_mamba_ssm_checkpoint, assert_logits_close

from edgemamba import EdgeMambaError, load_checkpoint
from edgemamba.checkpoint import read_spec
from edgemamba.reference import Reference


@pytest.mark.parametrize("kind", list(KINDS))
def test_spec_counts_parameters_like_torch(kind, hf_dirs):
    model, d = hf_dirs(kind)
    spec = load_checkpoint(d).spec
    n_torch = sum(p.numel() for p in model.parameters())  # tied weights are counted once by torch
    assert spec.n_params == n_torch
    assert spec.tie_embeddings == model.config.tie_word_embeddings
    # the state a sequence needs, from the spec, is what transformers' cache would hold, minus
    # its extra conv column (we keep d_conv-1 inputs)
    per_layer = spec.conv_dim * (spec.d_conv - 1) + math.prod(spec.ssm_state_shape(1))
    assert spec.state_bytes(1) == 4 * spec.n_layer * per_layer


def test_sharded_safetensors_and_pytorch_bin_load_identically(tmp_path):
    model = build_hf_model("mamba2-g2-tied")
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    a, b, c = (load_checkpoint(tmp_path / n) for n in ("single", "sharded", "bin"))
    assert a.spec == b.spec == c.spec
    for name in a.weights:
        np.testing.assert_array_equal(a.weights[name], b.weights[name])
        np.testing.assert_array_equal(a.weights[name], c.weights[name])


def test_bf16_checkpoint_loads_in_float32(tmp_path):
    model = build_hf_model("mamba").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    ck = load_checkpoint(tmp_path)
    assert ck.weights["embedding"].dtype == np.float32
    assert set(ck.source_bytes_by_dtype) == {"BF16"}
    np.testing.assert_array_equal(ck.weights["embedding"], model.backbone.embeddings.weight.detach().float().numpy())


@pytest.mark.parametrize("kind", ["mamba-untied-bias", "mamba2-g2-tied"])
def test_mamba_ssm_checkpoint_loads_to_same_spec_and_logits(kind, tmp_path):
    model = build_hf_model(kind, layer_norm_epsilon=1e-5)  # mamba_ssm's fixed norm epsilon
    d = write_mamba_ssm_checkpoint(model, tmp_path / "ssm", vocab_unpadded=90)  # padded to 96
    hf = load_checkpoint(model)
    ssm = load_checkpoint(d)
    assert ssm.spec.vocab_size == 96
    assert ssm.spec.source.startswith("mamba_ssm:")
    same = lambda s: {k: v for k, v in s.to_dict().items() if k not in ("source", "eos_token_id")}  # noqa: E731
    assert same(ssm.spec) == same(hf.spec)
    ids = random_ids((1, 64))
    logits, _ = Reference(ssm).forward(ids)
    assert_logits_close(logits, hf_logits(model, ids))


def test_transformers_json_infinity(tmp_path, hf_dirs):
    _, d = hf_dirs("mamba2")
    config = json.loads((d / "config.json").read_text())
    config["time_step_limit"] = [0.0, {"__float__": "Infinity"}]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(d / "model.safetensors")
    spec, by_dtype = read_spec(tmp_path)
    assert spec.dt_limit == (0.0, math.inf)
    assert by_dtype == {"F32": spec.n_params * 4}


# ---- bad input ------------------------------------------------------------------------------
def _copy_ckpt(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_unsupported_model_type_lists_supported(tmp_path, hf_dirs):
    d = _copy_ckpt(hf_dirs("mamba")[1], tmp_path / "c")
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgeMambaError, match=r"unsupported model_type 'llama'.*mamba, mamba2, falcon_mamba"):
        load_checkpoint(d)


def test_missing_and_misshaped_tensors_are_named(tmp_path, hf_dirs):
    from safetensors.numpy import load_file, save_file

    src = hf_dirs("mamba")[1]
    tensors = load_file(src / "model.safetensors")
    d = _copy_ckpt(src, tmp_path / "missing")
    save_file({k: v for k, v in tensors.items() if k != "backbone.layers.1.mixer.A_log"}, d / "model.safetensors")
    with pytest.raises(EdgeMambaError, match=r"layers\.1\.A_log is missing \(expected shape \(128, 8\)\)"):
        load_checkpoint(d)
    d = _copy_ckpt(src, tmp_path / "misshaped")
    bad = dict(tensors)
    bad["backbone.layers.2.mixer.x_proj.weight"] = np.zeros((21, 128), np.float32)  # dt_rank 4 + 2·8 = 20 rows
    save_file(bad, d / "model.safetensors")
    with pytest.raises(EdgeMambaError, match=r"'backbone\.layers\.2\.mixer\.x_proj\.weight' has shape \(21, 128\), expected \(20, 128\)"):
        load_checkpoint(d)


def test_nan_weights_are_refused(tmp_path, hf_dirs):
    from safetensors.numpy import load_file, save_file

    src = hf_dirs("mamba")[1]
    tensors = load_file(src / "model.safetensors")
    tensors["backbone.norm_f.weight"][3] = np.nan
    d = _copy_ckpt(src, tmp_path / "nan")
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(EdgeMambaError, match="norm_f.weight' contains NaN"):
        load_checkpoint(d)
