"""Tests for llama_data.extract: HTML to text with code and math kept (§3.1.1)."""

from __future__ import annotations

import json
import pydoc
import textwrap
import types

import pytest

from llama_data.document import Document, StepStats
from llama_data.extract import EXTRACTOR_NAME, EXTRACTOR_VERSION, HtmlExtractor, extract_text

INTRO = (
    "Binary search finds an item in a sorted list by halving the search interval at every step, "
    "so it needs only a logarithmic number of comparisons."
)
OUTRO = (
    "Because each comparison halves the remaining range, a list of a million items needs about "
    "twenty comparisons in the worst case."
)

# A function with nested indentation and a blank line inside its body.
CODE_LINES = [
    "def search(xs, target):",
    "    lo, hi = 0, len(xs)",
    "",
    "    while lo < hi:",
    "        mid = (lo + hi) // 2",
    "        if xs[mid] < target:",
    "            lo = mid + 1",
    "        else:",
    "            hi = mid",
    "",
    "    return lo",
]


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _page(article: str) -> str:
    """A page with navigation, header, cookie banner, sidebar and footer around `article`."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Algorithms blog</title></head>
<body>
<header><a href="/">AlgoBlog</a> <span>Site header tagline</span></header>
<nav><ul><li><a href="/">Home</a></li><li><a href="/archive">Archive</a></li>
<li><a href="/about">About us</a></li></ul></nav>
<div id="cookie-banner" class="cookie-consent">We use cookies to improve your experience.
<button>Accept all cookies</button></div>
<main><article>
<p>{INTRO}</p>
{article}
<p>{OUTRO}</p>
</article></main>
<aside class="sidebar"><h3>Related posts</h3><ul><li><a href="/p/1">Sorting in linear time</a></li>
<li><a href="/p/2">Heaps explained</a></li></ul></aside>
<footer><p>Copyright 2024 AlgoBlog Inc. All rights reserved.</p>
<a href="/privacy">Privacy policy</a></footer>
</body></html>"""


def _extract(article: str) -> str:
    text = extract_text(_page(article))
    assert text is not None
    return text


def _pydoc_page(module: types.ModuleType) -> str:
    return pydoc.html.page(pydoc.describe(module), pydoc.html.document(module))


def test_pydoc_page_of_json_keeps_module_docstring() -> None:
    """The json module's pydoc page yields its docstring's lines."""
    text = extract_text(_pydoc_page(json))
    assert text is not None
    docstring_lines = [line.strip() for line in (json.__doc__ or "").strip().splitlines()]
    assert docstring_lines[0] in text.splitlines()
    assert docstring_lines[1] in text.splitlines()


def test_pydoc_page_of_textwrap_keeps_module_and_class_docstrings() -> None:
    """The textwrap pydoc page yields the module docstring and the TextWrapper class docstring."""
    text = extract_text(_pydoc_page(textwrap))
    assert text is not None
    assert (textwrap.__doc__ or "").strip() in text.splitlines()
    class_doc_first_sentence = (textwrap.TextWrapper.__doc__ or "").strip().split("  ")[0]
    assert class_doc_first_sentence == "Object for wrapping/filling text."
    assert class_doc_first_sentence in text


def test_boilerplate_removed_and_article_kept() -> None:
    """Navigation, header, cookie banner, sidebar and footer are dropped; the article is kept."""
    text = _extract("<p>Binary search is a classic divide and conquer algorithm.</p>")
    assert text.splitlines() == [
        INTRO,
        "Binary search is a classic divide and conquer algorithm.",
        OUTRO,
    ]


def test_code_block_keeps_exact_indentation_and_blank_lines() -> None:
    """A <pre><code> block comes out line for line, indentation and blank lines included."""
    code = _escape("\n".join(CODE_LINES))
    text = _extract(f'<pre><code class="language-python">{code}\n</code></pre>')
    lines = text.splitlines()
    start = lines.index(CODE_LINES[0])
    assert lines[start : start + len(CODE_LINES)] == CODE_LINES
    assert lines[start - 1] == INTRO
    assert lines[start + len(CODE_LINES)] == OUTRO
    assert "llamacode" not in text  # no placeholder token left behind


