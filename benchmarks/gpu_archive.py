"""The GPU run's commit stamp and its one archive (stdlib only: it runs on the GPU machine's image).

The lent GPU machine gets a copy of the working tree without `.git`, and gives back at most 8 files
of what the run writes under $OUT. So, here, before the run:

    python3 benchmarks/gpu_archive.py stamp            # writes gpu-stamp.json (ignored; `carry` it)

names the commit (and whether the tree differs from it) in a file the run reads when git cannot
answer; and during the run every record and log goes into ONE tar.gz under $OUT, rewritten
atomically after each record (`pack`), so a run killed at any moment still brings back everything
it finished. Back here:

    python3 benchmarks/gpu_archive.py unpack /work/.device/.../structprune-gpu.tar.gz \\
        --dest benchmarks/results/gpu/run3
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAMP_NAME = "gpu-stamp.json"  # at the repository root; .gitignore'd, carried to the device
ENV_COMMIT = "STRUCTPRUNE_GIT_COMMIT"


class ArchiveError(Exception):
    """A bad input to this tool: one line, exit 2."""


# --- which commit the run's code is -----------------------------------------------------------

def _git(root: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def git_state(root: Path = ROOT) -> dict | None:
    """{"git_commit", "git_dirty", "diff_sha256"} of the work tree at `root`, or None without git.
    dirty: tracked files differ from the commit (untracked files are not counted); the diff's hash
    tells two dirty trees apart."""
    head = _git(root, "rev-parse", "HEAD")
    if not head:
        return None
    diff = _git(root, "diff", "HEAD", "--binary") or ""
    return {"git_commit": head.strip(), "git_dirty": bool(diff),
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None}


def write_stamp(root: Path = ROOT, dest: Path | None = None) -> dict:
    """`dest` (default: `root`'s stamp file) names `root`'s commit and state."""
    state = git_state(root)
    if state is None:
        raise ArchiveError(f"{root} is not a git work tree (or git is missing): nothing to stamp")
    stamp = {**state, "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _atomic_write(Path(dest) if dest else root / STAMP_NAME, (json.dumps(stamp, indent=1) + "\n").encode())
    return stamp


def commit_info(root: Path = ROOT) -> dict:
    """The commit this tree's code is, and how we know: the environment variable (a launcher that
    knows better), git (a clone), the stamp file (a copy made from a clone, e.g. the GPU machine's),
    else nulls with source "unknown"."""
    env = os.environ.get(ENV_COMMIT, "").strip()
    if env:
        return {"git_commit": env, "git_dirty": None, "commit_source": "env"}
    state = git_state(root)
    if state is not None:
        return {"git_commit": state["git_commit"], "git_dirty": state["git_dirty"], "commit_source": "git"}
    path = root / STAMP_NAME
    try:
        stamp = json.loads(path.read_text())
        return {"git_commit": str(stamp["git_commit"]), "git_dirty": bool(stamp.get("git_dirty")),
                "commit_source": f"stamp {stamp.get('written', '')}".strip()}
    except (OSError, ValueError, KeyError, TypeError):
        return {"git_commit": None, "git_dirty": None, "commit_source": "unknown"}


# --- one archive of everything ----------------------------------------------------------------

def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pack(src: Path, archive: Path, prefix: str = "run") -> int:
    """Every regular file under `src` (hidden temporaries excluded) into `archive` (tar.gz) under
    `prefix/`, replacing the previous archive atomically. Returns the number of files packed."""
    src, archive = Path(src), Path(archive)
    buf = io.BytesIO()
    n = 0
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if not path.is_file() or path.is_symlink() or path.resolve() == archive.resolve() \
                    or any(part.startswith(".") for part in rel.parts):
                continue
            try:
                data = path.read_bytes()  # a log still being written: what it holds now
            except OSError:
                continue
            info = tarfile.TarInfo(f"{prefix}/{rel.as_posix()}")
            info.size, info.mtime, info.mode = len(data), int(path.stat().st_mtime), 0o644
            tar.addfile(info, io.BytesIO(data))
            n += 1
    _atomic_write(archive, buf.getvalue())
    return n


def unpack(archive: Path, dest: Path, force: bool = False) -> list[Path]:
    """The archive's regular files into `dest`, without its top folder. Refuses links, absolute
    paths and `..`, and files that exist already (unless `force`), all before writing anything."""
    archive, dest = Path(archive), Path(dest)
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if not m.isdir()]
        plan = []
        for m in members:
            parts = Path(m.name).parts
            if not m.isfile() or Path(m.name).is_absolute() or ".." in parts or len(parts) < 2:
                raise ArchiveError(f"{archive.name}: refusing member {m.name!r} (not a plain file under its folder)")
            target = dest.joinpath(*parts[1:])
            if target.exists() and not force:
                raise ArchiveError(f"{target} exists (use --force to overwrite)")
            plan.append((m, target))
        written = []
        for m, target in plan:
            _atomic_write(target, tar.extractfile(m).read())
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stamp", help=f"write {STAMP_NAME} at the repository root (before a GPU run)")
    s.add_argument("--root", default=str(ROOT))
    s.add_argument("--dest", default="", help="where to write it (default: the root's gpu-stamp.json)")
    p = sub.add_parser("pack", help="pack a folder into one tar.gz (atomic)")
    p.add_argument("src")
    p.add_argument("archive")
    p.add_argument("--prefix", default="run")
    u = sub.add_parser("unpack", help="unpack a GPU run's archive into a results folder")
    u.add_argument("archive")
    u.add_argument("--dest", default=str(ROOT / "benchmarks" / "results" / "gpu" / "run3"))
    u.add_argument("--force", action="store_true")
    c = sub.add_parser("commit", help="print the commit this tree's code is (as a GPU run records it)")
    c.add_argument("--root", default=str(ROOT))
    args = ap.parse_args(argv)
    try:
        return _main(args)
    except (ArchiveError, tarfile.TarError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(args) -> int:
    if args.cmd == "stamp":
        dest = Path(args.dest) if args.dest else Path(args.root) / STAMP_NAME
        stamp = write_stamp(Path(args.root), dest)
        print(f"{dest}: {stamp['git_commit'][:12]}"
              + (" (tracked files differ from it: commit first, or the records say dirty)" if stamp["git_dirty"] else ""))
    elif args.cmd == "pack":
        print(f"{args.archive}: {pack(Path(args.src), Path(args.archive), args.prefix)} files")
    elif args.cmd == "unpack":
        if not Path(args.archive).is_file():
            raise ArchiveError(f"no archive at {args.archive}")
        files = unpack(Path(args.archive), Path(args.dest), args.force)
        print(f"{len(files)} files into {args.dest}")
    else:
        print(json.dumps(commit_info(Path(args.root))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
