#!/usr/bin/env python3
"""Train the tiny demo Mamba-1 model that ships in edgemamba/data/demo-mamba/.

The model is a `transformers.MambaForCausalLM` (~3.7M parameters) trained on
the CPython standard library sources installed on the machine, with a
byte-level BPE tokenizer (4096 tokens) trained on the same text.  A
deterministic set of modules is held out from both tokenizer and model
training, for perplexity / top-1 agreement checks (e.g. after quantization).

The work is split in three stages so that only the middle one needs a GPU:

  1. prepare (CPU, ~1 min): collect files, split train/held-out, train the
     tokenizer, tokenize, write token arrays + tokenizer into --prep-dir and
     the text files heldout.txt / calib.txt into --data-dir.

        python scripts/train_demo.py --prepare-only

  2. train (GPU, ~7 min on one H100): read --prep-dir, train until the step
     count or wall-clock budget is reached, evaluate held-out perplexity with
     the stock transformers code path, save the model + TRAINING.md.

        python scripts/train_demo.py --train --out-dir /tmp/demo-mamba

  3. sample (CPU): load the saved model with stock transformers, re-check
     held-out perplexity, generate greedy samples, append them to TRAINING.md.

        python scripts/train_demo.py --sample --out-dir edgemamba/data/demo-mamba

Training uses an exact parallel (Hillis-Steele) scan for the selective SSM
instead of transformers' sequential per-token fallback (the mamba_ssm CUDA
kernels are not available).  It computes the same function as the stock
code (checked at start-up, see `check_fast_scan`) with the same parameters,
so the saved checkpoint is an ordinary MambaForCausalLM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
EOT = "<|endoftext|>"

# Directory names (any path component) and file-name prefixes that are not used.
EXCLUDED_DIRS = {
    "test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3",
    "turtledemo", "pydoc_data", "encodings", "ensurepip", "__pycache__",
    "__phello__", "lib-dynload",
}
EXCLUDED_PREFIXES = ("test_", "_sysconfigdata", "config-")
HELDOUT_BUCKETS = 20  # a file is held out iff sha1(relpath) % 20 == 0


# --------------------------------------------------------------------------
# Stage 1: data + tokenizer
# --------------------------------------------------------------------------

def path_hash(relpath: str) -> int:
    return int.from_bytes(hashlib.sha1(relpath.encode("utf-8")).digest()[:8], "big")


def collect_sources(stdlib: Path) -> tuple[dict[str, str], list[str]]:
    """Return {relpath: text} for the usable stdlib .py files, plus skipped paths."""
    texts, skipped = {}, []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        parts = rel.split("/")
        if any(p in EXCLUDED_DIRS or p.startswith("config-") for p in parts[:-1]):
            continue
        if parts[-1].startswith(EXCLUDED_PREFIXES):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            skipped.append(rel)
            continue
        if text.strip():
            texts[rel] = text
    return texts, skipped


def pick_text(files: list[str], texts: dict[str, str], target_bytes: int, max_file_bytes: int) -> tuple[str, list[str]]:
    """Concatenate whole files (in sha1 order, skipping large ones) until target_bytes."""
    chosen, parts, total = [], [], 0
    for rel in sorted(files, key=lambda r: hashlib.sha1(r.encode()).hexdigest()):
        body = texts[rel].rstrip() + "\n"
        n = len(body.encode("utf-8"))
        if n > max_file_bytes:
            continue
        chosen.append(rel)
        parts.append(body)
        total += n
        if total >= target_bytes:
            break
    return "\n\n".join(parts), chosen


def train_tokenizer(train_texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],  # -> id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts, trainer)
    assert tok.token_to_id(EOT) == 0, "the end-of-text token must be id 0"
    return tok


def encode_stream(tok, texts: list[str]) -> np.ndarray:
    """Tokenize documents and join them with <|endoftext|> (id 0) after each."""
    ids = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(0)
    return np.asarray(ids, dtype=np.uint16)


def prepare(args) -> None:
    from transformers import PreTrainedTokenizerFast

    t0 = time.time()
    stdlib = Path(args.stdlib_dir)
    texts, skipped = collect_sources(stdlib)
    heldout_files = [r for r in texts if path_hash(r) % HELDOUT_BUCKETS == 0]
    train_files = [r for r in texts if path_hash(r) % HELDOUT_BUCKETS != 0]
    print(f"{len(texts)} files from {stdlib}: {len(train_files)} train, {len(heldout_files)} held out "
          f"({len(skipped)} skipped as non-UTF-8)")

    tok = train_tokenizer([texts[r] for r in train_files], args.vocab_size)
    vocab = tok.get_vocab_size()
    # Byte-level BPE must round-trip every file exactly.
    for rel in texts:
        assert tok.decode(tok.encode(texts[rel]).ids, skip_special_tokens=False) == texts[rel], rel

    train_ids = encode_stream(tok, [texts[r] for r in train_files])
    heldout_ids = encode_stream(tok, [texts[r] for r in heldout_files])

    heldout_txt, heldout_txt_files = pick_text(heldout_files, texts, args.heldout_bytes, 60_000)
    calib_txt, calib_files = pick_text(train_files, texts, args.calib_bytes, 12_000)
    heldout_txt_ids = np.asarray(tok.encode(heldout_txt).ids, dtype=np.uint16)

    prep = Path(args.prep_dir)
    prep.mkdir(parents=True, exist_ok=True)
    np.save(prep / "train.npy", train_ids)
    np.save(prep / "heldout.npy", heldout_ids)
    np.save(prep / "heldout_txt.npy", heldout_txt_ids)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=None)
    fast.save_pretrained(prep / "tokenizer")
    # Name the class that transformers 4.x also knows (5.x maps it to the same backend).
    cfg_path = prep / "tokenizer" / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")

    data = Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    (data / "heldout.txt").write_text(heldout_txt, encoding="utf-8")
    (data / "calib.txt").write_text(calib_txt, encoding="utf-8")

    manifest = {
        "stdlib_dir": str(stdlib),
        "python": platform.python_version(),
        "excluded_dirs": sorted(EXCLUDED_DIRS),
        "excluded_prefixes": list(EXCLUDED_PREFIXES),
        "heldout_rule": f"int(sha1(relpath)[:8 bytes], big-endian) % {HELDOUT_BUCKETS} == 0",
        "vocab_size": vocab,
        "train_files": train_files,
        "heldout_files": heldout_files,
        "skipped_non_utf8": skipped,
        "train_bytes": sum(len(texts[r].encode()) for r in train_files),
        "heldout_bytes": sum(len(texts[r].encode()) for r in heldout_files),
        "train_tokens": int(train_ids.size),
        "heldout_tokens": int(heldout_ids.size),
        "heldout_txt_files": heldout_txt_files,
        "heldout_txt_bytes": len(heldout_txt.encode()),
        "heldout_txt_tokens": int(heldout_txt_ids.size),
        "calib_txt_files": calib_files,
        "calib_txt_bytes": len(calib_txt.encode()),
        "prepare_command": "python " + " ".join(sys.argv),
    }
    (prep / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"vocab {vocab}; tokens: train {train_ids.size:,}, held-out {heldout_ids.size:,}, "
          f"heldout.txt {heldout_txt_ids.size:,} ({manifest['heldout_txt_bytes']:,} B), "
          f"calib.txt {manifest['calib_txt_bytes']:,} B; {time.time() - t0:.1f}s -> {prep}")


# --------------------------------------------------------------------------
# Fast, exact selective scan for training (replaces the per-token loop)
# --------------------------------------------------------------------------

FAST_SCAN = {"on": False}


def linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h[:, t] = a[:, t] * h[:, t-1] + b[:, t] with h[:, -1] = 0, along dim 1.

    Hillis-Steele scan: log2(L) elementwise steps, all on the full tensor.
    """
    L, k = a.shape[1], 1
    while k < L:
        b = torch.cat([b[:, :k], b[:, k:] + a[:, k:] * b[:, :-k]], dim=1)
        if 2 * k < L:
            a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], dim=1)
        k *= 2
    return b


