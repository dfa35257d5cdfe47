"""Corpora (by name or path, each with a ``test`` and a ``calib`` split) and the token windows
cut from them for perplexity and calibration. See ``corpora.py`` for the splits and
``windows.py`` for the protocol (docs/PROTOCOL.md).

Importing this package is cheap: ``datasets`` is imported only when a corpus is loaded.
"""

from structprune.data.corpora import (
    BUILTIN,
    SPLITS,
    CorpusInfo,
    available_corpora,
    corpus_catalog,
    corpus_id,
    corpus_label,
    load_corpus,
    load_corpus_dataset,
    prepare_corpora,
)
from structprune.data.windows import (
    CalibrationSpec,
    calibration_windows,
    heldout_calibration_windows,
    corpus_token_ids,
    eval_windows,
    n_eval_windows,
    protocol_string,
    tokenize_corpus,
    tokenizer_fingerprint,
)

__all__ = [
    "BUILTIN",
    "SPLITS",
    "CalibrationSpec",
    "CorpusInfo",
    "available_corpora",
    "calibration_windows",
    "heldout_calibration_windows",
    "corpus_catalog",
    "corpus_id",
    "corpus_label",
    "corpus_token_ids",
    "eval_windows",
    "load_corpus",
    "load_corpus_dataset",
    "n_eval_windows",
    "prepare_corpora",
    "protocol_string",
    "tokenize_corpus",
    "tokenizer_fingerprint",
]
