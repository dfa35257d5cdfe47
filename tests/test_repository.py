"""Static checks of the repository itself: documents the code cites exist, the README stays a
user's page, pages stay thin, model families stay in their modules, and the import graph has no
cycles. Pure text and `ast`: nothing is imported or run, so the whole file takes well under a
second.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"

# where code may name a markdown file
CITING = [ROOT / "structprune", ROOT / "benchmarks", ROOT / "pages", ROOT / "app.py", ROOT / "tests"]
# a file name ending in .md, optionally with a folder path in front (benchmarks/results/SUMMARY.md)
MD_NAME = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w.-]+\.md)\b")

README_MAX_BYTES = 15 * 1024
README_COMMANDS_WITHIN = 40  # lines
PAGE_MAX_LINES = 200

# Hugging Face `model_type` values: a module that compares against one of them knows a family
MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "gemma", "gemma2", "gemma3",
    "gemma3_text", "opt", "gpt2", "gpt_neox", "phi", "phi3", "falcon",
})
# the only modules allowed to know families: the adapters, the published shapes, the model loader, and
# the modeling file shipped in exported folders (it runs without structprune, so cannot ask the adapters)
FAMILY_MODULES = frozenset({"adapters.py", "presets.py", "models.py", "modeling_structprune.py"})


def python_files(*places: Path) -> list[Path]:
    out: list[Path] = []
    for place in places:
        if place.is_file():
            out.append(place)
        elif place.is_dir():
            out += sorted(p for p in place.rglob("*.py") if "__pycache__" not in p.parts)
    return out


# ------------------------------------------------------------------------- cited documents


def cited_markdown() -> list[tuple[Path, int, str]]:
    """(citing file, line, name) of every `*.md` name in the code, tests included."""
    found = []
    for f in python_files(*CITING):
        if f.resolve() == Path(__file__).resolve():
            continue
        for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            for m in MD_NAME.finditer(line):
                found.append((f, lineno, m.group(1)))
    return found


def resolves(citing: Path, name: str) -> bool:
    """A cited name exists: at its path from the repository root or from the citing file's folder;
    a bare name (no folder) also anywhere under benchmarks/results/ (the reports the benchmark
    scripts write there, e.g. ABLATIONS.md). The design documents are cited with their folder,
    docs/METHOD.md, so a bare METHOD.md does not resolve."""
    if (ROOT / name).is_file() or (citing.parent / name).is_file():
        return True
    return "/" not in name and any(p.is_file() for p in RESULTS.rglob(name))


def test_markdown_regex_finds_names():
    line = 'see docs/METHOD.md "ADMM", docs/PROTOCOL.md and (benchmarks/results/SUMMARY.md); not x.mdx'
    assert [m.group(1) for m in MD_NAME.finditer(line)] == [
        "docs/METHOD.md", "docs/PROTOCOL.md", "benchmarks/results/SUMMARY.md"]


def test_code_cites_markdown_at_all():
    names = {name.rsplit("/", 1)[-1] for _, _, name in cited_markdown()}
    # the citations this check exists for; if none were found the regex or the paths are wrong
    assert {"METHOD.md", "PROTOCOL.md"} <= names


def test_every_cited_markdown_file_exists():
    missing = sorted({f"{f.relative_to(ROOT)}:{line}: {name}"
                      for f, line, name in cited_markdown() if not resolves(f, name)})
    assert missing == [], "markdown files named in code but not in the repository:\n" + "\n".join(missing)


def test_docs_have_the_headings_the_code_cites():
    """`docs/METHOD.md "The per-module subproblem"` in code needs that heading in docs/METHOD.md."""
    cite = re.compile(r"((?:docs/)?(?:METHOD|PROTOCOL)\.md)\s*,?\s*((?:\"[^\"\n]+\"\s*,?\s*)+)")
    missing = []
    for f in python_files(*CITING):
        if f.resolve() == Path(__file__).resolve():
            continue
        text = f.read_text(encoding="utf-8")
        for m in cite.finditer(text):
            doc = DOCS / m.group(1).rsplit("/", 1)[-1]
            if not doc.is_file():
                continue  # reported by test_every_cited_markdown_file_exists
            headings = [h.strip().lower() for h in re.findall(r"^#+\s+(.*)$", doc.read_text(encoding="utf-8"), re.M)]
            for heading in re.findall(r"\"([^\"\n]+)\"", m.group(2)):
                if not any(h.startswith(heading.lower()) for h in headings):
                    missing.append(f"{f.relative_to(ROOT)}: {doc.name} \"{heading}\"")
    assert missing == [], "cited headings missing from docs/:\n" + "\n".join(sorted(set(missing)))


# ------------------------------------------------------------------------------- README


def test_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; at most {README_MAX_BYTES}"


def test_readme_shows_both_commands_first():
    head = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:README_COMMANDS_WITHIN]
    text = "\n".join(head)
    for command in ("make app", "make test"):
        assert command in text, f"`{command}` is not in the first {README_COMMANDS_WITHIN} lines of README.md"


def test_readme_links_resolve():
    """Relative links and images of the README point at files of the repository."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+:", t)]
    assert local, "the README links no local file (docs/, screenshots)"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert missing == []


