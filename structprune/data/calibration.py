"""A run's calibration windows from its `PruneConfig`: the calibration split of its corpus, or
random tokens for the tiny demo models, which have no tokenizer (labelled as such)."""

from __future__ import annotations

import logging

import torch

from ..config import PruneConfig
from ..errors import SequenceLengthError
from .windows import calibration_windows, corpus_token_ids, heldout_calibration_windows, protocol_string

log = logging.getLogger(__name__)

HELDOUT_LOSS_WINDOWS = 16  # held-out calibration windows of calib_loss["heldout"], which choices are made by


def calibration_ids(cfg: PruneConfig, tokenizer, vocab: int) -> torch.Tensor:
    """The run's calibration windows (nsamples, seqlen)."""
    if tokenizer is None:
        return random_token_data(cfg, vocab)[0]
    try:
        return calibration_windows(corpus_token_ids(tokenizer, cfg.calib_data, "calib"), cfg.nsamples, cfg.seqlen,
                                   cfg.seed)
    except SequenceLengthError as exc:
        raise SequenceLengthError(f"--calib-data {cfg.calib_data}: {exc}; lower --seqlen or give a longer text") \
            from None


def random_token_data(cfg: PruneConfig, vocab: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """Calibration and evaluation windows of random tokens, with their protocol string."""
    g = torch.Generator().manual_seed(cfg.seed)
    calib = torch.randint(0, vocab, (cfg.nsamples, cfg.seqlen), generator=g)
    n_eval = cfg.eval_windows or 4
    win = torch.randint(0, vocab, (n_eval, cfg.seqlen), generator=torch.Generator().manual_seed(cfg.seed + 1))
    proto = protocol_string("random-tokens", cfg.seqlen, n_eval, ("random-tokens", cfg.nsamples, cfg.seqlen, cfg.seed))
    return calib, {"random": win}, {"random": proto}


def heldout_ids(cfg: PruneConfig, tokenizer, vocab: int) -> torch.Tensor | None:
    """HELDOUT_LOSS_WINDOWS windows of the calibration split disjoint from the calibration windows
    (random tokens without a tokenizer); None, with a warning, when the calibration windows leave
    too few."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(cfg.seed + 2)
        return torch.randint(0, vocab, (HELDOUT_LOSS_WINDOWS, cfg.seqlen), generator=g)
    try:
        return heldout_calibration_windows(corpus_token_ids(tokenizer, cfg.calib_data, "calib"),
                                           HELDOUT_LOSS_WINDOWS, cfg.seqlen, cfg.nsamples, cfg.seed)
    except SequenceLengthError as exc:
        log.warning("no held-out calibration loss: %s", exc)
        return None
