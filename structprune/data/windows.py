"""Token windows for evaluation and calibration, per docs/PROTOCOL.md.

A split's documents are joined with a blank line ("\\n\\n") and tokenized once, without special
tokens (no BOS in the middle of the stream). Evaluation cuts the ids into non-overlapping windows
of ``seqlen`` tokens and drops the remainder; calibration draws ``nsamples`` windows at random
starts with a seeded ``torch.Generator``. Token ids are cached on disk per (tokenizer, text), so the
12 MB of SOTU or 6 MB of Brown are tokenized once per tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from structprune import paths
from structprune.errors import InvalidConfigError, SequenceLengthError

log = logging.getLogger(__name__)

DOC_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration windows come from: ``nsamples`` windows of ``seqlen`` tokens of the
    ``dataset`` split (e.g. ``sotu-calib``), drawn with ``seed``."""

    dataset: str
    nsamples: int
    seqlen: int
    seed: int


def protocol_string(eval_set: str, seqlen: int, n_windows: int,
                    calib: CalibrationSpec | tuple[str, int, int, int] | None = None) -> str:
    """``'sotu-test · seqlen 512 · 340 windows · calib sotu-calib 64x512 seed 0'``."""
    text = f"{eval_set} · seqlen {seqlen} · {n_windows} window{'' if n_windows == 1 else 's'}"
    if calib is not None:
        c = calib if isinstance(calib, CalibrationSpec) else CalibrationSpec(*calib)
        text += f" · calib {c.dataset} {c.nsamples}x{c.seqlen} seed {c.seed}"
    return text