# -------------------------------------------------------------------------------- pages


@pytest.mark.parametrize("page", sorted((ROOT / "pages").glob("*.py")), ids=lambda p: p.name)
def test_page_is_thin(page: Path):
    lines = len(page.read_text(encoding="utf-8").splitlines())
    assert lines <= PAGE_MAX_LINES, f"pages/{page.name} has {lines} lines; at most {PAGE_MAX_LINES}"


# ------------------------------------------------------------------------ model families


def family_literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in MODEL_TYPES]


def test_family_check_sees_literals(tmp_path: Path):
    f = tmp_path / "x.py"
    f.write_text('a = "opt"\nb = \'gemma3_text\'\nc = "optimal"\nd = "Llama-2"\n')
    assert family_literals(f) == [(1, "opt"), (2, "gemma3_text")]


def test_families_stay_in_adapters():
    found = [f"{f.relative_to(ROOT)}:{line}: {value!r}"
             for f in python_files(ROOT / "structprune") if f.name not in FAMILY_MODULES
             for line, value in family_literals(f)]
    assert found == [], ("model families named outside " + ", ".join(sorted(FAMILY_MODULES)) + ":\n"
                         + "\n".join(found))


# --------------------------------------------------------------------------- import graph


def module_names(package: Path) -> dict[str, Path]:
    """Dotted name -> file for every module of `package` (a folder; its name is the top level)."""
    out = {}
    for f in python_files(package):
        parts = f.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import in the file, at any depth
    (functions included), relative imports resolved; only modules of `modules` are returned."""
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    out.append((alias.name, None))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # from package import submodule
                    out.append((sub, None))
                elif base in modules:
                    out.append((base, alias.name))
    return out


def import_graph(package: Path) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """The module graph and the private names imported across modules (importer, module, name)."""
    modules = module_names(package)
    graph: dict[str, set[str]] = {}
    private = []
    for name, path in modules.items():
        deps = set()
        for target, imported in imports_of(name, path, modules):
            if target == name:
                continue
            deps.add(target)
            if imported is not None and imported.startswith("_") and not imported.startswith("__"):
                private.append((name, target, imported))
        graph[name] = deps
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return sorted(out)


def test_cycle_finder_on_a_known_graph():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set(), "g": {"g"}}
    assert cycles(g) == [["a", "b", "c"], ["d", "e"]]


def test_import_resolution(tmp_path: Path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import thing\n\ndef f():\n    from .sub import c\n")
    (pkg / "b.py").write_text("import pkg.a\nfrom pkg.sub.c import _hidden\n")
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("from ..b import x\n")
    graph, private = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b", "pkg.sub.c"}, "pkg.b": {"pkg.a", "pkg.sub.c"},
                     "pkg.sub": {"pkg.sub.c"}, "pkg.sub.c": {"pkg.b"}}
    assert private == [("pkg.b", "pkg.sub.c", "_hidden")]
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


@pytest.mark.parametrize("package", ["structprune", "benchmarks"])
def test_no_import_cycles(package: str):
    graph, _ = import_graph(ROOT / package)
    assert len(graph) > 5  # the package was found and parsed
    found = cycles(graph)
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_private_imports_across_modules():
    _, private = import_graph(ROOT / "structprune")
    found = [f"{importer} imports {name} from {module}" for importer, module, name in private]
    assert found == [], "private names imported across modules:\n" + "\n".join(found)
