"""Structure of the book: _config.yml, _toc.yml, chapters, Colab set-up cells, references, CI."""
import re
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())

# The fixed layout of the book: _toc.yml must list exactly these, in this order.
LAYOUT = [
    "book/intro", "book/questions", "book/notation",
    "book/derivations/transform", "book/derivations/deployment",
    "book/derivations/bias_cancelled", "book/derivations/backward",
    "book/derivations/jacobian", "book/derivations/scale_invariance",
    "book/derivations/batch_renorm",
    "book/experiments/covariate_shift", "book/experiments/noisy_bn",
    "book/experiments/inference_stats", "book/experiments/small_batches",
    "book/experiments/variance_correction", "book/experiments/sync_bn",
    "book/experiments/gradients", "book/experiments/residual", "book/experiments/convnet",
    "book/experiments/regularisation",
    "book/performance", "book/bibliography",
]
MARKDOWN_PAGES = {"book/intro", "book/questions", "book/notation", "book/bibliography"}
CHAPTERS = [d for d in LAYOUT if d not in MARKDOWN_PAGES]
REQUIRED_KEYS = [
    "ioffe2015batch", "ioffe2017batch", "santurkar2018how", "yang2019mean", "wu2021rethinking",
    "lecun1998efficient", "lecun2012efficient", "greydanus2020scaling", "paszke2019pytorch",
    "meurer2017sympy", "pedregosa2011scikit", "hoffer2018norm", "vanlaarhoven2017l2",
    "arora2019theoretical",
]
SETUP_TEMPLATE = (
    "# On Colab, install bnlib from the book's repository (skipped everywhere else).\n"
    "import sys\n"
    "if \"google.colab\" in sys.modules:\n"
    "    %pip install -q \"bnlib @ git+{url}@{branch}\""
)


def toc_docnames():
    """Every page named in _toc.yml, root first."""
    names = [TOC["root"]]
    for part in TOC.get("parts", []):
        names += [entry["file"] for entry in part["chapters"]]
    return names


def read_notebook(docname):
    return nbformat.read(ROOT / f"{docname}.ipynb", as_version=4)


# --- _toc.yml and the files it names ---------------------------------------------------------

def test_toc_lists_the_book_layout():
    assert TOC["format"] == "jb-book"
    assert toc_docnames() == LAYOUT


@pytest.mark.parametrize("docname", LAYOUT)
def test_toc_entry_exists(docname):
    suffix = ".md" if docname in MARKDOWN_PAGES else ".ipynb"
    assert (ROOT / f"{docname}{suffix}").is_file(), f"{docname}{suffix} is in _toc.yml but missing"


def test_no_source_outside_the_toc():
    """Every .ipynb/.md under book/ is a page of the book, with no paired .md beside a notebook."""
    listed = set(LAYOUT)
    stray = [str(p.relative_to(ROOT)) for p in (ROOT / "book").rglob("*")
             if p.suffix in (".ipynb", ".md") and ".ipynb_checkpoints" not in p.parts
             and str(p.relative_to(ROOT).with_suffix("")) not in listed]
    assert not stray, f"sources under book/ that _toc.yml does not list (Sphinx would warn): {stray}"


# --- _config.yml -------------------------------------------------------------------------

def test_config_is_strict_and_offline():
    assert CONFIG["only_build_toc_files"] is True
    execute = CONFIG["execute"]
    assert execute["execute_notebooks"] == "cache"
    assert execute["allow_errors"] is False
    assert 0 < execute["timeout"] <= 900
    sphinx = CONFIG["sphinx"]["config"]
    assert sphinx["nb_execution_raise_on_error"] is True
    extensions = sphinx["extensions"]
    for name in ("sphinx_proof", "sphinx-mathjax-offline", "sphinxcontrib.bibtex", "myst_nb"):
        assert name in extensions
    assert "sphinx_thebe" not in extensions, "sphinx_thebe writes a CDN address into every page"
    assert set(CONFIG["parse"]["myst_enable_extensions"]) >= {"dollarmath", "amsmath", "colon_fence"}
    for pattern in ("README.md", "bench", "tests", ".venv", "_build"):
        assert pattern in CONFIG["exclude_patterns"]


