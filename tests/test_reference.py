"""The NumPy reference against Hugging Face transformers, on random weights."""

import numpy as np
import pytest
from conftest import KINDS, assert_logits_close, build_hf_model, hf_greedy, hf_logits, random_ids

from edgemamba import load_checkpoint
from edgemamba.reference import Reference


@pytest.mark.parametrize("kind", list(KINDS))
def test_teacher_forced_logits_match_transformers(kind, hf_dirs):
    model, d = hf_dirs(kind)
    ids = random_ids((2, 72))
    expected = hf_logits(model, ids)
    ref = Reference(load_checkpoint(d))
    logits, _ = ref.forward(ids)
    assert logits.shape == expected.shape
    assert_logits_close(logits, expected)
    # float64 agrees too (the float32 match is not an accident of shared rounding)
    logits64, _ = Reference(load_checkpoint(d), dtype=np.float64).forward(ids)
    assert logits64.dtype == np.float64
    assert_logits_close(logits64, expected)


@pytest.mark.parametrize("kind", list(KINDS))
def test_greedy_continuation_matches_transformers(kind, hf_dirs):
    model, d = hf_dirs(kind)
    prompt = random_ids((12,), seed=3)
    assert Reference(load_checkpoint(d)).greedy(prompt, 24) == hf_greedy(model, prompt, 24)


@pytest.mark.parametrize("kind", ["mamba", "falcon", "mamba2-g2-tied"])
def test_prefill_then_steps_equals_full_forward(kind, hf_dirs):
    _, d = hf_dirs(kind)
    ref = Reference(load_checkpoint(d), dtype=np.float64)
    ids = random_ids((3, 40), seed=5)
    full, full_state = ref.forward(ids)
    logits, state = ref.forward(ids[:, :17])
    stepped = [logits[:, -1]]
    for t in range(17, 40):
        step_logits, state = ref.step(ids[:, t], state)
        stepped.append(step_logits)
    np.testing.assert_allclose(np.stack(stepped, 1), full[:, 16:], rtol=0, atol=1e-9 * np.abs(full).max())
    for a, b in zip(state.ssm + state.conv, full_state.ssm + full_state.conv):
        np.testing.assert_allclose(a, b, atol=1e-10)


def test_state_is_fixed_size(hf_dirs):
    _, d = hf_dirs("mamba")
    ck = load_checkpoint(d)
    ref = Reference(ck)
    _, s1 = ref.forward(random_ids((1, 3)))
    _, s2 = ref.forward(random_ids((1, 200)))
    sizes = lambda s: [a.nbytes for a in s.conv + s.ssm]  # noqa: E731
    assert sizes(s1) == sizes(s2)
    assert sum(sizes(s1)) == ck.spec.state_bytes(1)


def test_mamba2_time_step_limit_is_applied():
    # A tight Δ clamp changes the output; the reference must follow transformers' clamped forward.
    model = build_hf_model("mamba2", time_step_limit=(0.0, 0.05))
    ids = random_ids((1, 48))
    ck = load_checkpoint(model)
    assert ck.spec.dt_limit == (0.0, 0.05)
    logits, _ = Reference(ck).forward(ids)
    assert_logits_close(logits, hf_logits(model, ids))
    unclamped = build_hf_model("mamba2")
    assert not np.allclose(hf_logits(unclamped, ids), logits, atol=1e-3)
