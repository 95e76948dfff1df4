"""Tests for llama_data.readers: bad input is counted with its location, good records survive."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from llama_data.document import Document, StepStats
from llama_data.readers import (
    read_documents,
    read_jsonl,
    read_parquet,
    read_warc,
    write_jsonl,
)

# Built once: 50 MB of text, five times the default max_chars.
BIG_TEXT = "a" * 50_000_000


def _lines(records: list[dict[str, object]]) -> bytes:
    return b"".join(json.dumps(record).encode() + b"\n" for record in records)


def _numbered(n: int) -> list[dict[str, object]]:
    return [{"id": f"d{i}", "text": f"document number {i}"} for i in range(n)]


def _read(path: Path, **kwargs: object) -> tuple[list[Document], StepStats]:
    stats = StepStats()
    docs = list(read_jsonl(path, stats=stats, **kwargs))  # type: ignore[arg-type]
    return docs, stats


# --------------------------------------------------------------------------------------------
# JSONL: good input


@pytest.mark.parametrize("name", ["data.jsonl", "data.jsonl.gz", "data.jsonl.zst"])
def test_jsonl_reads_every_compression(tmp_path: Path, name: str) -> None:
    """Plain, gzip and zstd JSONL (chosen by suffix) give the same documents and counts."""
    raw = _lines(_numbered(3))
    if name.endswith(".gz"):
        raw = gzip.compress(raw)
    elif name.endswith(".zst"):
        raw = zstandard.ZstdCompressor().compress(raw)
    path = tmp_path / name
    path.write_bytes(raw)
    docs, stats = _read(path)
    assert [(d.id, d.text) for d in docs] == [(f"d{i}", f"document number {i}") for i in range(3)]
    assert stats.kept == 3 and not stats.errors and not stats.dropped


def test_jsonl_multi_frame_zstd(tmp_path: Path) -> None:
    """A .zst made of several concatenated frames is read through all of them."""
    compressor = zstandard.ZstdCompressor()
    path = tmp_path / "frames.jsonl.zst"
    path.write_bytes(
        compressor.compress(_lines(_numbered(2))) + compressor.compress(_lines(_numbered(3)))
    )
    docs, stats = _read(path)
    assert len(docs) == 5 and not stats.errors


def test_jsonl_keys_and_metadata(tmp_path: Path) -> None:
    """Custom text/id/url keys are honoured, other keys go to metadata, source is set."""
    path = tmp_path / "custom.jsonl"
    path.write_bytes(_lines([{"body": "hi", "key": 7, "link": "http://x", "lang": "en"}]))
    docs, _ = _read(path, text_key="body", id_key="key", url_key="link", source="web")
    assert docs == [
        Document(id="7", text="hi", url="http://x", source="web", metadata={"lang": "en"})
    ]


def test_jsonl_missing_id_uses_location(tmp_path: Path) -> None:
    """A record without an id gets "path:line" (1-based) as its id."""
    path = tmp_path / "noid.jsonl"
    path.write_bytes(_lines([{"id": "a", "text": "x"}, {"text": "y"}]))
    docs, _ = _read(path)
    assert [d.id for d in docs] == ["a", f"{path}:2"]


def test_jsonl_streams_without_reading_ahead(tmp_path: Path) -> None:
    """The reader is lazy: the first document arrives before a later bad line is seen."""
    path = tmp_path / "lazy.jsonl"
    path.write_bytes(_lines(_numbered(1)) + b"{bad\n")
    stats = StepStats()
    first = next(read_jsonl(path, stats=stats))
    assert first.id == "d0" and not stats.errors


# --------------------------------------------------------------------------------------------
# JSONL: bad input


def test_jsonl_invalid_json_line(tmp_path: Path) -> None:
    """An invalid JSON line is counted as invalid_json at file:line; its neighbours survive."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes(_lines(_numbered(1)) + b'{"text": "unterminated\n' + _lines(_numbered(2)[1:]))
    docs, stats = _read(path)
    assert [d.id for d in docs] == ["d0", "d1"]
    assert stats.errors == {"invalid_json": 1}
    assert stats.error_examples == {"invalid_json": [f"{path}:2"]}


