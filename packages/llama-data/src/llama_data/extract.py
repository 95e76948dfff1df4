"""HTML to plain text: main content only, with code and math kept intact (§3.1.1).

The Llama 3 paper (arXiv 2407.21783, §3.1.1) builds "a custom parser that extracts the HTML content
and optimizes for precision in boilerplate removal and content recall", processes "HTML pages with
mathematics and code content to preserve the structure of that content", keeps "the image alt
attribute text since mathematical content is often represented as pre-rendered images", and, since
"markdown is harmful", removes all markdown markers.

We use trafilatura as the boilerplate remover and repair what it gets wrong around it:

- Code: trafilatura drops the blank lines inside ``<pre>`` blocks. Each ``<pre>`` (and each multi-line
  ``<code>`` outside one) is fenced by two unique placeholder tokens before extraction, and whatever
  trafilatura emits between them is replaced by the block's exact original text afterwards
  (entities decoded, inner tags stripped, ``<br>`` as a newline, line-number gutters removed).
- Math: MathML ``<math>`` becomes its ``alttext`` (else its TeX annotation, else its text);
  ``<script type="math/tex">`` (MathJax) becomes its TeX; an ``<img>`` whose class, source or alt text
  marks it as math becomes its alt text (trafilatura drops images). Rendered duplicates of the same
  formula (KaTeX's HTML layer, MathJax previews, Wikipedia's fallback image) are replaced as one.
- Markdown: trafilatura's plain-text output still prefixes list items (and ``<dt>``/``<dd>``) with
  ``- `` and writes tables as markdown rows with a ``|---|`` rule. List items are tagged with a
  placeholder so exactly the bullets trafilatura adds are removed (a paragraph that itself starts
  with "- " is left alone); table rows become tab-separated cells and the rule line is dropped.
- Whitespace: pages (pydoc's among them) use ``&nbsp;`` between words, which trafilatura keeps as
  U+00A0; outside code it becomes a plain space, and whitespace-only lines are dropped.

`extract_text` is the function; `HtmlExtractor` is the pipeline step for documents whose text is raw
HTML (e.g. from a WARC reader).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import re
from collections.abc import Iterable, Iterator
from importlib.metadata import version
from typing import Any, Literal

import lxml.etree
import lxml.html
import trafilatura

from llama_data.document import Document, Step, StepStats

__all__ = ["extract_text", "HtmlExtractor", "Favor", "EXTRACTOR_NAME", "EXTRACTOR_VERSION"]

EXTRACTOR_NAME = "trafilatura"
"""The upstream extractor, recorded in each document's metadata."""
EXTRACTOR_VERSION = version("trafilatura")
"""Its installed version, recorded beside the name: output can change between versions."""

Favor = Literal["precision", "balanced", "recall"]
"""Which side of the boilerplate trade-off trafilatura leans to."""
_FAVORS = frozenset({"precision", "balanced", "recall"})

_TEX_ENCODINGS = frozenset({"application/x-tex", "tex", "latex", "text/tex", "text/latex"})
# Class tokens of elements that hold one formula in several renderings (MathML + HTML + image).
_MATH_CONTAINER_CLASSES = frozenset({"katex", "katex-display", "mwe-math-element", "mathjax"})
# Rendered copies of a formula whose source is kept elsewhere in the page.
_MATH_DUPLICATE_CLASSES = frozenset(
    {
        "katex-html",
        "mathjax_preview",
        "mwe-math-fallback-image-inline",
        "mwe-math-fallback-image-display",
    }
)
# Class tokens that mark an image (or its source) as a rendered formula.
_MATH_IMAGE_CLASS = re.compile(
    r"(?i)(?:^|[\s_-])(?:math|latex|tex|katex|mathjax|equation|formula)(?:$|[\s_-])"
)
_MATH_IMAGE_SRC = re.compile(r"(?i)latex|mathtex|codecogs|/tex[/?]|/math/")
# TeX in alt text: a command (\frac, \alpha), a superscript, or a braced subscript.
_TEX_IN_ALT = re.compile(r"\\[A-Za-z]+|\^|_\{")
# Line-number gutters beside or inside code blocks are not code (Pygments, Prism, highlight.js).
_CODE_NOISE_CLASSES = frozenset({"linenos", "lineno", "line-numbers-rows", "hljs-ln-numbers"})

_TABLE_RULE = re.compile(r"^\|(?:\s*:?-+:?\s*\|)+\s*$")
_TABLE_ROW = re.compile(r"^\| (.*?) ?\|\s*$")


