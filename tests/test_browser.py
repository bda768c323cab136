"""The built HTML book, read the way a reader reads it: every page of _toc.yml in headless Chromium,
on a desktop screen and on a phone.

BOOK_HTML names the built book to test (relative to the repository root, or absolute); default
_build/html, which is built from the stored outputs first when it is missing. A BOOK_HTML that
has no index.html fails instead of being built, so a build of one's own elsewhere is tested as
it is. Screenshots go to screenshots/ beside that folder (_build/screenshots by default).
"""
import functools
import http.server
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / os.environ["BOOK_HTML"] if os.environ.get("BOOK_HTML") else ROOT / "_build" / "html"
SCREENSHOTS = HTML.parent / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update",
                 "--disable-sync"]
# Per page: loading, typesetting and a full-page screenshot take a few seconds on 2 cores;
# 120 s only catches a page that never finishes.
PAGE_TIMEOUT_MS = 120_000
# Each page is read at both widths: the theme's desktop layout, and a 390-px phone (an iPhone
# 12-15's width in CSS pixels, the narrowest width the book's figures and equations are made for).
# Desktop emulation (no is_mobile): a mobile browser would zoom out to fit an overflowing page,
# which hides exactly the overflow this test looks for.
VIEWPORTS = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}
# scrollWidth and innerWidth are whole pixels and scrollWidth rounds the fractional right edge of
# the content, so a page whose content ends exactly at the edge can read 1 px over; a word, table
# or figure too wide for the screen is many pixels over.
OVERFLOW_TOLERANCE_PX = 1


def toc_docnames():
    """Every page of the book, in _toc.yml order (root first)."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    names = [toc["root"]]
    for part in toc.get("parts", []):
        names += [entry["file"] for entry in part["chapters"]]
    return names


def source_of(docname):
    """The source file of a page (.ipynb or .md), or None if it does not exist yet."""
    for suffix in (".ipynb", ".md"):
        path = ROOT / (docname + suffix)
        if path.exists():
            return path
    return None


def expected_colab_url(docname):
    """Colab link for a notebook page, built from _config.yml's repository and launch settings."""
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo = cfg["repository"]
    owner_repo = urlsplit(repo["url"]).path.strip("/")
    book = repo.get("path_to_book", "").strip("/")
    path = f"{book}/{docname}.ipynb" if book else f"{docname}.ipynb"
    colab = cfg["launch_buttons"]["colab_url"].rstrip("/")
    return f"{colab}/github/{owner_repo}/blob/{repo['branch']}/{path}"


@pytest.fixture(scope="module")
def built_book():
    """The book under test: _build/html, built from the stored outputs first if it is missing
    (never skipped); a BOOK_HTML folder is never built into."""
    if os.environ.get("BOOK_HTML") and not (HTML / "index.html").exists():
        pytest.fail(f"BOOK_HTML={os.environ['BOOK_HTML']}: no index.html in {HTML}; build the book "
                    "there first (jupyter-book build . --path-output DIR puts it in DIR/_build/html)")
    if not (HTML / "index.html").exists():
        # Build with the environment running this test; -o: take it as installed already.
        venv = os.path.relpath(sys.prefix, ROOT)
        subprocess.run(["make", "-o", f"{venv}/.installed", f"VENV={venv}", "book-stored"],
                       cwd=ROOT, check=True)
    assert (HTML / "index.html").exists(), "the book build did not produce _build/html/index.html"
    return HTML


@pytest.fixture(scope="module")
def site(built_book):
    """Serve _build/html on a free loopback port for the duration of the module."""
    handler = functools.partial(_QuietHandler, directory=str(built_book))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static file handler that does not log every request to stderr."""

    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium driven by playwright; missing Chromium fails under CI=true."""
    if not Path(CHROMIUM).exists():
        message = (f"{CHROMIUM} not found: install Debian's chromium "
                   "(apt-get update && apt-get install -y chromium); .ci/run does this")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