def test_jsonl_binary_garbage_line(tmp_path: Path) -> None:
    """A line of binary garbage (not UTF-8) is counted as invalid_utf8; the rest survives."""
    path = tmp_path / "garbage.jsonl"
    garbage = bytes(range(256)).replace(b"\n", b"")
    path.write_bytes(_lines(_numbered(1)) + garbage + b"\n" + _lines(_numbered(2)[1:]))
    docs, stats = _read(path)
    assert [d.id for d in docs] == ["d0", "d1"]
    assert stats.errors == {"invalid_utf8": 1}
    assert stats.error_examples["invalid_utf8"] == [f"{path}:2"]


def test_jsonl_invalid_utf8_inside_text_is_not_replaced(tmp_path: Path) -> None:
    """Invalid UTF-8 bytes inside an otherwise valid record are counted, never replaced."""
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n' + _lines(_numbered(1)))
    docs, stats = _read(path)
    assert [d.id for d in docs] == ["d0"]
    assert stats.errors == {"invalid_utf8": 1}
    assert stats.error_examples["invalid_utf8"] == [f"{path}:1"]


def test_jsonl_lone_surrogate_escape(tmp_path: Path) -> None:
    """A "\\ud800" escape (not encodable as UTF-8) is counted as invalid_utf8."""
    path = tmp_path / "surrogate.jsonl"
    path.write_bytes(b'{"text": "bad \\ud800 half"}\n{"text": "ok \\u00e9"}\n')
    docs, stats = _read(path)
    assert [d.text for d in docs] == ["ok é"]
    assert stats.errors == {"invalid_utf8": 1}


def test_jsonl_non_object_line(tmp_path: Path) -> None:
    """A JSON line that is not an object is counted as not_an_object."""
    path = tmp_path / "list.jsonl"
    path.write_bytes(b'["text", "x"]\n42\n' + _lines(_numbered(1)))
    docs, stats = _read(path)
    assert [d.id for d in docs] == ["d0"]
    assert stats.errors == {"not_an_object": 2}
    assert stats.error_examples["not_an_object"] == [f"{path}:1", f"{path}:2"]


def test_jsonl_missing_and_non_string_text(tmp_path: Path) -> None:
    """Absent/null text is missing_text, a non-string text is text_not_string."""
    path = tmp_path / "notext.jsonl"
    path.write_bytes(_lines([{"id": "a"}, {"text": None}, {"text": 3}, {"id": "ok", "text": "t"}]))
    docs, stats = _read(path)
    assert [d.id for d in docs] == ["ok"]
    assert stats.errors == {"missing_text": 2, "text_not_string": 1}
    assert stats.error_examples["missing_text"] == [f"{path}:1", f"{path}:2"]
    assert stats.error_examples["text_not_string"] == [f"{path}:3"]


def test_jsonl_empty_file(tmp_path: Path) -> None:
    """An empty file yields nothing and counts nothing."""
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    docs, stats = _read(path)
    assert docs == [] and stats == StepStats()


def test_jsonl_empty_gzip_file(tmp_path: Path) -> None:
    """A valid gzip file of zero bytes of content yields nothing and counts nothing."""
    path = tmp_path / "empty.jsonl.gz"
    path.write_bytes(gzip.compress(b""))
    docs, stats = _read(path)
    assert docs == [] and stats == StepStats()


def test_jsonl_blank_lines_are_not_records(tmp_path: Path) -> None:
    """Blank lines are skipped without counting, but still advance the line number."""
    path = tmp_path / "blank.jsonl"
    path.write_bytes(b"\n  \n" + b'{"text": "x"}')  # last line without a newline
    docs, stats = _read(path)
    assert [d.id for d in docs] == [f"{path}:3"] and not stats.errors