# ----------------------------------------------------------------------------- tokenization
def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides the ids: the tokenizer class, its full serialized model (vocab,
    merges, normalizer, pre-tokenizer; padding/truncation state excluded) and special tokens.
    Two tokenizers with the same name but different vocabularies get different fingerprints."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = getattr(tokenizer, "special_tokens_map", {})
    h.update(json.dumps(specials, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def _tokens_dir() -> Path:
    return paths.corpora_dir() / "tokens"


def tokenize_corpus(tokenizer: Any, docs: Sequence[str], *, use_cache: bool = True,
                    cache_dir: Path | None = None) -> torch.Tensor:
    """Join ``docs`` with "\\n\\n", tokenize once (no special tokens) -> ids ``(N,)`` int64.

    The result is cached as ``<cache_dir>/<key>.pt`` (default ``<corpora>/tokens``), the key
    hashing the tokenizer fingerprint and the exact text, so any change of either re-tokenizes.
    """
    text = DOC_SEPARATOR.join(docs)
    key = hashlib.sha256(
        (tokenizer_fingerprint(tokenizer) + "\0").encode() + text.encode("utf-8")
    ).hexdigest()[:24]
    path = Path(cache_dir or _tokens_dir()) / f"{key}.pt"
    if use_cache and path.exists():
        try:
            return torch.load(path, weights_only=True).long()
        except Exception as exc:  # a truncated/corrupt cache file: tokenize again
            log.warning("ignoring unreadable token cache %s: %s", path, exc)
    ids = torch.tensor(
        tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long
    )
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
        os.close(fd)
        torch.save(ids.to(torch.int32), tmp)  # vocabularies are < 2**31; half the disk
        os.replace(tmp, path)
    return ids


def corpus_token_ids(tokenizer: Any, name_or_path: str, split: str) -> torch.Tensor:
    """``tokenize_corpus(tokenizer, load_corpus(name_or_path, split))`` -> ``(N,)`` int64."""
    from structprune.data.corpora import load_corpus

    return tokenize_corpus(tokenizer, load_corpus(name_or_path, split))


# ---------------------------------------------------------------------------------- windows
def _check_ids(ids: torch.Tensor) -> None:
    if ids.dim() != 1:
        raise InvalidConfigError(f"token ids must be 1-D (N,), got shape {tuple(ids.shape)}")


def n_eval_windows(n_tokens: int, seqlen: int) -> int:
    """Number of whole windows: ``floor(n_tokens / seqlen)``."""
    return n_tokens // seqlen


def eval_windows(ids: torch.Tensor, seqlen: int, windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``(W, seqlen)`` of ``ids (N,)``; the remainder is dropped.
    ``windows=None`` gives all ``floor(N / seqlen)``, ``windows=W`` the first W.

    Raises SequenceLengthError when seqlen < 2, windows < 1, the text is shorter than one
    window, or it has fewer than ``windows`` windows.
    """
    _check_ids(ids)
    if seqlen < 2:
        raise SequenceLengthError(f"seqlen must be at least 2 tokens, got {seqlen}")
    if windows is not None and windows < 1:
        raise SequenceLengthError(f"windows must be at least 1, got {windows}")
    n = ids.numel()
    available = n_eval_windows(n, seqlen)
    if available == 0:
        raise SequenceLengthError(
            f"the text has {n} tokens, shorter than one window of seqlen {seqlen}"
        )
    if windows is not None and windows > available:
        raise SequenceLengthError(
            f"asked for {windows} windows of {seqlen} tokens but the text has only {available} "
            f"({n} tokens)"
        )
    w = available if windows is None else windows
    return ids[: w * seqlen].reshape(w, seqlen)  # (W, seqlen)


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows ``(nsamples, seqlen)`` at uniformly random starts in ``ids (N,)``,
    drawn with ``torch.Generator().manual_seed(seed)`` (same seed, same windows, on any device).

    Raises InvalidConfigError when nsamples < 1, SequenceLengthError when seqlen < 2 or
    seqlen > N.
    """
    _check_ids(ids)
    if nsamples < 1:
        raise InvalidConfigError(f"nsamples must be at least 1, got {nsamples}")
    if seqlen < 2:
        raise SequenceLengthError(f"seqlen must be at least 2 tokens, got {seqlen}")
    n = ids.numel()
    if seqlen > n:
        raise SequenceLengthError(
            f"calibration seqlen {seqlen} is longer than the calibration text ({n} tokens)"
        )
    starts = _calibration_starts(n, nsamples, seqlen, seed)  # (nsamples,)
    offsets = torch.arange(seqlen)  # (seqlen,)
    return ids[starts[:, None] + offsets[None, :]]  # (nsamples, seqlen)


def _calibration_starts(n_tokens: int, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, n_tokens - seqlen + 1, (nsamples,), generator=gen)


def heldout_calibration_windows(ids: torch.Tensor, windows: int, seqlen: int, nsamples: int,
                                seed: int) -> torch.Tensor:
    """``windows`` windows ``(windows, seqlen)`` of the calibration text that share no token with
    the ``nsamples`` windows ``calibration_windows(ids, nsamples, seqlen, seed)`` draws.

    Choices (temperature, energy) are made by the loss on these: the calibration split, never an
    eval split, yet not the tokens the refit was fitted to (the in-sample loss rewards
    over-fitting). Candidates are the aligned windows ``ids[j*seqlen:(j+1)*seqlen]`` that miss every
    calibration window; ``windows`` of them are taken evenly spaced through the text, so every part
    of the split (e.g. every decade of addresses) is represented.

    Raises SequenceLengthError when fewer than ``windows`` such windows exist.
    """
    _check_ids(ids)
    if windows < 1:
        raise SequenceLengthError(f"windows must be at least 1, got {windows}")
    n = ids.numel()
    if seqlen < 2 or seqlen > n:
        raise SequenceLengthError(f"seqlen {seqlen} does not fit a calibration text of {n} tokens")
    starts = _calibration_starts(n, nsamples, seqlen, seed)  # (nsamples,)
    cand = torch.arange(n_eval_windows(n, seqlen)) * seqlen  # (C,) aligned starts
    # [c, c+seqlen) and [s, s+seqlen) overlap iff |c - s| < seqlen
    free = ((cand[:, None] - starts[None, :]).abs() >= seqlen).all(dim=1)  # (C,)
    cand = cand[free]
    if cand.numel() < windows:
        raise SequenceLengthError(
            f"the calibration text has only {cand.numel()} windows of {seqlen} tokens outside the "
            f"{nsamples} calibration windows; {windows} held-out windows were asked for: lower --nsamples")
    pick = torch.linspace(0, cand.numel() - 1, windows).round().long()  # (windows,)
    offsets = torch.arange(seqlen)
    return ids[cand[pick][:, None] + offsets[None, :]]  # (windows, seqlen)
