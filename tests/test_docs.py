"""Documentation site, notebooks and example scripts.

* the MkDocs site (API reference from docstrings included) builds with ``--strict``;
* every notebook in ``examples/`` executes top to bottom (real default model, CPU) and is
  stored without outputs;
* relative links in README.md and docs/*.md point at files that exist;
* every script in ``examples/`` parses and answers ``--help``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
SCRIPTS = sorted(EXAMPLES.glob("*.py"))
MARKDOWN = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

#: Python modules the ``docs`` extra provides (module name -> distribution).
DOCS_MODULES = {"mkdocs": "mkdocs", "material": "mkdocs-material", "mkdocstrings": "mkdocstrings[python]",
                "mkdocstrings_handlers.python": "mkdocstrings[python]"}
#: Modules needed to execute notebooks.
NOTEBOOK_MODULES = {"nbclient": "nbclient", "nbformat": "nbformat", "ipykernel": "ipykernel"}

#: Text each notebook's outputs must contain: evidence that it did its job, not just ran.
NOTEBOOK_EXPECTS = {
    "quickstart.ipynb": ["hits: [True, True, True]", "round trip equal: True", "3 chunks read from the store"],
    "langchain_rag.ipynb": ["2 chunks from the store, 0 fallbacks", "[[cc:"],
    "llamaindex_rag.ipynb": ["'compressed': 0}", "chunks from the store, 0 fallbacks"],
    "how_much_survives.ipynb": ["mean ROUGE-L kv-k16", "mean ROUGE-L kv-k4", "kv-k16-plain"],
}
#: Notebooks that must display this many figures.
NOTEBOOK_FIGURES = {"how_much_survives.ipynb": 2}


def _missing(modules: dict[str, str]) -> list[str]:
    missing = []
    for mod, dist in modules.items():
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(dist)
    return sorted(set(missing))


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env.setdefault("OMP_NUM_THREADS", str(max(1, min(4, os.cpu_count() or 1))))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["NO_MKDOCS_2_WARNING"] = "1"
    return env


# ------------------------------------------------------------------------------------- site
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    missing = _missing(DOCS_MODULES)
    if missing:
        pytest.skip(f"the docs toolchain is not installed (missing: {', '.join(missing)}); "
                    "install the 'docs' extra to build the site")
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(REPO / "mkdocs.yml"), "--site-dir", str(site)],
                          cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    # every page of docs/ was built, and the API reference really holds the generated docstrings
    for md in sorted((REPO / "docs").glob("*.md")):
        page = site / ("index.html" if md.stem == "index" else f"{md.stem}/index.html")
        assert page.is_file(), f"{md.name} was not built"
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("CompressionEngine", "CompressorConfig", "CompressedContext", "GenerationConfig", "ContextStore",
                 "load_base_model", "resolve_markers", "qa_prompt", "CompressedChatModel", "CompressTransform",
                 "ContextByteStore", "Look chunks up in the store"):
        assert name in api, f"{name!r} missing from the generated API reference"
    assert 'class="mermaid"' in (site / "concepts" / "index.html").read_text(encoding="utf-8")


# -------------------------------------------------------------------------------- notebooks
def test_notebooks_exist() -> None:
    assert {p.name for p in NOTEBOOKS} >= set(NOTEBOOK_EXPECTS), "a documented notebook is missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_stored_without_outputs(path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.get("outputs") == [], f"{path.name} cell {i} has stored outputs"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_uses_temporary_store(path: Path) -> None:
    """Notebooks never write to the user's default store."""
    code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]
                     if c["cell_type"] == "code")
    assert "ContextStore()" not in code
    for call in re.finditer(r"(?:CompressionEngine|CompressedChatModel|CompressedLLM|CompressTransform)"
                            r"\.from_pretrained\(([^)]*)\)", code):
        assert "store=" in call.group(1), f"{path.name}: {call.group(0)} opens the default store"
    if "store=" in code:
        assert "tempfile.mkdtemp(" in code and "shutil.rmtree(" in code


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path: Path) -> None:
    missing = _missing(NOTEBOOK_MODULES)
    if missing:
        pytest.skip(f"notebook execution needs {', '.join(missing)}")
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(EXAMPLES)}})
    t0 = time.perf_counter()
    client.execute(env=_subprocess_env())  # raises CellExecutionError on the first failing cell
    seconds = time.perf_counter() - t0
    texts: list[str] = []
    figures = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            assert out.get("output_type") != "error", f"{path.name}: {out.get('ename')}: {out.get('evalue')}"
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                texts.append(out["text"])
            elif out.get("output_type") in ("display_data", "execute_result"):
                texts.append(str(out.get("data", {}).get("text/plain", "")))
                figures += "image/png" in out.get("data", {})
    printed = "".join(texts)
    for expected in NOTEBOOK_EXPECTS.get(path.name, []):
        assert expected in printed, f"{path.name}: {expected!r} not in its output:\n{printed[-3000:]}"
    assert figures == NOTEBOOK_FIGURES.get(path.name, figures), f"{path.name}: {figures} figures"
    print(f"{path.name} executed in {seconds:.1f} s")


# ------------------------------------------------------------------------------------ links
_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,}).*?^\1\2[ \t]*$", re.S | re.M)
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
_HTML = re.compile(r"""(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)


def relative_links(markdown: str) -> list[str]:
    """Link targets in markdown text that point at files (no scheme, not only an anchor), code excluded."""
    text = _INLINE_CODE.sub("", _FENCE.sub("", markdown))
    targets = [m.group(1) for rx in (_LINK, _REF_DEF, _HTML) for m in rx.finditer(text)]
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) and not t.startswith(("#", "//"))]


def test_link_extraction() -> None:
    sample = ("See [the store](store.md#keys), ![curves](images/c.png \"title\") and [web](https://x.org).\n"
              "Not `[code](nope.md)`, and\n```\n[fenced](nope2.md)\n```\n[ref]: other.md\n"
              "[a link\nover two lines](two.md) <a href=\"page.html\">x</a> [top](#anchor)\n")
    assert relative_links(sample) == ["store.md#keys", "images/c.png", "two.md", "other.md", "page.html"]


def test_relative_links_resolve() -> None:
    broken: list[str] = []
    checked = 0
    for md in MARKDOWN:
        for target in relative_links(md.read_text(encoding="utf-8")):
            path = target.split("#", 1)[0].split("?", 1)[0]
            if not path:
                continue
            checked += 1
            if not (md.parent / path).exists():
                broken.append(f"{md.relative_to(REPO)}: {target}")
    assert not broken, "broken relative links:\n" + "\n".join(broken)
    assert checked >= 10, f"only {checked} relative links found; the link scanner is probably broken"


# ---------------------------------------------------------------------------------- scripts
def test_example_scripts_exist() -> None:
    assert SCRIPTS, "no example scripts"


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_example_script_help(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    ast.parse(source, filename=str(path))
    if "argparse" not in source:
        return  # nothing more to check without a command line
    proc = subprocess.run([sys.executable, str(path), "--help"], cwd=REPO, env=_subprocess_env(),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{path.name} --help failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.lstrip().startswith("usage:"), proc.stdout