def test_jsonl_empty_document_is_dropped(tmp_path: Path) -> None:
    """A record with text "" is dropped as empty_text, not an error."""
    path = tmp_path / "emptydoc.jsonl"
    path.write_bytes(_lines([{"text": ""}, {"text": "x"}]))
    docs, stats = _read(path)
    assert [d.text for d in docs] == ["x"]
    assert stats.dropped == {"empty_text": 1} and not stats.errors and stats.kept == 1


def test_jsonl_50mb_document_is_oversized_by_default(tmp_path: Path) -> None:
    """A 50 MB document exceeds the default max_chars: counted as oversized, neighbours kept."""
    path = tmp_path / "big.jsonl"
    with path.open("wb") as fh:
        fh.write(_lines(_numbered(1)))
        fh.write(b'{"id": "big", "text": "' + BIG_TEXT.encode() + b'"}\n')
        fh.write(_lines(_numbered(2)[1:]))
    docs, stats = _read(path)
    assert [d.id for d in docs] == ["d0", "d1"]
    assert stats.errors == {"oversized": 1}
    assert stats.error_examples["oversized"] == [f"{path}:2"]


def test_jsonl_50mb_document_reads_with_larger_limit(tmp_path: Path) -> None:
    """With max_chars above its size the 50 MB document (gzip, spanning many chunks) is read whole."""
    path = tmp_path / "big.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(b'{"id": "big", "text": "' + BIG_TEXT.encode() + b'"}\n')
    docs, stats = _read(path, max_chars=60_000_000)
    assert len(docs) == 1 and docs[0].text == BIG_TEXT and not stats.errors


