"""Perplexity: against a hand computation, and streamed == whole model."""

import math

import pytest
import torch

from structprune.errors import InvalidConfigError, SequenceLengthError
from structprune.evaluation import perplexity, perplexity_streamed, perplexity_whole
from structprune.models import TINY_MODELS, build_tiny


def _windows(n=3, s=32, vocab=512, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, s), generator=g)


def test_perplexity_equals_hand_computation():
    model = build_tiny("tiny-llama")
    win = _windows()
    # independent: token by token log-probabilities from the plain forward
    total, count = 0.0, 0
    with torch.no_grad():
        for w in win:
            logits = model(input_ids=w[None]).logits[0].double()
            for t in range(1, w.shape[0]):
                total -= torch.log_softmax(logits[t - 1], -1)[w[t]].item()
                count += 1
    got = perplexity(model, win, device="cpu", mode="whole")
    assert got.tokens == count == 3 * 31
    assert got.value == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_streamed_equals_whole(name):
    model = build_tiny(name)
    win = _windows(n=4)
    whole = perplexity_whole(model, win, torch.device("cpu"), batch_size=2)
    streamed = perplexity_streamed(model, win, torch.device("cpu"), batch_size=2)
    assert streamed.value == pytest.approx(whole.value, rel=1e-5)
    assert streamed.nll == pytest.approx(whole.nll, rel=1e-5)


def test_errors():
    model = build_tiny("tiny-llama")
    with pytest.raises(SequenceLengthError, match="exceeds the model's context of 256"):
        perplexity(model, _windows(s=300), device="cpu")
    with pytest.raises(InvalidConfigError, match="mode must be"):
        perplexity(model, _windows(), device="cpu", mode="fast")
