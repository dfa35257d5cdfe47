"""The real built-in model (SmolLM2-135M, 4-bit GGUF dequantized), a few windows of real text,
and the command line's error messages."""

import math

import pytest
import torch

from structprune.cli import main
from structprune.data.windows import corpus_token_ids, eval_windows
from structprune.errors import ModelLoadError, UnknownModelError
from structprune.evaluation import perplexity
from structprune.models import converted_dir, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


def test_dense_perplexity_of_the_builtin_model(smollm):
    win = eval_windows(corpus_token_ids(smollm.tokenizer, "sotu", "test"), 512, 4)
    res = perplexity(smollm.model, win, device="cpu")
    assert math.isfinite(res.value) and 15 < res.value < 40
    assert res.windows == 4 and res.tokens == 4 * 511


def test_converted_cache_reloads_with_identical_logits(smollm):
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(converted_dir("smollm2-135m"), dtype=torch.float32)
    ids = torch.arange(100, 164)[None]
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, smollm.model(input_ids=ids).logits, rtol=0, atol=0)


def test_library_errors():
    with pytest.raises(UnknownModelError, match="built-in name .*smollm2-135m"):
        load_model("gpt-17")
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_model("someorg/some-model-that-is-not-cached")


def test_folder_without_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--model", "gpt-17"], "unknown model 'gpt-17'"),
        (["eval", "--windows", "0"], "--windows must be at least 1"),
        (["eval", "--seqlen", "9000"], "exceeds the model's context of 8192"),
        (["eval", "--data", "wikitext2", "--windows", "1"], "wikitext2"),
        (["eval", "--data", "/no/such/file.txt", "--windows", "1"], "/no/such/file.txt"),
        (["prune", "--sparsity", "0.95"], "sparsity must be between 0 and 0.9"),
        (["prune", "--model", "tiny-llama", "--allocation", "softmax", "--temperature", "-1"], "temperature must be positive"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_cli_eval_prints_perplexity_and_protocol(capsys):
    assert main(["eval", "--model", "smollm2-135m", "--data", "sotu", "--seqlen", "256", "--windows", "2"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "sotu-test · seqlen 256 · 2 windows" in out


@pytest.mark.heavy
def test_structprune_beats_uniform_magnitude_at_30_percent(smollm):
    """End to end on the real model, kept cheap for the suite: one-shot diagonal saliency + refit,
    residual-energy softmax allocation, 8 x 256 calibration windows, 2 evaluation windows."""
    from structprune.config import PruneConfig
    from structprune.run import run_prune

    common = dict(model="smollm2-135m", sparsity=0.3, nsamples=8, seqlen=256, eval_windows=2, device="cpu")
    ours = run_prune(PruneConfig(method="structprune", allocation="softmax", energy="residual", selector="saliency",
                                 saliency="diag",
                                 **common), loaded=smollm, evaluate_dense=False).record
    mag = run_prune(PruneConfig(method="magnitude", **common), loaded=smollm, evaluate_dense=False).record
    ppl_ours = ours["ppl"]["pruned"]["sotu"]["value"]
    ppl_mag = mag["ppl"]["pruned"]["sotu"]["value"]
    assert ppl_ours is not None and math.isfinite(ppl_ours)
    assert ppl_mag is None or ppl_ours < ppl_mag
    assert abs(ours["sparsity"]["achieved_prunable"] - 0.3) < 0.01