def fast_mixer_forward(mixer, hidden_states: torch.Tensor) -> torch.Tensor:
    """Same math as transformers' MambaMixer without cache (conv -> selective SSM -> gate)."""
    L = hidden_states.shape[1]
    x, z = mixer.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)          # (B, D, L) each
    x = mixer.act(mixer.conv1d(x)[..., :L])                                       # causal depthwise conv
    x = x.transpose(1, 2)                                                          # (B, L, D)
    R, N = mixer.time_step_rank, mixer.ssm_state_size
    dt, Bm, Cm = torch.split(mixer.x_proj(x), [R, N, N], dim=-1)
    dt = F.softplus(mixer.dt_proj(dt).float())                                    # (B, L, D)
    A = -torch.exp(mixer.A_log.float())                                           # (D, N)
    xf = x.float()
    a = torch.exp(dt[..., None] * A)                                               # (B, L, D, N)
    b = (dt * xf)[..., None] * Bm.float()[:, :, None, :]                          # (B, L, D, N)
    h = linear_scan(a, b)
    y = torch.einsum("bldn,bln->bld", h, Cm.float()) + xf * mixer.D.float()
    y = y * F.silu(z.transpose(1, 2).float())
    return mixer.out_proj(y.to(hidden_states.dtype))


def install_fast_scan(model) -> None:
    """Route cache-less mixer calls through fast_mixer_forward while FAST_SCAN['on']."""
    for layer in model.backbone.layers:
        mixer = layer.mixer
        stock = mixer.forward

        def forward(self, hidden_states, *args, _stock=stock, **kwargs):
            plain = all(v is None for v in args) and all(v is None for v in kwargs.values())
            if FAST_SCAN["on"] and plain:
                return fast_mixer_forward(self, hidden_states)
            return _stock(hidden_states, *args, **kwargs)

        mixer.forward = types.MethodType(forward, mixer)