def test_multiline_code_outside_pre_keeps_its_lines() -> None:
    """A multi-line <code> block not wrapped in <pre> keeps its line breaks and indentation."""
    lines = _extract("<div><code>while True:\n    step()\n\ndone()</code></div>").splitlines()
    start = lines.index("while True:")
    assert lines[start : start + 4] == ["while True:", "    step()", "", "done()"]


def test_code_block_with_highlighting_spans_keeps_text() -> None:
    """Syntax-highlighting tags inside <pre> are stripped and their text kept exactly."""
    html = (
        '<div class="highlight"><pre><span class="k">for</span> <span class="n">i</span> '
        '<span class="ow">in</span> range(3):\n    <span class="nb">print</span>(i)\n\n'
        "print(<span class='s'>'done'</span>)</pre></div>"
    )
    lines = _extract(html).splitlines()
    start = lines.index("for i in range(3):")
    assert lines[start : start + 4] == ["for i in range(3):", "    print(i)", "", "print('done')"]


def test_code_block_decodes_html_entities() -> None:
    """&lt; &gt; &amp; inside code come out as < > &."""
    text = _extract("<pre><code>if a &lt; b &amp;&amp; c &gt; d:\n    swap(a, b)</code></pre>")
    lines = text.splitlines()
    start = lines.index("if a < b && c > d:")
    assert lines[start + 1] == "    swap(a, b)"


def test_code_block_line_numbers_removed() -> None:
    """A Pygments line-number gutter beside a code block is not part of the text."""
    html = (
        '<table class="highlighttable"><tr><td class="linenos"><div class="linenodiv"><pre>1\n2'
        '</pre></div></td><td class="code"><div class="highlight"><pre>if x:\n    pass</pre>'
        "</div></td></tr></table>"
    )
    lines = _extract(html).splitlines()
    start = lines.index("if x:")
    assert lines[start - 1 : start + 2] == [INTRO, "if x:", "    pass"]


def test_br_inside_pre_is_a_line_break() -> None:
    """<br> inside <pre> becomes a newline, blank lines included."""
    lines = _extract("<pre>first<br>  second<br><br>fourth</pre>").splitlines()
    start = lines.index("first")
    assert lines[start : start + 4] == ["first", "  second", "", "fourth"]


def test_inline_code_stays_in_its_sentence() -> None:
    """Inline <code> is kept in place in its paragraph, without backticks."""
    text = _extract("<p>Call <code>bisect_left(xs, x)</code> to get the insertion point.</p>")
    assert "Call bisect_left(xs, x) to get the insertion point." in text.splitlines()


def test_mathml_becomes_its_alttext() -> None:
    """A MathML formula with alttext is replaced by that TeX, inline and undelimited."""
    html = (
        '<p>The ratio <math alttext="\\frac{1}{2}"><mfrac><mn>1</mn><mn>2</mn></mfrac></math> '
        "is the fraction discarded at every step.</p>"
    )
    assert "The ratio \\frac{1}{2} is the fraction discarded at every step." in _extract(html)


def test_katex_mathml_becomes_its_tex_annotation_once() -> None:
    """KaTeX output gives the TeX annotation once, without the rendered HTML duplicate."""
    html = (
        '<p>Euler wrote <span class="katex"><span class="katex-mathml"><math><semantics><mrow>'
        "<msup><mi>e</mi><mrow><mi>i</mi><mi>π</mi></mrow></msup></mrow>"
        '<annotation encoding="application/x-tex">e^{i\\pi}</annotation></semantics></math></span>'
        '<span class="katex-html" aria-hidden="true"><span class="base">eiπ</span></span></span> '
        "in his famous identity.</p>"
    )
    assert "Euler wrote e^{i\\pi} in his famous identity." in _extract(html)