def test_jsonl_truncated_gzip_keeps_earlier_records(tmp_path: Path) -> None:
    """A gzip file cut short is counted once as truncated_file; the records before the cut survive."""
    records = _numbered(20_000)
    full = gzip.compress(_lines(records))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(full[: len(full) // 2])
    docs, stats = _read(path)
    assert stats.errors == {"truncated_file": 1}
    assert 0 < len(docs) < len(records)
    assert [d.text for d in docs] == [r["text"] for r in records[: len(docs)]]
    assert stats.error_examples["truncated_file"] == [f"{path}:{len(docs) + 1}"]


def test_jsonl_truncated_zstd_keeps_earlier_records(tmp_path: Path) -> None:
    """A zstd file cut mid-frame is counted once as truncated_file; earlier records survive."""
    records = _numbered(20_000)
    full = zstandard.ZstdCompressor().compress(_lines(records))
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(full[: len(full) // 2])
    docs, stats = _read(path)
    assert stats.errors == {"truncated_file": 1}
    assert len(docs) < len(records)
    assert [d.text for d in docs] == [r["text"] for r in records[: len(docs)]]


def test_jsonl_corrupt_gzip_is_counted(tmp_path: Path) -> None:
    """A .gz that is not gzip at all is counted as corrupt_file, not raised."""
    path = tmp_path / "notgzip.jsonl.gz"
    path.write_bytes(b"this is not gzip data\n")
    docs, stats = _read(path)
    assert docs == [] and stats.errors == {"corrupt_file": 1}


# --------------------------------------------------------------------------------------------
# write_jsonl


def _sample_documents() -> list[Document]:
    return [
        Document(id="a", text="héllo\nwörld", url="http://a", source="web", metadata={"q": 0.5}),
        Document(id="b", text="plain", url=None, source="code", metadata={"tags": ["x", 1]}),
        Document(id="c", text="🦙 unicode", source="", metadata={}),
    ]


@pytest.mark.parametrize(("name", "compress"), [("out.jsonl.gz", True), ("out.jsonl", False)])
def test_write_jsonl_round_trip(tmp_path: Path, name: str, compress: bool) -> None:
    """read_jsonl(write_jsonl(docs)) gives back id, text, url, source and metadata unchanged."""
    docs = _sample_documents()
    path = tmp_path / name
    assert write_jsonl(docs, path, compress=compress) == 3
    back, stats = _read(path)
    assert back == docs and stats.kept == 3 and not stats.errors


def test_write_jsonl_gzip_is_reproducible(tmp_path: Path) -> None:
    """The same documents give byte-identical .gz files (no timestamp in the header)."""
    write_jsonl(_sample_documents(), tmp_path / "one.jsonl.gz")
    write_jsonl(_sample_documents(), tmp_path / "two.jsonl.gz")
    assert (tmp_path / "one.jsonl.gz").read_bytes() == (tmp_path / "two.jsonl.gz").read_bytes()


def test_write_jsonl_failure_keeps_previous_file(tmp_path: Path) -> None:
    """If the documents raise mid-write, the previous file is intact and no temp file remains."""
    path = tmp_path / "out.jsonl.gz"
    write_jsonl(_sample_documents(), path)
    before = path.read_bytes()

    def failing() -> object:
        yield _sample_documents()[0]
        raise RuntimeError("upstream failed")

    with pytest.raises(RuntimeError, match="upstream failed"):
        write_jsonl(failing(), path)  # type: ignore[arg-type]
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl.gz"]


def test_write_jsonl_suffix_must_match_compression(tmp_path: Path) -> None:
    """compress=True with a non-.gz path is an error naming the path."""
    with pytest.raises(ValueError, match=r"out\.jsonl"):
        write_jsonl([], tmp_path / "out.jsonl", compress=True)


def test_write_jsonl_unserialisable_metadata_names_document(tmp_path: Path) -> None:
    """Metadata that is not JSON fails with the document's id, leaving no file behind."""
    doc = Document(id="weird", text="x", metadata={"obj": object()})
    with pytest.raises(ValueError, match="'weird'"):
        write_jsonl([doc], tmp_path / "out.jsonl.gz")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Parquet


def test_parquet_reads_in_batches_with_metadata(tmp_path: Path) -> None:
    """Rows across several batches become documents; extra columns become metadata."""
    path = tmp_path / "data.parquet"
    table = pa.table(
        {
            "id": [f"p{i}" for i in range(5)],
            "text": [f"row {i}" for i in range(5)],
            "url": [f"http://p/{i}" for i in range(5)],
            "score": [float(i) for i in range(5)],
        }
    )
    pq.write_table(table, path)
    stats = StepStats()
    docs = list(read_parquet(path, stats=stats, batch_size=2, source="books"))
    assert [d.id for d in docs] == [f"p{i}" for i in range(5)]
    assert docs[3] == Document(
        id="p3", text="row 3", url="http://p/3", source="books", metadata={"score": 3.0}
    )
    assert stats.kept == 5 and not stats.errors


def test_parquet_bad_rows_are_counted(tmp_path: Path) -> None:
    """Null, empty and oversized texts are counted with path:row; ids default to path:row."""
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["good", None, "", "x" * 11, "also good"]}), path)
    stats = StepStats()
    docs = list(read_parquet(path, stats=stats, batch_size=2, max_chars=10))
    assert [(d.id, d.text) for d in docs] == [(f"{path}:0", "good"), (f"{path}:4", "also good")]
    assert stats.errors == {"missing_text": 1, "oversized": 1}
    assert stats.error_examples == {"missing_text": [f"{path}:1"], "oversized": [f"{path}:3"]}
    assert stats.dropped == {"empty_text": 1}


def test_parquet_without_text_column_names_columns(tmp_path: Path) -> None:
    """A Parquet file without the text column raises naming the column and those present."""
    path = tmp_path / "notext.parquet"
    pq.write_table(pa.table({"body": ["x"], "id": ["1"]}), path)
    with pytest.raises(ValueError, match=r"'text'.*\['body', 'id'\]"):
        list(read_parquet(path, stats=StepStats()))


def test_parquet_not_parquet_is_counted(tmp_path: Path) -> None:
    """A .parquet file that is not Parquet is counted as corrupt_file, not raised."""
    path = tmp_path / "fake.parquet"
    path.write_bytes(b"definitely not parquet")
    stats = StepStats()
    assert list(read_parquet(path, stats=stats)) == []
    assert stats.errors == {"corrupt_file": 1}


# --------------------------------------------------------------------------------------------
# WARC


def _write_warc(path: Path, *, gzip_records: bool) -> None:
    """A WARC with: an HTML response, a request, a PDF response, a latin-1 HTML response."""
    with path.open("wb") as fh:
        writer = WARCWriter(fh, gzip=gzip_records)

        def response(uri: str, content_type: str, body: bytes) -> None:
            http = StatusAndHeaders("200 OK", [("Content-Type", content_type)], protocol="HTTP/1.1")
            record = writer.create_warc_record(
                uri, "response", payload=io.BytesIO(body), length=len(body), http_headers=http
            )
            writer.write_record(record)

        response("http://a.example/", "text/html; charset=utf-8", "<p>héllo</p>".encode())
        get = b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"
        request = writer.create_warc_record(
            "http://a.example/", "request", payload=io.BytesIO(get), length=len(get)
        )
        writer.write_record(request)
        response("http://b.example/doc.pdf", "application/pdf", b"%PDF-1.4 binary")
        response(
            "http://c.example/", "text/html; charset=ISO-8859-1", "<p>café</p>".encode("latin-1")
        )


@pytest.mark.parametrize("name", ["crawl.warc", "crawl.warc.gz"])
def test_warc_yields_html_responses_only(tmp_path: Path, name: str) -> None:
    """HTML responses become documents; the request is skipped, the PDF is dropped as not_html."""
    path = tmp_path / name
    _write_warc(path, gzip_records=name.endswith(".gz"))
    stats = StepStats()
    docs = list(read_warc(path, stats=stats, source="web"))
    assert [(d.url, d.text) for d in docs] == [
        ("http://a.example/", "<p>héllo</p>"),
        ("http://c.example/", "<p>café</p>"),
    ]
    assert all(d.id.startswith("<urn:uuid:") and d.source == "web" for d in docs)
    assert all(d.metadata["crawl_date"] and d.metadata["http_status"] == 200 for d in docs)
    assert stats.kept == 2 and stats.dropped == {"not_html": 1} and not stats.errors


def test_warc_bad_bytes_counted_and_kept(tmp_path: Path) -> None:
    """HTML that is not valid in its declared charset is kept with U+FFFD and counted."""
    path = tmp_path / "bad.warc"
    with path.open("wb") as fh:
        writer = WARCWriter(fh, gzip=False)
        http = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
        body = b"<p>caf\xe9</p>"
        writer.write_record(
            writer.create_warc_record(
                "http://x/",
                "response",
                payload=io.BytesIO(body),
                length=len(body),
                http_headers=http,
            )
        )
    stats = StepStats()
    docs = list(read_warc(path, stats=stats))
    assert [d.text for d in docs] == ["<p>caf\ufffd</p>"]
    assert stats.errors == {"invalid_encoding": 1}
    assert stats.error_examples["invalid_encoding"] == [f"{path}:0"]


def test_warc_oversized_body(tmp_path: Path) -> None:
    """A body over max_bytes is counted as oversized; the next records still arrive."""
    path = tmp_path / "crawl.warc.gz"
    _write_warc(path, gzip_records=True)
    stats = StepStats()
    docs = list(read_warc(path, stats=stats, max_bytes=12))  # "<p>café</p>" is 11 bytes
    assert [d.url for d in docs] == ["http://c.example/"]
    assert stats.errors == {"oversized": 1}


def test_warc_garbage_after_records_is_counted(tmp_path: Path) -> None:
    """Garbage after valid records is one malformed_record; the records before it survive."""
    path = tmp_path / "tail.warc"
    _write_warc(path, gzip_records=False)
    with path.open("ab") as fh:
        fh.write(b"NOT A WARC RECORD\r\n\r\n" * 3)
    stats = StepStats()
    docs = list(read_warc(path, stats=stats))
    assert len(docs) == 2
    assert stats.errors == {"malformed_record": 1}


@pytest.mark.parametrize(("name", "cut"), [("crawl.warc.gz", 100), ("crawl.warc", 10)])
def test_warc_truncated_file(tmp_path: Path, name: str, cut: int) -> None:
    """A WARC cut inside its last page counts truncated_file once and keeps the page before it."""
    path = tmp_path / name
    _write_warc(path, gzip_records=name.endswith(".gz"))
    path.write_bytes(path.read_bytes()[:-cut])
    stats = StepStats()
    docs = list(read_warc(path, stats=stats))
    assert [d.url for d in docs] == ["http://a.example/"]
    assert stats.errors == {"truncated_file": 1}


# --------------------------------------------------------------------------------------------
# read_documents


def test_read_documents_dispatches_on_suffix(tmp_path: Path) -> None:
    """JSONL (compressed or not), Parquet and WARC paths go to their reader."""
    write_jsonl(_sample_documents(), tmp_path / "a.jsonl.gz")
    pq.write_table(pa.table({"text": ["pq"]}), tmp_path / "b.parquet")
    _write_warc(tmp_path / "c.warc.gz", gzip_records=True)
    stats = StepStats()
    counts = [
        len(list(read_documents(tmp_path / name, stats=stats)))
        for name in ("a.jsonl.gz", "b.parquet", "c.warc.gz")
    ]
    assert counts == [3, 1, 2]


def test_read_documents_unknown_suffix(tmp_path: Path) -> None:
    """An unsupported suffix raises naming the path and the supported ones."""
    with pytest.raises(ValueError, match=r"data\.csv.*supported"):
        read_documents(tmp_path / "data.csv", stats=StepStats())


def test_write_jsonl_serialises_parquet_metadata_types(tmp_path: Path) -> None:
    """Dates, times, decimals and bytes in metadata (as Parquet columns give them) are written as
    ISO strings, decimal strings and base64, instead of failing the whole part."""
    import datetime
    import decimal

    doc = Document(
        id="p1",
        text="t",
        metadata={
            "when": datetime.datetime(2024, 5, 1, 12, 30),
            "day": datetime.date(2024, 5, 1),
            "price": decimal.Decimal("1.50"),
            "blob": b"\x00\xff",
        },
    )
    write_jsonl([doc], tmp_path / "m.jsonl.gz")
    (back,) = read_jsonl(tmp_path / "m.jsonl.gz", stats=StepStats())
    assert back.metadata == {
        "when": "2024-05-01T12:30:00", "day": "2024-05-01", "price": "1.50", "blob": "AP8="}  # fmt: skip


def test_write_warc_round_trips_and_is_deterministic(tmp_path: Path) -> None:
    """`write_warc` pages read back by `read_warc` as they went in (URL, date, decoded HTML), with
    record ids derived from the content: the same pages give the same bytes."""
    from llama_data import WebPage, read_warc, write_warc

    pages = [
        WebPage("https://a.example/x", "<p>café</p>".encode()),
        WebPage("https://a.example/x", b"<p>later</p>", date="2024-06-01T00:00:00Z"),
        WebPage("https://b.example/", b"\xe9t\xe9", content_type="text/html; charset=latin-1"),
        WebPage("https://b.example/img", b"\x89PNG", content_type="image/png"),
    ]
    assert write_warc(pages, tmp_path / "a.warc.gz") == 4
    assert write_warc(pages, tmp_path / "b.warc.gz") == 4
    assert (tmp_path / "a.warc.gz").read_bytes() == (tmp_path / "b.warc.gz").read_bytes()
    stats = StepStats()
    docs = list(read_warc(tmp_path / "a.warc.gz", stats=stats))
    assert [(d.url, d.text, d.metadata["crawl_date"]) for d in docs] == [
        ("https://a.example/x", "<p>café</p>", "2024-01-01T00:00:00Z"),
        ("https://a.example/x", "<p>later</p>", "2024-06-01T00:00:00Z"),
        ("https://b.example/", "été", "2024-01-01T00:00:00Z"),
    ]
    assert stats.dropped == {"not_html": 1} and len({d.id for d in docs}) == 3
    with pytest.raises(ValueError, match=r"must end in '\.warc\.gz'"):
        write_warc(pages, tmp_path / "c.warc")
