"""d2l-style back-links: bnlib docstrings name the chapter that derives or shows them
(`Book: book/...`), and every name resolves to a chapter of the book."""
import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK_LINE = re.compile(r"^\s*Book: (\S+)\s*$", re.M)


def back_links():
    """(module file, object name, chapter path) for every Book: line in bnlib's docstrings."""
    out = []
    for path in sorted((ROOT / "bnlib").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in [tree] + [n for n in ast.walk(tree)
                              if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]:
            doc = ast.get_docstring(node) or ""
            for target in BOOK_LINE.findall(doc):
                out.append((path.relative_to(ROOT).as_posix(), getattr(node, "name", "<module>"),
                            target))
    return out


def toc_chapters():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return {ch["file"] for part in toc["parts"] for ch in part["chapters"]}


def test_every_back_link_names_a_chapter_of_the_book():
    links = back_links()
    assert len(links) >= 20, links
    chapters = toc_chapters()
    for module, name, target in links:
        page = target.split("#", 1)[0]
        assert (ROOT / page).is_file(), f"{module}:{name} names {target}, which does not exist"
        assert page.rsplit(".", 1)[0] in chapters, f"{module}:{name} names {page}, not in _toc.yml"


def test_every_derivation_and_experiment_chapter_is_named_by_the_library():
    named = {t.split("#", 1)[0].rsplit(".", 1)[0] for _, _, t in back_links()}
    wanted = {c for c in toc_chapters() if c.startswith(("book/derivations/", "book/experiments/"))}
    assert wanted - named == set(), f"chapters no bnlib docstring links back to: {sorted(wanted - named)}"
