"""Accuracy of an artifact against the float32 NumPy reference of its checkpoint.

Teacher-forced over N tokens of real text: top-1 agreement, mean KL(reference‖artifact), max abs
logit error, perplexity of both, relative state error after N tokens, and the length of the
identical greedy continuation. Each precision has thresholds; verify fails past them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemamba.errors import EdgeMambaError


@dataclass(frozen=True)
class Thresholds:
    min_top1: float  # fraction of positions whose argmax agrees
    max_ppl_increase: float  # relative perplexity increase allowed


# The precision issue's bars: fp16 top-1 ≥ 99.5% and perplexity ≤ +0.1%; int8 ≥ 99% and ≤ +0.5%;
# w8a8 ≤ +2%; int4 (block 64) ≤ +4% (no top-1 bar for those two). fp32 must be the reference.
THRESHOLDS = {
    "fp32": Thresholds(0.999, 0.0001),
    "fp16": Thresholds(0.995, 0.001),
    "bf16": Thresholds(0.99, 0.005),
    "int8": Thresholds(0.99, 0.005),
    "w8a8": Thresholds(0.0, 0.02),
    "int4": Thresholds(0.0, 0.04),
}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compare_logits(ref: np.ndarray, art: np.ndarray, ids: np.ndarray) -> dict:
    """ref/art: teacher-forced logits (n, vocab) where row j predicts ids[j+1]."""
    lr, la = _log_softmax(ref[:-1]), _log_softmax(art[:-1])
    targets = ids[1:]
    rows = np.arange(targets.size)
    nll_ref, nll_art = -lr[rows, targets].mean(), -la[rows, targets].mean()
    return {
        "tokens": int(ids.size),
        "top1_agreement": float((ref.argmax(-1) == art.argmax(-1)).mean()),
        "mean_kl": float((np.exp(lr) * (lr - la)).sum(-1).mean()),
        "max_abs_logit_error": float(np.abs(ref - art).max()),
        "logit_scale": float(np.abs(ref).max()),
        "ppl_reference": float(np.exp(nll_ref)),
        "ppl_artifact": float(np.exp(nll_art)),
        "ppl_increase": float(np.exp(nll_art - nll_ref) - 1.0),
    }


def verify_artifact(artifact_path, checkpoint, ids, greedy_tokens: int = 64, threads: int | None = None) -> dict:
    from edgemamba.checkpoint import load_checkpoint
    from edgemamba.reference import Reference
    from edgemamba.session import Session

    ids = np.asarray(ids, dtype=np.int64)
    if ids.size < 2:
        raise EdgeMambaError("verify needs at least 2 tokens of text")
    session = Session(artifact_path, threads=threads)
    ckpt = load_checkpoint(checkpoint)
    if ckpt.spec.spec_hash() != session.spec.spec_hash():
        raise EdgeMambaError(f"{checkpoint}: not the checkpoint this artifact was compiled from (spec differs)")
    ref = Reference(ckpt)
    ref_logits, ref_state = ref.forward(ids[None])
    ref_logits = ref_logits[0]
    art_logits = session.score(ids)
    report = compare_logits(ref_logits, art_logits, ids)

    # state after N tokens, both ways
    session.reset()
    session.prefill(ids)
    art_state = session.get_state()
    num = sum(float(np.sum((art_state[f"{k}_state.{i}"] - getattr(ref_state, k)[i][0]) ** 2))
              for i in range(ckpt.spec.n_layer) for k in ("conv", "ssm"))
    den = sum(float(np.sum(getattr(ref_state, k)[i][0] ** 2)) for i in range(ckpt.spec.n_layer) for k in ("conv", "ssm"))
    report["state_rel_error"] = float(np.sqrt(num / max(den, 1e-30)))

    # identical greedy continuation from the first half of the text
    prompt = ids[: max(1, ids.size // 2)]
    expected = ref.greedy(prompt, greedy_tokens)
    session.reset()
    got = list(session.generate(prompt, greedy_tokens, stop=[]))
    same = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), greedy_tokens)
    report["greedy_identical_tokens"] = int(same)
    report["greedy_tokens"] = greedy_tokens

    precision = session.artifact.precision
    t = THRESHOLDS.get(precision, THRESHOLDS["int4"])
    report["precision"] = precision
    report["thresholds"] = {"min_top1": t.min_top1, "max_ppl_increase": t.max_ppl_increase}
    report["passed"] = bool(report["top1_agreement"] >= t.min_top1 and report["ppl_increase"] <= t.max_ppl_increase)
    return report


def read_ids(path, tokenizer, max_tokens: int) -> np.ndarray:
    """Token ids of a text file (tokenized), or of a file of comma/whitespace-separated integers."""
    from pathlib import Path

    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        raise EdgeMambaError(f"{path}: no such text file") from None
    tokens = text.replace(",", " ").split()
    if tokens and all(t.isdigit() for t in tokens[:1000]):
        ids = [int(t) for t in tokens]
    elif tokenizer is None:
        raise EdgeMambaError(f"{path}: the artifact has no tokenizer; give a file of token ids instead")
    else:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
    return np.asarray(ids[:max_tokens], dtype=np.int64)


def summary(report: dict) -> str:
    ok = "PASS" if report["passed"] else "FAIL"
    return (f"{ok} {report['precision']}: top-1 {report['top1_agreement']:.2%} (≥ {report['thresholds']['min_top1']:.1%}), "
            f"perplexity {report['ppl_reference']:.3f} -> {report['ppl_artifact']:.3f} "
            f"({report['ppl_increase']:+.2%}, ≤ +{report['thresholds']['max_ppl_increase']:.1%}), "
            f"KL {report['mean_kl']:.2e}, max |Δlogit| {report['max_abs_logit_error']:.3g}, "
            f"state error {report['state_rel_error']:.2e}, greedy identical {report['greedy_identical_tokens']}/"
            f"{report['greedy_tokens']} over {report['tokens']} tokens")