def test_wikipedia_math_gives_the_formula_once() -> None:
    """Wikipedia's MathML plus fallback image yields the TeX once, not twice."""
    tex = "{\\displaystyle \\pi r^{2}}"
    html = (
        f'<p>A disc has area <span class="mwe-math-element"><span class="mwe-math-mathml-inline" '
        f'style="display: none;"><math alttext="{tex}"><mi>π</mi></math></span>'
        f'<img src="/media/math/render/svg/1" class="mwe-math-fallback-image-inline" alt="{tex}">'
        "</span> for a radius r.</p>"
    )
    assert f"A disc has area {tex} for a radius r." in _extract(html).splitlines()


def test_math_image_becomes_its_alt_text() -> None:
    """An <img> whose alt is TeX is replaced by the alt text."""
    html = '<p>The ratio <img src="eq1.png" alt="\\frac{a}{b}"> is a fraction of two numbers.</p>'
    assert "The ratio \\frac{a}{b} is a fraction of two numbers." in _extract(html)


def test_plain_image_alt_is_not_added() -> None:
    """An ordinary picture's alt text (not math) does not enter the text."""
    html = '<p>Our team at work <img src="team.jpg" alt="Photo of the team"> in the office.</p>'
    text = _extract(html)
    assert "Photo of the team" not in text
    assert "Our team at work in the office." in text


def test_mathjax_script_becomes_its_tex() -> None:
    """<script type="math/tex"> (MathJax) is replaced by its TeX."""
    html = (
        '<p>For a right triangle <script type="math/tex">a^2 + b^2 = c^2</script> '
        "holds for the three sides.</p>"
        '<script type="math/tex; mode=display">\\sum_{i=1}^{n} i = \\frac{n(n+1)}{2}</script>'
    )
    text = _extract(html)
    assert "For a right triangle a^2 + b^2 = c^2 holds for the three sides." in text
    assert "\\sum_{i=1}^{n} i = \\frac{n(n+1)}{2}" in text


def test_headings_are_plain_lines() -> None:
    """Headings come out as their own lines with no '#' markers."""
    html = (
        "<h1>Binary search</h1><p>It is fast because the interval halves at each step of it.</p>"
        "<h2>Complexity analysis</h2><p>The running time is logarithmic in the list length.</p>"
    )
    lines = _extract(html).splitlines()
    assert "Binary search" in lines
    assert "Complexity analysis" in lines
    assert not any(line.startswith("#") for line in lines)


def test_nested_lists_one_item_per_line_without_markers() -> None:
    """List items, nested or numbered, are one per line with no bullets or numbers added."""
    html = (
        "<ul><li>Sorted input</li><li>Random access<ul><li>arrays work</li>"
        "<li><a href='/ll'>linked lists</a> do not</li></ul></li></ul>"
        "<ol><li>Pick the middle</li><li>Compare</li></ol>"
    )
    lines = _extract(html).splitlines()
    start = lines.index("Sorted input")
    assert lines[start : start + 6] == [
        "Sorted input",
        "Random access",
        "arrays work",
        "linked lists do not",
        "Pick the middle",
        "Compare",
    ]


def test_definition_list_terms_and_definitions_without_markers() -> None:
    """<dt> and <dd> come out one per line with no bullets added."""
    html = "<dl><dt>Invariant</dt><dd>The target, if present, lies in xs[lo:hi].</dd></dl>"
    lines = _extract(html).splitlines()
    start = lines.index("Invariant")
    assert lines[start + 1] == "The target, if present, lies in xs[lo:hi]."


def test_no_break_spaces_become_spaces_outside_code() -> None:
    """&nbsp; between words becomes a plain space in prose."""
    html = "<p>Binary&nbsp;search&nbsp;needs&nbsp;a&nbsp;sorted&nbsp;list&nbsp;to&nbsp;work&nbsp;on.</p>"
    assert "Binary search needs a sorted list to work on." in _extract(html).splitlines()