def lm_loss(model, x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross entropy of a (B, L+1) token batch: predict x[:, 1:] from x[:, :-1]."""
    logits = model(input_ids=x[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction=reduction)


@torch.no_grad()
def check_fast_scan(model, x: torch.Tensor) -> tuple[float, float]:
    """Loss of the same batch through the stock transformers path and the fast path (fp32)."""
    was_training = model.training
    model.eval()
    FAST_SCAN["on"] = False
    stock = lm_loss(model, x).item()
    FAST_SCAN["on"] = True
    fast = lm_loss(model, x).item()
    model.train(was_training)
    return stock, fast


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, seq_len: int, batch_size: int, fast: bool,
             max_windows: int | None = None, autocast: bool = False) -> tuple[float, int, float]:
    """Per-token perplexity over non-overlapping windows of seq_len+1 tokens (stride seq_len).

    Every token except the first of the stream is predicted exactly once, with
    the context restarting at each window.  Returns (ppl, tokens, top1_acc).
    """
    was_training = model.training
    model.eval()
    FAST_SCAN["on"] = fast
    n_win = (ids.numel() - 1) // seq_len
    if max_windows:
        n_win = min(n_win, max_windows)
    starts = torch.arange(n_win, device=ids.device) * seq_len
    offs = torch.arange(seq_len + 1, device=ids.device)
    nll, correct, count = 0.0, 0, 0
    for i in range(0, n_win, batch_size):
        x = ids[starts[i:i + batch_size, None] + offs]
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()
        tgt = x[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum").item()
        correct += (logits.argmax(-1) == tgt).sum().item()
        count += tgt.numel()
    # the tail that does not fill a window
    rest = ids[n_win * seq_len:]
    if not max_windows and rest.numel() > 1:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=rest[None, :-1], use_cache=False).logits.float()[0]
        nll += F.cross_entropy(logits, rest[1:], reduction="sum").item()
        correct += (logits.argmax(-1) == rest[1:]).sum().item()
        count += rest.numel() - 1
    model.train(was_training)
    return math.exp(nll / count), count, correct / count


# --------------------------------------------------------------------------
# Stage 2: training
# --------------------------------------------------------------------------

def build_model(args, vocab_size: int):
    from transformers import MambaConfig, MambaForCausalLM

    padded_vocab = (vocab_size + 7) // 8 * 8
    config = MambaConfig(
        vocab_size=padded_vocab,
        hidden_size=args.hidden_size,
        state_size=args.state_size,
        num_hidden_layers=args.layers,
        expand=2,
        conv_kernel=4,
        tie_word_embeddings=True,
        residual_in_fp32=True,
        rescale_prenorm_residual=True,
        initializer_range=0.02,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        use_cache=True,
    )
    return MambaForCausalLM(config)


def lr_at(step: int, total: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args) -> None:
    import transformers

    prep = Path(args.prep_dir)
    manifest = json.loads((prep / "manifest.json").read_text())
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    train_ids = torch.from_numpy(np.load(prep / "train.npy").astype(np.int64)).to(device)
    heldout_ids = torch.from_numpy(np.load(prep / "heldout.npy").astype(np.int64)).to(device)
    heldout_txt_ids = torch.from_numpy(np.load(prep / "heldout_txt.npy").astype(np.int64)).to(device)

    model = build_model(args, manifest["vocab_size"]).to(device)
    install_fast_scan(model)
    n_params = sum(p.numel() for p in model.parameters())
    assert model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr(), "embeddings not tied"
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor()}), "
          f"torch {torch.__version__}, transformers {transformers.__version__}; params {n_params:,}", flush=True)

    L, B = args.seq_len, args.batch_size
    offs = torch.arange(L + 1, device=device)

    def batch() -> torch.Tensor:
        starts = torch.from_numpy(rng.integers(0, train_ids.numel() - L - 1, size=B)).to(device)
        return train_ids[starts[:, None] + offs]

    stock, fast = check_fast_scan(model, heldout_ids[: 4 * (L + 1)].view(4, L + 1))
    print(f"fast-scan check (fp32, init weights): stock loss {stock:.6f}, fast loss {fast:.6f}", flush=True)
    assert abs(stock - fast) < 1e-3 * max(1.0, abs(stock)), "fast scan disagrees with transformers"

    no_decay = {"A_log", "D"}
    decay, other = [], []
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        (decay if p.ndim >= 2 and leaf not in no_decay else other).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )
    use_amp = device.type == "cuda"
    FAST_SCAN["on"] = True
    model.train()

    total = args.max_steps or 10**9  # fixed after the speed measurement when --max-steps 0
    log, step, loss_ema = [], 0, None
    t_start = time.time()
    t_probe = None
    while step < total:
        elapsed = time.time() - t_start
        if elapsed > args.time_budget:
            print(f"stopping at step {step}: wall-clock budget {args.time_budget}s reached", flush=True)
            break
        lr = lr_at(step, total, args)
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = lm_loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1

        if step == 10:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_probe = time.time()
        if step == 60 and not args.max_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t_probe) / 50
            total = step + int((args.time_budget - (time.time() - t_start)) / per_step * 0.97)
            mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
            print(f"{1 / per_step:.2f} steps/s ({B * L / per_step:,.0f} tok/s), peak mem {mem:.1f} GiB "
                  f"-> total steps set to {total}", flush=True)
        if step % args.log_every == 0 or step == total:
            lv = loss.item()
            loss_ema = lv if loss_ema is None else 0.9 * loss_ema + 0.1 * lv
            row = {"step": step, "loss": round(lv, 4), "lr": lr, "gnorm": round(gnorm.item(), 3),
                   "time_s": round(time.time() - t_start, 1)}
            if step % args.eval_every == 0 or step == total:
                ppl, _, _ = evaluate(model, heldout_ids, L, 64, fast=True, max_windows=256, autocast=use_amp)
                row["heldout_ppl_subset"] = round(ppl, 3)
                FAST_SCAN["on"] = True
            log.append(row)
            print(json.dumps(row), flush=True)

    train_time = time.time() - t_start
    # Final train loss: mean over 16 fresh batches, fp32, fast path.
    model.eval()
    with torch.no_grad():
        final_train_loss = float(np.mean([lm_loss(model, batch()).item() for _ in range(16)]))
    model.float()
    # Save first, so that the weights survive any failure in the evaluation below.
    # rescale_prenorm_residual only matters at initialization (it divides out_proj by
    # sqrt(n_layers)), but transformers 5.23's _init_weights re-applies it to weights loaded
    # by from_pretrained, corrupting a trained checkpoint: store it as False.
    model.config.rescale_prenorm_residual = False
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in sorted((prep / "tokenizer").iterdir()):
        shutil.copy(f, out / f.name)

    # Held-out evaluation in fp32 through the stock transformers code path.
    torch.backends.cuda.matmul.allow_tf32 = False
    t_eval = time.time()
    ppl, n_tok, top1 = evaluate(model, heldout_ids, L, 64, fast=False)
    ppl_fast, _, _ = evaluate(model, heldout_ids, L, 64, fast=True)
    ppl_txt, n_txt, top1_txt = evaluate(model, heldout_txt_ids, L, 64, fast=False)
    ppl_txt16, _, _ = evaluate(model, heldout_txt_ids, L, 16, fast=False, max_windows=16)
    stock, fast = check_fast_scan(model, heldout_ids[: 4 * (L + 1)].view(4, L + 1))
    print(f"held-out: ppl {ppl:.3f} over {n_tok:,} tokens (fast path {ppl_fast:.3f}), top-1 {top1:.4f}; "
          f"heldout.txt: ppl {ppl_txt:.3f} over {n_txt:,} tokens, top-1 {top1_txt:.4f}; "
          f"final train loss {final_train_loss:.4f} (ppl {math.exp(final_train_loss):.3f}); "
          f"eval {time.time() - t_eval:.1f}s", flush=True)

    info = {
        "n_params": n_params, "steps": step, "train_time_s": round(train_time, 1),
        "tokens_seen": step * B * L, "final_train_loss": final_train_loss,
        "heldout_ppl": ppl, "heldout_tokens": n_tok, "heldout_top1": top1, "heldout_ppl_fast_path": ppl_fast,
        "heldout_txt_ppl": ppl_txt, "heldout_txt_tokens": n_txt, "heldout_txt_top1": top1_txt,
        "heldout_txt_ppl_first16": ppl_txt16,
        "final_check_stock_loss": stock, "final_check_fast_loss": fast,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "args": vars(args), "command": "python " + " ".join(sys.argv), "log": log,
    }
    write_report(out, manifest, info, model.config)
    if args.metrics_json:
        Path(args.metrics_json).write_text(json.dumps(info, indent=1))
    print(f"saved to {out}: {sorted(p.name for p in out.iterdir())}", flush=True)


def write_report(out: Path, manifest: dict, info: dict, config) -> None:
    a = info["args"]
    cfg = config.to_dict()
    cfg_keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "state_size", "expand",
                "conv_kernel", "time_step_rank", "use_bias", "use_conv_bias", "tie_word_embeddings",
                "residual_in_fp32", "layer_norm_epsilon", "bos_token_id", "eos_token_id", "pad_token_id"]
    n_train_files, n_held_files = len(manifest["train_files"]), len(manifest["heldout_files"])
    log_rows = "\n".join(
        f"| {r['step']} | {r['loss']:.4f} | {r['lr']:.2e} | {r.get('heldout_ppl_subset', '')} | {r['time_s']} |"
        for r in info["log"] if r["step"] % a["eval_every"] == 0 or r is info["log"][-1]
    )
    heldout_list = "\n".join(f"- `{r}`" for r in manifest["heldout_files"])
    text = f"""# demo-mamba: a tiny Mamba-1 language model of Python source

A `transformers.MambaForCausalLM` ({info['n_params']:,} parameters, float32
safetensors) with a byte-level BPE tokenizer of {manifest['vocab_size']} tokens, trained from
scratch on the CPython {manifest['python']} standard library. It exists so that
the edgemamba toolchain has a small real model to compile, run and measure
(quantization accuracy: perplexity and top-1 agreement on held-out text).
It is a toy: expect Python-looking text, not working programs.

Produced by `scripts/train_demo.py`.

```python
from transformers import AutoTokenizer, MambaForCausalLM
tok = AutoTokenizer.from_pretrained("edgemamba/data/demo-mamba")
model = MambaForCausalLM.from_pretrained("edgemamba/data/demo-mamba")
ids = tok("def ", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=80, do_sample=False)[0]))
```

## Data

- Source: `*.py` under `{manifest['stdlib_dir']}` (CPython {manifest['python']}),
  skipping any path with a directory component in
  {', '.join('`' + d + '`' for d in manifest['excluded_dirs'])},
  and file names starting with {', '.join('`' + p + '`' for p in manifest['excluded_prefixes'])};
  files that are not UTF-8 are skipped ({len(manifest['skipped_non_utf8'])}).
- Held-out split: a file (path relative to the stdlib directory) is held out iff
  `{manifest['heldout_rule']}`. Held-out files are used neither for the
  tokenizer nor for the model.
- Train: {n_train_files} files, {manifest['train_bytes']:,} bytes, {manifest['train_tokens']:,} tokens.
- Held-out: {n_held_files} files, {manifest['heldout_bytes']:,} bytes, {manifest['heldout_tokens']:,} tokens.
- Each file is tokenized on its own and followed by `<|endoftext|>` (id 0).
- `edgemamba/data/heldout.txt`: {len(manifest['heldout_txt_files'])} held-out files
  ({manifest['heldout_txt_bytes']:,} bytes, {manifest['heldout_txt_tokens']:,} tokens), whole files of
  at most 60 kB taken in sha1(path) order, separated by blank lines.
- `edgemamba/data/calib.txt`: {len(manifest['calib_txt_files'])} training files
  ({manifest['calib_txt_bytes']:,} bytes), whole files of at most 12 kB in sha1(path) order, for
  quantization calibration.

## Tokenizer

`tokenizers` BPE, ByteLevel pre-tokenizer (no prefix space) and decoder, so
decoding round-trips any text exactly (checked on every file); trained on the
training split with vocab_size {a['vocab_size']}, min_frequency 2. `<|endoftext|>` is id 0 and is
bos, eos and pad. Files: `tokenizer.json` (+ `tokenizer_config.json` for `AutoTokenizer`).

## Model config

| key | value |
| --- | --- |
""" + "\n".join(f"| {k} | {cfg.get(k)} |" for k in cfg_keys) + f"""

Parameters: {info['n_params']:,} (embeddings tied with the LM head).
The model was initialized with `rescale_prenorm_residual=True` (out_proj divided by
sqrt(n_layers)); config.json stores it as false because it only concerns initialization and
transformers 5.23 re-applies it to weights loaded by `from_pretrained`.

## Training

- Objective: next-token cross entropy on random windows of {a['seq_len']}+1 tokens from the
  concatenated training stream (window starts drawn uniformly, numpy seed {a['seed']}).
- Batch {a['batch_size']} x {a['seq_len']} tokens; {info['steps']} steps
  ({info['tokens_seen']:,} tokens, {info['tokens_seen'] / manifest['train_tokens']:.1f} passes over the training tokens).
- AdamW (betas 0.9/0.95, eps 1e-8), peak LR {a['lr']}, linear warmup {a['warmup']} steps, cosine decay to
  {a['min_lr_ratio']} x peak; weight decay {a['weight_decay']} on matrices and embeddings (not on
  A_log, D, biases, norms); gradient clipping {a['grad_clip']}. {'bf16 autocast, ' if info['device'] != 'cpu' else ''}fp32 master weights.
  The step count was {'given' if a['max_steps'] else 'set from the measured speed to fill a wall-clock budget of ' + str(a['time_budget']) + ' s'}.
- The selective scan ran as an exact parallel scan (see the script) instead of
  transformers' per-token loop; on the final weights, stock vs fast path fp32 loss on one
  batch: {info['final_check_stock_loss']:.6f} vs {info['final_check_fast_loss']:.6f}.
- Hardware: {info['device']}; training time {info['train_time_s']} s.
- Software: python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, numpy {info['numpy']}.

| step | loss | lr | held-out ppl (first 256 windows) | time (s) |
| --- | --- | --- | --- | --- |
{log_rows}

## Results (float32, stock transformers code path)

- Final train loss: {info['final_train_loss']:.4f} (ppl {math.exp(info['final_train_loss']):.2f}), mean of 16 random training batches.
- **Held-out perplexity: {info['heldout_ppl']:.3f}** per token over {info['heldout_tokens']:,} tokens
  (uniform over the vocabulary would be {manifest['vocab_size']}); top-1 next-token accuracy {info['heldout_top1']:.4f}.
- `heldout.txt`: perplexity {info['heldout_txt_ppl']:.3f} over {info['heldout_txt_tokens']:,} tokens, top-1 {info['heldout_txt_top1']:.4f}
  (first 16 windows only, for quick re-checks: {info.get('heldout_txt_ppl_first16', float('nan')):.3f}).
- The training set is small (~{manifest['train_tokens'] / 1e6:.1f}M tokens for {info['n_params'] / 1e6:.1f}M parameters):
  the gap between train and held-out perplexity is overfitting to the stdlib's own files.
  The "first 256 windows" column is mostly `_pydecimal.py`; `heldout.txt` leaves out files over 60 kB.
- Protocol: non-overlapping windows of {a['seq_len']}+1 tokens with stride {a['seq_len']} (context restarts
  at each window; every token but the first is predicted once), mean NLL per token, exp.

## Commands

```
{manifest['prepare_command']}
{info['command']}
python scripts/train_demo.py --sample --out-dir <the model directory>
```

## Held-out files

{heldout_list}

## Samples

(filled in by `scripts/train_demo.py --sample`)
"""
    (out / "TRAINING.md").write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------
# Stage 3: local check + samples
# --------------------------------------------------------------------------

def sample(args) -> None:
    from transformers import AutoTokenizer, MambaForCausalLM

    out = Path(args.out_dir)
    tok = AutoTokenizer.from_pretrained(out)
    model = MambaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    heldout_txt = (Path(args.data_dir) / "heldout.txt").read_text(encoding="utf-8")
    ids = torch.tensor(tok(heldout_txt, add_special_tokens=False).input_ids)
    t0 = time.time()
    ppl, n, top1 = evaluate(model, ids, args.seq_len, 8, fast=False, max_windows=args.check_windows or None)
    scope = f"first {args.check_windows} windows" if args.check_windows else "all windows"
    check = (f"heldout.txt re-checked after `from_pretrained` on {platform.machine()} CPU (stock path, fp32, "
             f"{scope} of {args.seq_len}+1 tokens): ppl {ppl:.3f} over {n:,} tokens, top-1 {top1:.4f}")
    print(check, f"({time.time() - t0:.0f}s)", flush=True)

    blocks = []
    for prompt in args.prompts:
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=args.sample_tokens, do_sample=False)
        text = tok.decode(gen[0], skip_special_tokens=False)
        print(f"--- prompt {prompt!r}\n{text}\n", flush=True)
        blocks.append(f"Prompt `{prompt!r}`, greedy, {args.sample_tokens} new tokens:\n\n```python\n{text}\n```\n")

    report = out / "TRAINING.md"
    text = report.read_text(encoding="utf-8").split("## Samples")[0]
    text += "## Samples\n\n" + check + ".\n\nGenerated with stock `model.generate` (transformers " \
        + __import__("transformers").__version__ + f", torch {torch.__version__}, CPU):\n\n" + "\n".join(blocks)
    report.write_text(text, encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--prepare-only", action="store_true", help="stage 1 only (CPU)")
    mode.add_argument("--train", action="store_true", help="stage 2 only (needs --prep-dir from stage 1)")
    mode.add_argument("--sample", action="store_true", help="stage 3: check + samples into TRAINING.md")
    p.add_argument("--stdlib-dir", default=sysconfig.get_paths()["stdlib"])
    p.add_argument("--prep-dir", default=str(REPO_ROOT / ".cache" / "demo_prep"))
    p.add_argument("--data-dir", default=str(REPO_ROOT / "edgemamba" / "data"))
    p.add_argument("--out-dir", default=str(REPO_ROOT / "edgemamba" / "data" / "demo-mamba"))
    p.add_argument("--metrics-json", default=None, help="also write all training metrics here")
    p.add_argument("--heldout-bytes", type=int, default=300_000)
    p.add_argument("--calib-bytes", type=int, default=50_000)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--state-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=0, help="0: fill --time-budget (measured speed)")
    p.add_argument("--time-budget", type=float, default=420.0, help="training wall-clock limit, seconds")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--prompts", nargs="+", default=["def ", "import ", "class ", "    def __init__(self"])
    p.add_argument("--sample-tokens", type=int, default=96)
    p.add_argument("--check-windows", type=int, default=16, help="--sample: held-out windows to re-check (0: all)")
    args = p.parse_args()

    if args.sample:
        sample(args)
        return
    if not args.train:
        prepare(args)
    if not args.prepare_only:
        train(args)


if __name__ == "__main__":
    main()
