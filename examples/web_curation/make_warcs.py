"""Build a small web crawl (gzipped WARC files) from real HTML, offline, for `pipeline.toml`.

The pages are the Python 3.11 documentation as Debian ships it (package `python3.11-doc`, fetched
with `apt-get download` and unpacked with `dpkg-deb`, both without root), or any directory of
HTML files (`--html-dir`), or pages that `pydoc` writes for standard-library modules (`--pydoc`,
no download at all). The crawl has what a real one has, so that every step of the pipeline finds
work:

- every page at its docs.python.org URL, crawled on 2024-03-01;
- every 5th page recrawled on 2024-06-01 with one word changed (URL dedup keeps the latest);
- every 4th page mirrored byte for byte on another host (exact dedup drops one);
- every 3rd page also as an older version under /3.10/ with a few words changed (near dedup);
- the site's navigation and footer on every page (line dedup removes the frequent lines).

Run: `uv run python examples/web_curation/make_warcs.py examples/web_curation/warcs`
"""

from __future__ import annotations

import argparse
import importlib
import pydoc
import random
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from llama_data import WebPage, write_warc

DEBIAN_PACKAGE = "python3.11-doc"
HTML_ROOT = "usr/share/doc/python3.11/html"
PYDOC_MODULES = (
    "argparse", "base64", "bisect", "calendar", "collections", "csv", "dataclasses", "datetime",
    "difflib", "enum", "fractions", "functools", "gzip", "heapq", "html", "itertools", "json",
    "logging", "pathlib", "pprint", "queue", "random", "shlex", "statistics", "string",
    "textwrap", "timeit", "typing", "uuid", "zipfile",
)  # fmt: skip


def debian_html(cache: Path) -> Path:
    """The unpacked HTML directory of Debian's python3.11-doc (downloaded into `cache` once)."""
    root = cache / "unpacked" / HTML_ROOT
    if root.is_dir():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=cache, check=True)
    (deb,) = cache.glob(f"{DEBIAN_PACKAGE}_*.deb")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(cache / "unpacked")], check=True)
    return root


def html_files(directory: Path) -> Iterator[tuple[str, bytes]]:
    """(path relative to `directory`, bytes) of every .html file under it, in sorted order."""
    for path in sorted(directory.rglob("*.html")):
        yield path.relative_to(directory).as_posix(), path.read_bytes()


def pydoc_pages(modules: Sequence[str] = PYDOC_MODULES) -> Iterator[tuple[str, bytes]]:
    """The HTML pages `pydoc` writes for standard-library modules."""
    html = pydoc.HTMLDoc()
    for name in modules:
        module = importlib.import_module(name)
        page = html.page(pydoc.describe(module), html.document(module, name))
        yield f"library/{name}.html", page.encode()


NAVIGATION = (
    "<nav><p>Python 3.11 documentation</p><p>Index | Modules | Glossary</p>"
    "<p>Theme: Auto | Light | Dark</p></nav>"
)
FOOTER = (
    "<footer><p>Copyright 2001-2024, Python Software Foundation.</p>"
    "<p>This page is licensed under the Python Software Foundation License Version 2.</p>"
    "<p>Found a bug? Report it on the issue tracker.</p></footer>"
)


def _with_site_chrome(body: bytes) -> bytes:
    return re.sub(
        rb"(<body[^>]*>)", lambda m: m.group(1) + NAVIGATION.encode(), body, count=1
    ).replace(b"</body>", FOOTER.encode() + b"</body>", 1)


def _edit_words(body: bytes, rng: random.Random, edits: int) -> bytes:
    """`body` with `edits` words of its paragraphs replaced by others of the page."""
    text = body.decode("utf-8", errors="replace")
    words = [m for m in re.finditer(r"(?<=[ >])[A-Za-z]{4,}(?=[ ,.<])", text)]
    if not words:
        return body
    out = list(text)
    for match in rng.sample(words, min(edits, len(words))):
        out[match.start() : match.end()] = list(rng.choice(words).group(0).upper())
    return "".join(out).encode()


def crawl(pages: Sequence[tuple[str, bytes]], seed: int = 0) -> list[WebPage]:
    """The crawl described in the module docstring, in a fixed order."""
    rng = random.Random(seed)
    records = []
    for i, (relative, raw) in enumerate(pages):
        body = _with_site_chrome(raw)
        url = f"https://docs.python.org/3.11/{relative}"
        records.append(WebPage(url, body, date="2024-03-01T00:00:00Z"))
        if i % 5 == 0:
            records.append(WebPage(url, _edit_words(body, rng, 1), date="2024-06-01T00:00:00Z"))
        if i % 4 == 0:
            mirror = f"https://mirror.example.org/python/3.11/{relative}"
            records.append(WebPage(mirror, body, date="2024-04-01T00:00:00Z"))
        if i % 3 == 0:
            old = f"https://docs.python.org/3.10/{relative}"
            records.append(WebPage(old, _edit_words(body, rng, 3), date="2023-05-01T00:00:00Z"))
    rng.shuffle(records)  # a crawl's files are not sorted by page
    return records


def write_crawl(records: Sequence[WebPage], out_dir: Path, files: int) -> list[Path]:
    """`records` dealt round-robin into `files` WARC files `crawl-NNN.warc.gz` in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"crawl-{k:03d}.warc.gz" for k in range(files)]
    for k, path in enumerate(paths):
        write_warc(records[k::files], path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="where the WARC files go")
    parser.add_argument("--files", type=int, default=8, help="WARC files to write (default 8)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--html-dir", type=Path, help="a directory of .html files to crawl")
    source.add_argument("--pydoc", action="store_true", help="pydoc pages: no download")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "llama3-python-doc",
        help="where Debian's python3.11-doc is downloaded and unpacked",
    )
    args = parser.parse_args(argv)
    if args.pydoc:
        pages = list(pydoc_pages())
    else:
        pages = list(html_files(args.html_dir or debian_html(args.cache)))
    records = crawl(pages)
    paths = write_crawl(records, args.out_dir, args.files)
    print(
        f"{len(pages)} pages -> {len(records)} records in {len(paths)} WARC files in {args.out_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
