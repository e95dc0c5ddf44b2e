"""Session: the runtime a device app embeds. Load an artifact, feed a prompt, stream tokens.

    session = Session("model.em")
    for piece in session.stream_text("def fib(n):", max_new_tokens=64):
        print(piece, end="", flush=True)

A Session holds `batch` independent sequences, each with a fixed-size state (conv_state and
ssm_state per layer) allocated once. State snapshots can be taken, restored, saved to a file and
loaded later (resume a conversation with no prefill).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edgemamba.artifact import Artifact, atomic_write_bytes, load_artifact
from edgemamba.errors import EdgeMambaError
from edgemamba.sampling import Sampler, SamplingParams, non_finite_logits

STATE_FORMAT = "edgemamba-state"
STATE_VERSION = "2"  # 2: the metadata carries a checksum of the tensors and the position
_BUSY = "this Session is in use by another thread; give each thread its own Session"


class Session:
    def __init__(self, artifact: str | Path | Artifact, *, batch: int = 1, threads: int | None = None,
                 verify: bool = True, prefill_chunk: int = 256, engine: str = "auto"):
        if batch < 1:
            raise EdgeMambaError(f"batch must be ≥ 1, got {batch}")
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact, verify=verify)
        self.spec = self.artifact.spec
        self.batch = batch
        self.prefill_chunk = prefill_chunk
        from edgemamba.runtimes import backend_for

        # engine (ort-cpu artifacts): "native" (edgemamba's C++ engine), "ort" (ONNX Runtime), or
        # "auto": native where it supports the artifact, else ONNX Runtime (backend.fallback_reason).
        self.backend = backend_for(self.artifact, engine)(self.artifact, batch, threads)
        self.engine = getattr(self.backend, "engine", self.artifact.target)  # what runs it: "native", "ort", ...
        self.positions = [0] * batch  # tokens seen by each sequence
        self.tokenizer = _load_tokenizer(self.artifact.tokenizer_path, self.spec.vocab_size)
        eos = self.spec.eos_token_id
        self.default_stop = () if eos is None else (eos,)
        self._lock = threading.Lock()
        self._streaming_in: int | None = None  # thread id of an unfinished generate(), whose steps it owns
        self._last_logits: np.ndarray | None = None  # batch-1 generate: logits after the last token

    @contextmanager
    def _exclusive(self):
        # A Session's buffers are not shareable; concurrent use is refused, never silently mixed.
        # Steps from another thread are refused too while a generate() is unfinished: they would
        # slip between its tokens and change its state.
        if not self._lock.acquire(blocking=False):
            raise EdgeMambaError(_BUSY)
        try:
            if self._streaming_in not in (None, threading.get_ident()):  # read under the lock: no race
                raise EdgeMambaError(_BUSY)
            yield
        finally:
            self._lock.release()

    @contextmanager
    def _owned(self):
        """Claim the session for this thread across several calls (a generate, a batch)."""
        with self._exclusive():
            previous, self._streaming_in = self._streaming_in, threading.get_ident()
        try:
            yield
        finally:
            self._streaming_in = previous

    # ---- tokens -------------------------------------------------------------------------------
    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.spec.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= self.spec.vocab_size)][0])
            raise EdgeMambaError(f"token id {bad} is outside the vocabulary [0, {self.spec.vocab_size})")
        return ids

    def _check_seq(self, seq: int) -> int:
        if not 0 <= seq < self.batch:
            raise EdgeMambaError(f"sequence {seq} does not exist (this Session holds {self.batch})")
        return seq

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise EdgeMambaError("this artifact has no tokenizer; pass token ids instead of text")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise EdgeMambaError("this artifact has no tokenizer; cannot decode text")
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    # ---- the core API ---------------------------------------------------------------------------
    def reset(self, seq: int | None = None) -> None:
        """Zero one sequence's state (or all)."""
        rows = range(self.batch) if seq is None else [self._check_seq(seq)]
        with self._exclusive():
            for r in rows:
                self.backend.reset(slice(r, r + 1))
                self.positions[r] = 0

    def prefill(self, ids: Sequence[int], seq: int = 0) -> np.ndarray:
        """Feed tokens into a sequence's state, in chunks; returns the logits after the last one (vocab,)."""
        ids = self._check_ids(ids)
        self._check_seq(seq)
        if ids.size == 0:
            raise EdgeMambaError("empty prompt: give at least one token")
        with self._exclusive():
            for start in range(0, ids.size, self.prefill_chunk):
                logits = self.backend.prefill(ids[start : start + self.prefill_chunk], seq)
            self.positions[seq] += int(ids.size)
            return logits

    def step(self, ids: Sequence[int]) -> np.ndarray:
        """One token for every sequence: ids (batch,) -> logits (batch, vocab). The array is reused
        by the next call: copy it to keep it."""
        return self._advance(ids, self.backend.step)

    def _advance(self, ids: Sequence[int], run) -> np.ndarray:
        """One token for every sequence through the backend's `run` (step or step_greedy)."""
        ids = self._check_ids(ids)
        if ids.size != self.batch:
            raise EdgeMambaError(f"step needs one token per sequence ({self.batch}), got {ids.size}")
        with self._exclusive():
            out = run(ids)
            for r in range(self.batch):
                self.positions[r] += 1
            return out

    def _greedy_on_device(self, params: SamplingParams) -> bool:
        """Greedy decoding on a backend that picks the next token on the device (tvm): per token only
        the ids cross, the logits stay there."""
        return params.greedy and getattr(self.backend, "can_step_greedy", False)

    def _step_greedy(self, ids: Sequence[int]) -> np.ndarray:
        """One token for every sequence, as `step`; returns each sequence's next token, chosen on the
        device (-1: its logits held a NaN or an infinity). The logits stay on the device."""
        return self._advance(ids, self.backend.step_greedy)

    def generate(self, prompt: Sequence[int] | None, max_new_tokens: int, *, sampling: SamplingParams | None = None,
                 stop: Sequence[int] | None = None, seq: int = 0) -> Iterator[int]:
        """Stream new token ids for one sequence (batch-1 use). `prompt=None` continues from the
        current state (after set_state / load_state) with the last logits of a prefill."""
        if self.batch != 1:
            raise EdgeMambaError("generate streams one sequence: use generate_batch for batch > 1")
        if max_new_tokens < 0 or max_new_tokens > 1 << 40:
            raise EdgeMambaError(f"max_new_tokens must be between 0 and 2^40, got {max_new_tokens}")
        sampler = Sampler(sampling or SamplingParams())
        stop = set(self.default_stop if stop is None else stop)
        with self._owned():  # until the generator ends: other threads' calls are refused
            if prompt is not None:
                logits = self.prefill(prompt, seq)
            elif self._last_logits is not None:
                logits = self._last_logits
            else:
                raise EdgeMambaError("no prompt and no restored state to continue from")
            # on the device, the logits are read once, at the end, for _last_logits
            on_device = self._greedy_on_device(sampler.params)
            # Invariant when the generator ends, however it ends: the state holds every yielded token
            # and _last_logits follow the last one, so a later generate(None) continues exactly.
            pending, picked = None, None
            try:
                for _ in range(max_new_tokens):
                    if picked is not None and picked < 0:  # as the host sampler refuses them
                        raise non_finite_logits()
                    token = pending = sampler(logits) if picked is None else picked
                    yield token
                    if on_device:
                        picked, logits, pending = int(self._step_greedy([token])[0]), None, None
                    else:
                        logits, pending = self.step([token])[0], None
                    if token in stop:
                        return
            finally:
                if pending is not None:
                    logits = self.step([pending])[0]
                self._last_logits = (self.backend.logits()[0] if logits is None else logits).copy()

    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                       sampling: SamplingParams | None = None, stop: Sequence[int] | None = None) -> list[list[int]]:
        """Independent sequences decoded together: each prompt gets its own state and sampler."""
        if len(prompts) != self.batch:
            raise EdgeMambaError(f"this Session holds {self.batch} sequences, got {len(prompts)} prompts")
        params = sampling or SamplingParams()
        samplers = [Sampler(SamplingParams(params.temperature, params.top_k, params.top_p,
                                           None if params.seed is None else params.seed + i))
                    for i in range(self.batch)]
        stop = set(self.default_stop if stop is None else stop)
        on_device = self._greedy_on_device(params)
        with self._owned():
            self.reset()
            last = [self.prefill(p, seq=i) for i, p in enumerate(prompts)]
            outs: list[list[int]] = [[] for _ in prompts]
            done = [False] * self.batch
            picked = None
            for _ in range(max_new_tokens):
                if picked is None:
                    tokens = [samplers[i](last[i]) if not done[i] else 0 for i in range(self.batch)]
                else:
                    if any(picked[i] < 0 and not done[i] for i in range(self.batch)):
                        raise non_finite_logits()
                    tokens = [int(picked[i]) if not done[i] else 0 for i in range(self.batch)]
                for i, t in enumerate(tokens):
                    if not done[i]:
                        outs[i].append(t)
                        done[i] = t in stop
                if all(done):
                    break
                if on_device:
                    picked = self._step_greedy(tokens)
                else:
                    logits = self.step(tokens)
                    last = [logits[i].copy() for i in range(self.batch)]
        return outs

    def stream_text(self, prompt: str, max_new_tokens: int, **kwargs) -> Iterator[str]:
        """Stream decoded text pieces; multi-byte characters are emitted once complete."""
        ids: list[int] = []
        emitted = ""
        for token in self.generate(self.encode(prompt), max_new_tokens, **kwargs):
            ids.append(token)
            text = self.decode(ids)
            if text.endswith("\ufffd"):
                continue  # an incomplete UTF-8 sequence: wait for the next token
            yield text[len(emitted):]
            emitted = text

    def score(self, ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits (len(ids), vocab) from a fresh state: row j predicts token j+1.
        Uses a scratch session so the live sequences are untouched."""
        ids = self._check_ids(ids)
        scratch = Session(self.artifact, batch=1)
        out = np.empty((ids.size, self.spec.vocab_size), np.float32)
        for j, token in enumerate(ids):
            out[j] = scratch.step([token])[0]
        return out

    # ---- state snapshots ----------------------------------------------------------------------------
    def get_state(self, seq: int = 0) -> dict[str, np.ndarray]:
        """A copy of one sequence's state: {"conv_state.{i}": (conv_dim, d_conv-1), "ssm_state.{i}": ...}."""
        self._check_seq(seq)
        return {k: v[seq].copy() for k, v in self.backend.state.items()}

    def set_state(self, state: dict[str, np.ndarray], seq: int = 0, position: int = 0) -> None:
        self._check_seq(seq)
        live = self.backend.state
        if set(state) != set(live):
            raise EdgeMambaError("state does not match this model: tensor names differ")
        for k, v in state.items():
            if v.shape != live[k].shape[1:]:
                raise EdgeMambaError(f"state tensor {k} has shape {v.shape}, expected {live[k].shape[1:]}")
            if not np.all(np.isfinite(v)):
                raise EdgeMambaError(f"state tensor {k} contains NaN or infinity")
        with self._exclusive():
            for k, v in state.items():
                live[k][seq] = v
            self.positions[seq] = position
            self._last_logits = None

    def save_state(self, path: str | Path, seq: int = 0, last_logits: np.ndarray | None = None) -> None:
        """Write one sequence's state to a safetensors file tagged with the model's spec hash and
        a checksum, written atomically (a failed write leaves no file and no temporary)."""
        from safetensors.numpy import save

        tensors = self.get_state(seq)
        if last_logits is None:
            last_logits = self._last_logits
        if last_logits is not None:
            tensors["last_logits"] = np.asarray(last_logits, np.float32)
        meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "spec_hash": self.spec.spec_hash(),
                "position": str(self.positions[seq])}
        meta["sha256"] = _state_checksum(meta, tensors)
        atomic_write_bytes(Path(path), save(tensors, metadata=meta))

    def load_state(self, path: str | Path, seq: int = 0) -> None:
        from safetensors import safe_open

        path = Path(path)
        live = self.backend.state
        expected = {k: v.shape[1:] for k, v in live.items()} | {"last_logits": (self.spec.vocab_size,)}
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                if meta.get("format") != STATE_FORMAT:
                    raise EdgeMambaError(f"{path}: not an edgemamba state file")
                if meta.get("version") != STATE_VERSION:
                    raise EdgeMambaError(f"{path}: state file version {meta.get('version')!r} is not supported "
                                         f"(this edgemamba reads {STATE_VERSION})")
                if meta.get("spec_hash") != self.spec.spec_hash():
                    raise EdgeMambaError(
                        f"{path}: state is from another model (spec {meta.get('spec_hash')}, "
                        f"this artifact is {self.spec.spec_hash()})")
                for k in f.keys():  # names and shapes from the header, before any tensor is read
                    if k not in expected or tuple(f.get_slice(k).get_shape()) != expected[k]:
                        raise EdgeMambaError(f"{path}: tensor {k!r} does not belong to this model's state")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except EdgeMambaError:
            raise
        except FileNotFoundError:
            raise EdgeMambaError(f"{path}: no such state file") from None
        except Exception as e:  # safetensors' own errors for truncated or corrupted files
            raise EdgeMambaError(f"{path}: not a readable state file ({str(e).splitlines()[0][:200]})") from None
        if meta.get("sha256") != _state_checksum(meta, tensors):
            raise EdgeMambaError(f"{path}: checksum does not match (state file damaged or edited)")
        position = meta.get("position", "")
        if not position.isdigit():
            raise EdgeMambaError(f"{path}: invalid position {position!r}")
        last = tensors.pop("last_logits", None)
        if last is not None and not np.all(np.isfinite(last)):
            raise EdgeMambaError(f"{path}: last_logits contain NaN or infinity")
        self.set_state(tensors, seq, int(position))
        self._last_logits = None if last is None else last.astype(np.float32)


def _state_checksum(meta: dict[str, str], tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 over the metadata that matters and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for key in ("format", "version", "spec_hash", "position"):
        h.update(f"{key}={meta.get(key)}\n".encode())
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name])
        h.update(f"{name}:{t.dtype.str}:{t.shape}\n".encode())
        h.update(t.tobytes())
    return h.hexdigest()


def _load_tokenizer(path: Path | None, vocab_size: int):
    """The artifact's tokenizer, refused if it could produce ids the model has no row for."""
    if path is None:
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception type for any bad file
        raise EdgeMambaError(f"{path}: not a readable tokenizer ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise EdgeMambaError(f"{path}: the tokenizer has {n} tokens but the model's vocabulary has {vocab_size} rows "
                             "(tokenizer from another model?)")
    return tokenizer
