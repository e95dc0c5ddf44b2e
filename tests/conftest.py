"""Test models: random-weight transformers models built from small configs at test time."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 96

# name -> (transformers class, config kwargs). Small, but every quirk the loaders handle.
KINDS = {
    "mamba": ("MambaForCausalLM", dict(hidden_size=64, state_size=8, num_hidden_layers=3)),
    "mamba-untied-bias": (
        "MambaForCausalLM",
        dict(hidden_size=48, state_size=4, num_hidden_layers=2, tie_word_embeddings=False, use_bias=True,
             use_conv_bias=False, layer_norm_epsilon=1e-6, time_step_rank=5),
    ),
    "falcon": ("FalconMambaForCausalLM", dict(hidden_size=64, state_size=8, num_hidden_layers=3, mixer_rms_eps=1e-5)),
    "mamba2": (
        "Mamba2ForCausalLM",
        dict(hidden_size=64, num_heads=8, head_dim=16, state_size=16, n_groups=1, num_hidden_layers=2, chunk_size=16),
    ),
    "mamba2-g2-tied": (
        "Mamba2ForCausalLM",
        dict(hidden_size=64, num_heads=8, head_dim=16, state_size=16, n_groups=2, num_hidden_layers=3, chunk_size=16,
             tie_word_embeddings=True),
    ),
}
MAMBA2_KINDS = [k for k in KINDS if k.startswith("mamba2")]


def build_hf_model(kind: str, seed: int = 0, **overrides):
    """A random-weight transformers model. Norm weights, D and biases are perturbed away from
    their constant initial values, so a wrongly applied norm or skip term shows in the logits."""
    cls_name, kwargs = KINDS[kind]
    cls = getattr(transformers, cls_name)
    config = cls.config_class(vocab_size=VOCAB, **{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.mul_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias") and "dt" not in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


def hf_greedy(model, prompt: np.ndarray, n_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompt)[None], max_new_tokens=n_new, min_new_tokens=n_new,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def random_ids(shape, seed=1, vocab=VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int64)


def assert_logits_close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-3):
    """Max abs difference within rel × the logits' max magnitude (the issue's criterion)."""
    scale = float(np.abs(expected).max())
    err = float(np.abs(actual - expected).max())
    assert np.all(np.isfinite(actual)), "non-finite logits"
    assert err <= rel * scale, f"max abs logit error {err:.3g} > {rel} × scale {scale:.3g}"


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """kind -> (model, checkpoint dir written by save_pretrained), built once per session."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            model = build_hf_model(kind)
            d = tmp_path_factory.mktemp(kind)
            model.save_pretrained(d)
            cache[kind] = (model, d)
        return cache[kind]

    return get


def write_mamba_ssm_checkpoint(model, d, vocab_unpadded: int | None = None):
    """Write an HF model in mamba_ssm's format: its config keys and `backbone.embedding` names."""
    cfg = model.config
    is2 = cfg.model_type == "mamba2"
    ssm_cfg = {"layer": "Mamba2" if is2 else "Mamba1", "d_state": cfg.state_size, "d_conv": cfg.conv_kernel,
               "expand": cfg.expand, "bias": cfg.use_bias, "conv_bias": cfg.use_conv_bias}
    if is2:
        ssm_cfg.update(headdim=cfg.head_dim, ngroups=cfg.n_groups,
                       dt_limit=[0.0, float("inf")] if math.isinf(cfg.time_step_limit[1]) else list(cfg.time_step_limit))
    else:
        ssm_cfg["dt_rank"] = cfg.time_step_rank
    config = {
        "d_model": cfg.hidden_size, "d_intermediate": 0, "n_layer": cfg.num_hidden_layers,
        "vocab_size": vocab_unpadded or cfg.vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {},
        "rms_norm": True, "residual_in_fp32": cfg.residual_in_fp32, "fused_add_norm": True,
        "pad_vocab_size_multiple": 8, "tie_embeddings": cfg.tie_word_embeddings,
    }
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))  # Python writes Infinity, as mamba_ssm does
    state = {}
    for name, t in model.state_dict().items():
        name = name.replace("backbone.embeddings.", "backbone.embedding.")
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        state[name] = t.clone()
    torch.save(state, d / "pytorch_model.bin")
    return d