def test_config_repository_and_launch():
    repo = CONFIG["repository"]
    assert repo["url"] == "https://github.com/bnbook/batchnorm-book"
    assert repo["branch"] == "main"
    assert repo["path_to_book"] == ""
    assert CONFIG["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert CONFIG["sphinx"]["config"]["html_theme_options"]["use_download_button"] is True


def test_bibfiles_exist():
    for bib in CONFIG["bibtex_bibfiles"]:
        assert (ROOT / bib).is_file()


# --- chapters: first cells, Colab set-up -------------------------------------------------------

@pytest.mark.parametrize("docname", CHAPTERS)
def test_chapter_opens_with_title_and_notation_link(docname):
    nb = read_notebook(docname)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), \
        f"{docname}: cell 1 must be a markdown cell starting with '# Title'"
    links = re.findall(r"\]\(([^)]*notation\.md)\)", first.source)
    assert links, f"{docname}: cell 1 does not link to the notation page"
    for link in links:
        target = (ROOT / docname).parent / link
        assert target.resolve() == (ROOT / "book" / "notation.md").resolve(), link


@pytest.mark.parametrize("docname", CHAPTERS)
def test_chapter_has_colab_setup_cell(docname):
    """Cell 2 installs bnlib from _config.yml's repository and branch, only on Colab."""
    nb = read_notebook(docname)
    tagged = [i for i, c in enumerate(nb.cells) if "colab-setup" in c.metadata.get("tags", [])]
    assert tagged == [1], f"{docname}: exactly cell 2 must carry the colab-setup tag, got {tagged}"
    cell = nb.cells[1]
    assert cell.cell_type == "code"
    match = re.search(r"git\+(\S+?)@([\w./-]+)\"", cell.source)
    assert match, f"{docname}: the setup cell installs no git URL"
    assert (match.group(1), match.group(2)) == (CONFIG["repository"]["url"],
                                                CONFIG["repository"]["branch"])
    expected = SETUP_TEMPLATE.format(url=CONFIG["repository"]["url"],
                                     branch=CONFIG["repository"]["branch"])
    assert cell.source.strip() == expected


# --- references --------------------------------------------------------------------------

def _bib_entries():
    from pybtex.database import parse_file
    return parse_file(str(ROOT / "book" / "references.bib"), bib_format="bibtex").entries


def test_references_complete():
    entries = _bib_entries()
    missing = [k for k in REQUIRED_KEYS if k not in entries]
    assert not missing, f"book/references.bib lacks {missing}"
    for key, entry in entries.items():
        assert entry.persons.get("author"), f"{key}: no author"
        for field in ("title", "year"):
            assert entry.fields.get(field), f"{key}: no {field}"
        venue = {"inproceedings": "booktitle", "incollection": "booktitle",
                 "article": "journal", "book": "publisher"}.get(entry.type)
        assert venue is None or entry.fields.get(venue), f"{key}: no {venue}"


def _cited_keys():
    """Keys cited with {cite}/{cite:p}/{cite:t} in every page of the book."""
    keys = {}
    for docname in LAYOUT:
        for suffix in (".md", ".ipynb"):
            path = ROOT / f"{docname}{suffix}"
            if not path.is_file():
                continue
            text = path.read_text() if suffix == ".md" else "\n".join(
                c.source for c in nbformat.read(path, as_version=4).cells
                if c.cell_type == "markdown")
            for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", text):
                for key in group.split(","):
                    keys.setdefault(key.strip(), docname)
    return keys


def test_every_reference_is_cited():
    """The bibliography page lists cited entries only, so an uncited entry would never appear."""
    uncited = sorted(set(_bib_entries()) - set(_cited_keys()))
    assert not uncited, f"book/references.bib entries that no page cites: {uncited}"


def test_every_cited_key_is_in_references():
    entries = _bib_entries()
    cited = _cited_keys()
    assert cited, "no page cites anything"
    unknown = {k: d for k, d in cited.items() if k not in entries}
    assert not unknown, f"cited but not in book/references.bib: {unknown}"


# --- Makefile, .ci/run and GitHub Actions --------------------------------------------------------