# JavaScript run in the page after MathJax has finished.
_PAGE_FACTS_JS = r"""
() => {
  const skip = new Set(['PRE', 'CODE', 'SCRIPT', 'STYLE', 'TEXTAREA', 'MJX-CONTAINER', 'TEMPLATE']);
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const texts = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    let el = n.parentElement, skipped = false;
    for (; el; el = el.parentElement) { if (skip.has(el.tagName)) { skipped = true; break; } }
    if (!skipped) texts.push(n.textContent);
  }
  return {
    texts: texts,
    mathNodes: document.querySelectorAll('span.math, div.math').length,
    mjx: document.querySelectorAll('mjx-container').length,
    mathjaxSrc: Array.from(document.querySelectorAll('script[src*="mathjax" i]')).map(s => s.src),
    images: Array.from(document.images).map(i => ({src: i.src, ok: i.complete && i.naturalWidth > 0})),
    links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
    ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id),
    colab: Array.from(document.querySelectorAll('a[href*="colab.research.google.com"]')).map(a => a.href),
  };
}
"""

# JavaScript run in the page: null if the document is no wider than the viewport, else the widths
# and the element that makes it wider. Candidates are elements whose box or content reaches past
# the right edge, outside any box that clips or scrolls horizontally (such a box keeps its content
# off the page's width) and not fixed to the viewport; of those reaching furthest, the innermost
# (the last in document order) is the one to fix: the word, table or figure itself.
_OVERFLOW_JS = r"""
(tol) => {
  const vw = window.innerWidth, sw = document.scrollingElement.scrollWidth;
  if (sw <= vw + tol) return null;
  const clips = (el) => getComputedStyle(el).overflowX !== 'visible';
  const candidates = [];
  for (const el of document.body.querySelectorAll('*')) {
    const style = getComputedStyle(el);
    if (style.position === 'fixed' || style.display === 'none') continue;
    const r = el.getBoundingClientRect();
    const reach = window.scrollX + (clips(el) ? r.right : Math.max(r.right, r.left + el.scrollWidth));
    if (reach <= vw + tol) continue;
    let a = el.parentElement;
    while (a && a !== document.body && !clips(a)) a = a.parentElement;
    if (a && a !== document.body) continue;
    candidates.push({el: el, reach: reach});
  }
  const name = (el) => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') +
      Array.from(el.classList).slice(0, 3).map(c => '.' + c).join('');
  let culprit = null;
  if (candidates.length) {
    const furthest = Math.max(...candidates.map(c => c.reach));
    culprit = candidates.filter(c => c.reach >= furthest - 1).pop();
  }
  let where = '';
  if (culprit) {
    const path = [];
    for (let a = culprit.el; a && a !== document.body && path.length < 4; a = a.parentElement) path.unshift(name(a));
    let section = culprit.el.closest('section[id], div[id]');
    where = path.join(' > ') + (section ? ' (in #' + section.id + ')' : '') + ': "' +
        (culprit.el.textContent || culprit.el.getAttribute('src') || '').trim().replace(/\s+/g, ' ').slice(0, 80) +
        '", reaching ' + Math.round(culprit.reach) + ' px';
  }
  return {scrollWidth: sw, innerWidth: vw, culprit: where || 'no single element found'};
}
"""

# TeX that MathJax should have replaced: $...$, $$, \( \) \[ \] and backslash commands.
_RAW_TEX = re.compile(r"\$[^$\s][^$]*\$|\$\$|\\\(|\\\)|\\\[|\\\]|\\[A-Za-z]{2,}")


def _local_file(url, base):
    """The file under _build/html that an in-site URL points at."""
    path = unquote(urlsplit(url).path)[len(urlsplit(base).path):]
    target = HTML / path
    if path == "" or path.endswith("/"):
        target = target / "index.html"
    return target