def extract_text(
    html: str,
    *,
    url: str | None = None,
    favor: Favor = "precision",
    include_tables: bool = True,
) -> str | None:
    """The main text of an HTML page, or None when it has none.

    Boilerplate (navigation, headers, footers, sidebars, cookie banners, comments) is removed; code
    blocks keep their exact whitespace; math becomes its TeX source; headings and list items are
    plain lines with no markdown markers. `url` helps trafilatura and is otherwise unused.
    `favor` is trafilatura's trade-off: "precision" (the default, §3.1.1: "precision in boilerplate
    removal") drops borderline blocks, "recall" keeps them, "balanced" is trafilatura's default.
    `include_tables` keeps tables as tab-separated rows.
    """
    if favor not in _FAVORS:
        raise ValueError(f"favor must be one of {sorted(_FAVORS)}, got {favor!r}")
    if not isinstance(html, str):
        raise TypeError(
            f"extract_text expects the page as str, got {type(html).__name__}: {html!r:.80}"
        )
    if not html.strip():
        return None
    try:
        # Encoded first: lxml refuses a str that carries an XML encoding declaration.
        parser = lxml.html.HTMLParser(encoding="utf-8", remove_comments=True)
        page = html.encode("utf-8", "replace")
        root = lxml.html.document_fromstring(page, parser=parser)
    except lxml.etree.ParserError:  # "Document is empty": only comments or processing instructions
        return None

    # Placeholder tokens are derived from the page, so the output is deterministic.
    nonce = hashlib.sha1(page).hexdigest()[:12]
    _replace_math(root)
    code_blocks = _fence_code_blocks(root, nonce)
    item_mark = f"llamaitem{nonce}x"
    _mark_list_items(root, item_mark)

    text = trafilatura.extract(
        root,
        url=url,
        output_format="txt",
        include_comments=False,
        include_tables=include_tables,
        include_formatting=False,  # with formatting on, trafilatura writes markdown (#, **, ```)
        include_links=False,
        include_images=False,
        favor_precision=favor == "precision",
        favor_recall=favor == "recall",
        deduplicate=False,
    )
    if text is None:
        return None
    text = _strip_list_bullets(text, item_mark)
    text = _plain_tables(text)
    text = _tidy_lines(text)
    text = _restore_code_blocks(text, code_blocks)
    text = text.strip()
    return text or None


class HtmlExtractor(Step):
    """Replace each document's raw HTML with its extracted text (`extract_text`).

    A document with no extractable content is dropped as "no_content"; one whose HTML lxml cannot
    parse at all is dropped as "extract_error". Kept documents record the extractor and its version
    in `metadata["extractor"]` and `metadata["extractor_version"]`.
    """

    name = "html_extract"

    def __init__(self, *, favor: Favor = "precision", include_tables: bool = True) -> None:
        if favor not in _FAVORS:
            raise ValueError(f"favor must be one of {sorted(_FAVORS)}, got {favor!r}")
        self.favor: Favor = favor
        self.include_tables = include_tables

    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        for doc in docs:
            if not isinstance(doc.text, str):
                raise TypeError(
                    f"HtmlExtractor needs Document.text to be the page's HTML as str; document "
                    f"{doc.id!r} has {type(doc.text).__name__}"
                )
            try:
                text = extract_text(
                    doc.text,
                    url=doc.url,
                    favor=self.favor,
                    include_tables=self.include_tables,
                )
            except lxml.etree.LxmlError:
                stats.drop("extract_error")
                continue
            if text is None:
                stats.drop("no_content")
                continue
            stats.kept += 1
            metadata = {
                **doc.metadata,
                "extractor": EXTRACTOR_NAME,
                "extractor_version": EXTRACTOR_VERSION,
            }
            yield dataclasses.replace(doc, text=text, metadata=metadata)


# --- DOM pre-processing --------------------------------------------------------------------------


def _local_name(element: Any) -> str:
    """The tag without namespace or prefix ("m:math" -> "math"); "" for comments and PIs."""
    tag = element.tag
    if not isinstance(tag, str):
        return ""
    return tag.rsplit("}", 1)[-1].rsplit(":", 1)[-1].lower()


def _classes(element: Any) -> set[str]:
    return set((element.get("class") or "").lower().split())


def _replace_with_text(element: Any, text: str) -> None:
    """Put `text` where `element` was (keeping the text after it)."""
    parent = element.getparent()
    if parent is None:
        return
    span = lxml.html.Element("span")
    span.text = text
    span.tail = element.tail
    parent.replace(element, span)


def _math_tex(math: Any) -> str:
    """A MathML formula as text: its alttext, else its TeX annotation, else its characters."""
    alttext = (math.get("alttext") or "").strip()
    if alttext:
        return alttext
    for element in math.iter():
        encoding = (element.get("encoding") or "").strip().lower()
        if _local_name(element) == "annotation" and encoding in _TEX_ENCODINGS:
            tex = (element.text or "").strip()
            if tex:
                return tex
    formula = copy.deepcopy(math)
    for annotation in [e for e in formula.iter() if _local_name(e).startswith("annotation")]:
        annotation.drop_tree()
    return " ".join(part.strip() for part in formula.itertext() if part.strip())


def _math_container(math: Any) -> Any:
    """The nearest wrapper holding other renderings of the same formula, else `math` itself."""
    ancestor = math.getparent()
    for _ in range(3):
        if ancestor is None:
            break
        if _classes(ancestor) & _MATH_CONTAINER_CLASSES or _local_name(ancestor) == "mjx-container":
            return ancestor
        ancestor = ancestor.getparent()
    return math


