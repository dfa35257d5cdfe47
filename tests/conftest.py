"""Shared fixtures. Keep this file small: a fixture used by one test file lives in that file."""

from __future__ import annotations

import os

# No test may reach a model/data hub: force the Hugging Face libraries offline before anything
# imports them (they read these variables at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import time  # noqa: E402

import pytest  # noqa: E402


def wait_until(cond, timeout: float = 120.0, step: float = 0.05) -> None:
    """Polls `cond()` until it is true (a background job's state); fails the test after `timeout` s.
    A plain function, not a fixture: the test files import it (`from conftest import wait_until`)."""
    t = time.time()
    while not cond():
        assert time.time() - t < timeout, "timed out"
        time.sleep(step)


TINY_TOKENIZER_TEXT = [
    "Mr. Speaker, Mr. Vice President, Members of Congress, my fellow Americans:",
    "The state of our Union is strong, and our economy is growing again.",
    "We will build the roads, the bridges and the schools of the next century.",
    "Tonight I ask you to pass a budget that invests in our children and our workers.",
    "The jury said the election was conducted with fairness and care.",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A real byte-level BPE tokenizer (vocab 384) trained in code on fixed sentences: any text
    tokenizes, in milliseconds, with no files and no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TINY_TOKENIZER_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   model_max_length=1 << 30)