@pytest.mark.parametrize("docname", toc_docnames())
@pytest.mark.parametrize("screen", list(VIEWPORTS))
def test_page_in_browser(screen, docname, site, browser):
    source = source_of(docname)
    assert source is not None, f"{docname} is listed in _toc.yml but has no .ipynb/.md source"
    page_file = HTML / f"{docname}.html"
    assert page_file.exists(), f"{page_file} was not built"

    errors, offsite, bad_responses = [], [], []
    page = browser.new_page(viewport=VIEWPORTS[screen])
    page.set_default_timeout(PAGE_TIMEOUT_MS)

    # The book must read offline: any request off the loopback site is recorded and refused.
    def route(r):
        if r.request.url.startswith(site) or r.request.url.startswith("data:"):
            r.continue_()
        else:
            offsite.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}")
            if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("response", lambda r: bad_responses.append(f"{r.status} {r.url}")
            if r.status >= 400 else None)
    try:
        page.goto(site + f"{docname}.html", wait_until="load")
        # MathJax 3 resolves startup.promise once the first typesetting pass is done.
        page.wait_for_function("() => !document.querySelector('span.math, div.math') || "
                               "(window.MathJax && MathJax.startup && MathJax.startup.promise)")
        page.evaluate("() => window.MathJax && MathJax.startup ? MathJax.startup.promise : null")
        page.wait_for_load_state("networkidle")
        page.evaluate("() => document.fonts.ready.then(() => true)")
        facts = page.evaluate(_PAGE_FACTS_JS)
        overflow = page.evaluate(_OVERFLOW_JS, OVERFLOW_TOLERANCE_PX)
        # The whole page, and its first screen (what a reader sees on arrival).
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shot = SCREENSHOTS / (docname.replace("/", "__") + ("" if screen == "desktop" else f".{screen}"))
        page.screenshot(path=f"{shot}.png", full_page=True, animations="disabled")
        page.screenshot(path=f"{shot}.top.png", animations="disabled")
    finally:
        page.close()

    assert not errors, f"{docname}: console errors: {errors}"
    assert not bad_responses, f"{docname}: failed responses: {bad_responses}"
    assert not offsite, f"{docname}: requests that left the site (the book must read offline): {offsite}"

    # The page fits the screen: the document is no wider than the viewport, so a reader never
    # scrolls the whole page sideways (wide tables, code and equations scroll in their own boxes).
    assert overflow is None, (
        f"{docname} at {VIEWPORTS[screen]['width']} px ({screen}): the page is "
        f"{overflow['scrollWidth']} px wide, wider than the {overflow['innerWidth']} px screen; "
        f"widest element: {overflow['culprit']}")

    # Math: served from the build and typeset; every math node became an mjx-container.
    if facts["mathNodes"]:
        assert facts["mathjaxSrc"], f"{docname}: has math but loads no MathJax script"
        assert all(s.startswith(site) for s in facts["mathjaxSrc"]), facts["mathjaxSrc"]
        assert facts["mjx"] >= facts["mathNodes"], (
            f"{docname}: {facts['mathNodes']} math nodes but only {facts['mjx']} typeset")
    raw = sorted({hit for text in facts["texts"] for hit in _RAW_TEX.findall(text)})
    assert not raw, f"{docname}: raw TeX left visible in the page text: {raw}"

    # Figures: every <img> loaded with a non-zero natural size.
    broken = [i["src"] for i in facts["images"] if not i["ok"]]
    assert not broken, f"{docname}: images that did not load: {broken}"

    # Internal links: every href into the site names an existing file (and anchor, on this page).
    ids = set(facts["ids"])
    page_url = site + f"{docname}.html"
    for href in facts["links"]:
        if not href.startswith(site):
            continue
        target = _local_file(href, site)
        assert target.is_file(), f"{docname}: link {href} points to missing {target}"
        fragment = urlsplit(href).fragment
        if fragment and href.split("#")[0] == page_url:
            assert unquote(fragment) in ids, f"{docname}: link to missing anchor #{fragment}"

    # Colab: notebook pages launch their own .ipynb from the repository; other pages have none.
    if source.suffix == ".ipynb":
        assert facts["colab"], f"{docname}: no Colab launch link"
        assert set(facts["colab"]) == {expected_colab_url(docname)}, facts["colab"]
        assert (HTML / "_sources" / f"{docname}.ipynb").is_file(), f"{docname}: no .ipynb download"
    else:
        assert not facts["colab"], f"{docname}: unexpected Colab link {facts['colab']}"


def test_build_references_no_cdn(built_book):
    """No built page references a CDN: MathJax and every script/style are served from the build."""
    cdn = re.compile(r"(?:src|href)=\"(?:https?:)?//[^\"]*(?:cdn|unpkg|jsdelivr|cdnjs|googleapis)"
                     r"[^\"]*\"|THEBE_JS_URL|mathjax@", re.I)
    hits = {}
    for page in built_book.rglob("*.html"):
        found = cdn.findall(page.read_text(encoding="utf-8", errors="replace"))
        if found:
            hits[str(page.relative_to(built_book))] = found[:3]
    assert not hits, f"CDN references in the built HTML: {hits}"
    assert (built_book / "_static" / "mathjax" / "tex-chtml.js").is_file()