def _is_math_image(img: Any) -> bool:
    alt = (img.get("alt") or "").strip()
    if not alt:
        return False
    if _MATH_IMAGE_CLASS.search(img.get("class") or ""):
        return True
    if _MATH_IMAGE_SRC.search(img.get("src") or ""):
        return True
    return _TEX_IN_ALT.search(alt) is not None


def _replace_math(root: Any) -> None:
    """Turn MathML, MathJax scripts and math images into their TeX, inline, in place."""
    for element in list(root.iter()):
        if _classes(element) & _MATH_DUPLICATE_CLASSES and element.getparent() is not None:
            element.drop_tree()
    for math in [e for e in root.iter() if _local_name(e) == "math"]:
        if math.getparent() is None:  # already replaced with its container
            continue
        _replace_with_text(_math_container(math), _math_tex(math))
    for script in list(root.iter("script")):
        if (script.get("type") or "").strip().lower().startswith("math/tex"):
            _replace_with_text(script, (script.text or "").strip())
    for img in list(root.iter("img")):
        if _is_math_image(img):
            _replace_with_text(img, (img.get("alt") or "").strip())


def _code_text(block: Any) -> str:
    """The exact text of a code block: entities decoded, tags stripped, <br> as a newline."""
    for element in list(block.iter()):
        if element is block:
            continue
        name = _local_name(element)
        if name == "br":
            element.tail = "\n" + (element.tail or "")
        elif name == "button":
            element.drop_tree()
    text = "".join(block.itertext()).replace("\r\n", "\n").replace("\r", "\n")
    return text.strip("\n")


def _fence_code_blocks(root: Any, nonce: str) -> list[tuple[str, str, str]]:
    """Fence each code block with placeholder tokens; return (start, end, original text) per block.

    The original text stays between the tokens so trafilatura sees as much text as the page had
    (its boilerplate scores depend on text density); only the tokens must survive it.
    """
    for element in list(root.iter()):
        if _classes(element) & _CODE_NOISE_CLASSES and element.getparent() is not None:
            element.drop_tree()
    blocks = []
    for element in root.iter("pre", "code"):
        if element.tag == "code" and (
            "\n" not in "".join(element.itertext())
            or any(a.tag == "pre" for a in element.iterancestors())
        ):
            continue  # inline code, or code inside a <pre> that is fenced as a whole
        if any(a.tag == "pre" for a in element.iterancestors()):
            continue  # a <pre> nested in a <pre>: its text is part of the outer block
        blocks.append(element)
    fenced = []
    for index, block in enumerate(blocks):
        code = _code_text(block)
        if not code.strip():
            continue
        start, end = f"llamacode{nonce}s{index}x", f"llamacode{nonce}e{index}x"
        for child in list(block):
            block.remove(child)
        block.text = f"{start}\n{code}\n{end}"
        fenced.append((start, end, code))
    return fenced


def _mark_list_items(root: Any, mark: str) -> None:
    """Prefix the first text of each list item (<li>, <dt>, <dd>) with `mark`, to find its bullet.

    The mark goes into the first text node in document order (inside a link if the item starts with
    one) so that the item's link density, which trafilatura uses to spot navigation, is unchanged.
    """
    for item in root.iter("li", "dt", "dd"):
        for element in item.iter():
            if element.text and element.text.strip():
                element.text = f"{mark} {element.text.lstrip()}"
                break
            if element is not item and element.tail and element.tail.strip():
                element.tail = f"{mark} {element.tail.lstrip()}"
                break


# --- text post-processing ------------------------------------------------------------------------


def _strip_list_bullets(text: str, mark: str) -> str:
    """Remove the bullets and indentation trafilatura adds to list items, then the marks."""
    bullet = re.compile(rf"^[ \t]*(?:[-*+•]|\d+[.)])?[ \t]*{re.escape(mark)} ?", re.MULTILINE)
    text = bullet.sub("", text)
    return re.sub(rf"{re.escape(mark)} ?", "", text)


def _plain_tables(text: str) -> str:
    """Markdown table rows to tab-separated cells; the |---| rule and empty rows removed.

    Empty cells at either end of a row are dropped too: layout tables are full of them.
    """
    lines = []
    for line in text.split("\n"):
        if _TABLE_RULE.match(line):
            continue
        row = _TABLE_ROW.match(line)
        if row:
            line = "\t".join(cell.strip() for cell in row.group(1).split(" | ")).strip("\t")
            if not line.strip():
                continue
        lines.append(line)
    return "\n".join(lines)


def _tidy_lines(text: str) -> str:
    """No-break spaces as spaces, no trailing whitespace, no blank lines (code is restored later)."""
    lines = (line.replace("\xa0", " ").rstrip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def _restore_code_blocks(text: str, blocks: list[tuple[str, str, str]]) -> str:
    """Replace each fenced span in the output with the block's original text; drop stray tokens."""
    for start, end, code in blocks:
        first = text.find(start)
        last = text.find(end, first + len(start)) if first >= 0 else -1
        if last >= 0:
            text = text[:first] + code + text[last + len(end) :]
        else:  # trafilatura kept only part of the block, or dropped it
            text = text.replace(start, "").replace(end, "")
    return text