def test_paragraph_starting_with_a_dash_is_untouched() -> None:
    """Only the bullets the extractor adds are removed, not a dash the author wrote."""
    html = "<p>- Well, said the reviewer, binary search is not that hard after all.</p>"
    assert "- Well, said the reviewer, binary search is not that hard after all." in _extract(html)


def test_table_rows_are_tab_separated_without_markdown() -> None:
    """A table becomes tab-separated rows with no pipes and no |---| rule."""
    html = (
        "<table><tr><th>n</th><th>comparisons</th></tr><tr><td>1000</td><td>10</td></tr>"
        "<tr><td>1000000</td><td>20</td></tr></table>"
    )
    lines = _extract(html).splitlines()
    start = lines.index("n\tcomparisons")
    assert lines[start : start + 3] == ["n\tcomparisons", "1000\t10", "1000000\t20"]
    assert not any("|" in line for line in lines)


def test_cjk_text_is_preserved() -> None:
    """Non-ASCII (CJK) text comes through unchanged."""
    sentence = "二分查找是一种在有序数组中查找某一特定元素的搜索算法。"
    assert sentence in _extract(f"<p>{sentence}</p>").splitlines()


def test_xml_encoding_declaration_is_accepted() -> None:
    """A page that starts with an XML encoding declaration is parsed, not rejected."""
    page = '<?xml version="1.0" encoding="iso-8859-1"?>\n' + _page("<p>日本語の文章です。</p>")
    text = extract_text(page)
    assert text is not None
    assert "日本語の文章です。" in text.splitlines()


@pytest.mark.parametrize(
    "html",
    [
        "",
        "   \n",
        "<!-- only a comment -->",
        "<html><body><nav><ul><li><a href='/'>Home</a></li><li><a href='/b'>Blog</a></li></ul>"
        "</nav><footer><p>Copyright 2024 Example Corp. All rights reserved.</p></footer>"
        "</body></html>",
    ],
)
def test_page_without_content_gives_none(html: str) -> None:
    """Empty input, a lone comment, or only navigation and footer extract to None."""
    assert extract_text(html) is None


def test_extract_text_rejects_bytes() -> None:
    """Bytes are refused with a message naming the type received."""
    with pytest.raises(TypeError, match="got bytes"):
        extract_text(b"<p>hi</p>")  # type: ignore[arg-type]


def test_unknown_favor_is_rejected() -> None:
    """An unknown `favor` is refused with the value in the message."""
    with pytest.raises(ValueError, match="'speed'"):
        HtmlExtractor(favor="speed")  # type: ignore[arg-type]


def test_extractor_step_replaces_html_and_records_extractor() -> None:
    """HtmlExtractor swaps the HTML for text and records the extractor name and version."""
    doc = Document(id="r1", text=_page("<p>Kept.</p>"), url="https://example.com/bs", source="web")
    stats = StepStats()
    (out,) = HtmlExtractor().run([doc], stats)
    assert out.text == extract_text(doc.text, url=doc.url)
    assert (out.id, out.url, out.source) == ("r1", "https://example.com/bs", "web")
    assert out.metadata == {"extractor": EXTRACTOR_NAME, "extractor_version": EXTRACTOR_VERSION}
    assert EXTRACTOR_NAME == "trafilatura"
    assert doc.text.startswith("<!DOCTYPE html>")  # the input document is not mutated


def test_extractor_step_drops_empty_pages_as_no_content() -> None:
    """Pages with nothing to extract are dropped and counted under "no_content"."""
    docs = [
        Document(id="a", text=_page("<p>Kept.</p>")),
        Document(id="b", text="<html><body></body></html>"),
        Document(id="c", text=""),
    ]
    stats = StepStats()
    kept = list(HtmlExtractor().run(docs, stats))
    assert [d.id for d in kept] == ["a"]
    assert stats.kept == 1
    assert stats.dropped == {"no_content": 2}