def _recipe(target):
    """The recipe lines of a Makefile target."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"{re.escape(target)}:", line))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return lines[start], recipe


def test_makefile_targets():
    head, recipe = _recipe("book")
    assert any("jupyter-book build ." in r and "--warningiserror" in r for r in recipe) or \
        "$(JB_BUILD)" in recipe
    head, recipe = _recipe("test")
    assert "book-stored" in head, "make test must build the HTML the browser test opens"
    assert any("-m pytest" in r for r in recipe)
    _, recipe = _recipe("book-stored")
    assert any('"execute_notebooks"] = "off"' in r for r in recipe)


def test_ci_run_calls_make_test():
    text = (ROOT / ".ci" / "run").read_text()
    assert text.rstrip().splitlines()[-1] == "make test"
    assert "apt-get install -y" in text and "chromium" in text


def _workflow(name):
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())
    # PyYAML reads the bare key `on` as the boolean True.
    triggers = wf.get("on", wf.get(True))
    runs = [step.get("run", "") for job in wf["jobs"].values() for step in job.get("steps", [])]
    uses = [step.get("uses", "") for job in wf["jobs"].values() for step in job.get("steps", [])]
    return wf, triggers, runs, uses


def test_workflows_are_valid_yaml():
    files = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert {f.name for f in files} >= {"book.yml", "test.yml"}
    for f in files:
        wf, triggers, _, _ = _workflow(f.name)
        assert wf["name"] and triggers and wf["jobs"], f.name
        for job_name, job in wf["jobs"].items():
            assert job["runs-on"], f"{f.name}: job {job_name} has no runs-on"
            for step in job["steps"]:
                assert ("run" in step) != ("uses" in step), f"{f.name}: step {step}"


def test_book_workflow_builds_and_publishes():
    _, triggers, runs, uses = _workflow("book.yml")
    assert "push" in triggers
    assert any(re.match(r"make book\b", r) for r in runs)
    assert any(u.startswith("actions/upload-pages-artifact@") for u in uses)
    assert any(u.startswith("actions/deploy-pages@") for u in uses)
    wf, _, _, _ = _workflow("book.yml")
    upload = next(s for job in wf["jobs"].values() for s in job["steps"]
                  if s.get("uses", "").startswith("actions/upload-pages-artifact@"))
    assert upload["with"]["path"] == "_build/html"
    assert wf["permissions"]["pages"] == "write" and wf["permissions"]["id-token"] == "write"


def test_test_workflow_runs_make_test_on_pull_requests():
    _, triggers, runs, _ = _workflow("test.yml")
    assert "pull_request" in triggers
    assert any(r.strip() in ("make test", "bash .ci/run") for r in runs)



# --- the notation page names real bnlib objects ---------------------------------------------

def test_notation_names_exist_in_bnlib():
    import inspect

    import numpy as np

    from bnlib import functional, reference
    text = (ROOT / "book" / "notation.md").read_text()
    functions = set(re.findall(r"reference\.(\w+)", text))
    assert functions, "the notation page names no bnlib.reference function"
    assert not [f for f in functions if not hasattr(reference, f)], functions
    _, cache = reference.forward(np.arange(6.0).reshape(3, 2), np.ones(2), np.zeros(2))
    attributes = set(re.findall(r"cache\.(\w+)", text))
    assert attributes >= {"mean", "var", "x_hat", "m", "inv_std"}
    assert not [a for a in attributes if not hasattr(cache, a)], attributes
    # The six partials appear in the paper's order, the order of reference.STAGES.
    assert tuple(dict.fromkeys(re.findall(r"\[\"(dl_\w+)\"\]", text))) == reference.STAGES
    # Names and defaults the page quotes for the PyTorch drop-in.
    params = inspect.signature(functional.batch_norm).parameters
    for name in ("weight", "bias", "running_mean", "running_var", "momentum", "eps"):
        assert name in params and f"`{name}`" in text
    assert params["eps"].default == 1e-5 and "`1e-5`" in text
    assert params["momentum"].default == 0.1 and "`0.1`" in text
    assert inspect.signature(reference.forward).parameters["eps"].default == 1e-5
