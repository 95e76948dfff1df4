"""WARC files: the HTML responses of a web crawl as `Document`s (§3.1 of the Llama 3 paper), and
`write_warc` to build a crawl from pages one has (to test a pipeline on real HTML offline).

Only HTTP `response` records with an HTML content type become documents, their text the raw HTML
(decoded with the charset the headers declare); `llama_data.extract` turns it into text. Requests,
warcinfo and metadata records are skipped uncounted; non-HTML responses are dropped as ``not_html``.
Error kinds are those of `llama_data.readers` plus ``malformed_record``, ``invalid_encoding`` and
``unknown_charset``. Locations are ``path:byte offset`` of the record.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from llama_data._atomic import atomic_write
from llama_data.document import Document, StepStats

__all__ = ["DEFAULT_MAX_BYTES", "WebPage", "read_warc", "write_warc"]

DEFAULT_MAX_BYTES = 10_000_000
"""Largest WARC response body (in bytes) read; larger bodies are counted as oversized."""
_HTML_CONTENT_TYPES = ("text/html", "application/xhtml+xml")


class _TruncatedError(Exception):
    """A record's body ends before its Content-Length: the file was cut inside this record."""


def read_warc(
    path: str | os.PathLike[str],
    *,
    stats: StepStats,
    source: str = "",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Iterator[Document]:
    """Stream the HTML pages of a WARC file (.warc or .warc.gz) as documents of raw HTML.

    Only ``response`` records whose HTTP Content-Type is HTML become documents: `text` is the
    body (decoded with the header's charset, else UTF-8), `url` the WARC-Target-URI, `id` the
    WARC-Record-ID, and metadata holds ``crawl_date`` (WARC-Date) and ``http_status``. HTML to
    text extraction is a later step's job. Locations in `stats` are "path:byte offset" of the
    record (of its gzip member in a .warc.gz). A record warcio cannot parse is counted as
    ``malformed_record`` and ends the file (the WARC framing is lost at that point); a record
    cut short of its Content-Length (a truncated file) is counted as ``truncated_file``. The
    records before either are kept.
    """
    path = Path(path)
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    with path.open("rb") as fh:
        records = ArchiveIterator(fh)
        previous: tuple[Any, str] | None = None  # the last record and its location
        try:
            while True:
                try:
                    record = next(records)
                except StopIteration:
                    # warcio stops quietly at a record it cannot start (e.g. a gzip member cut
                    # off in its headers): bytes left after the last record mean truncation.
                    if records.offset < path.stat().st_size:
                        stats.error("truncated_file", f"{path}:{records.offset}")
                    return
                except (ArchiveLoadFailed, EOFError, zlib.error, ValueError):
                    where = f"{path}:{records.offset}"
                    stats.error("malformed_record", where)
                    return
                finally:
                    # warcio has now read the previous record to its end: was all of it there?
                    if previous is not None and _is_cut_short(previous[0]):
                        stats.error("truncated_file", previous[1])
                # Start of this record (warcio sets it when it finished the previous one);
                # get_record_offset() would read the record to its end, content included.
                where = f"{path}:{records.offset}"
                previous = (record, where)
                try:
                    doc = _warc_document(
                        record, where=where, stats=stats, source=source, max_bytes=max_bytes
                    )
                except _TruncatedError:
                    stats.error("truncated_file", where)
                    previous = None  # counted already
                    continue
                except (EOFError, zlib.error, ValueError, OSError):
                    stats.error("malformed_record", where)
                    continue
                if doc is not None:
                    stats.kept += 1
                    yield doc
        finally:
            records.close()


def _is_cut_short(record: Any) -> bool:
    """Whether `record`, read to its end, held fewer bytes than its Content-Length promised."""
    return int(getattr(record.raw_stream, "limit", 0)) > 0


def _warc_document(
    record: Any, *, where: str, stats: StepStats, source: str, max_bytes: int
) -> Document | None:
    """The HTML page in one WARC record, or None (after counting why) if there is none."""
    if not record.rec_type:
        stats.error("malformed_record", where)  # no WARC-Type: not a record we can trust
        return None
    if record.rec_type != "response":
        return None  # request, warcinfo, metadata, ...: not pages
    http_headers = record.http_headers
    if http_headers is None:  # e.g. a DNS or FTP response: no HTTP headers to say it's HTML
        stats.drop("not_html")
        return None
    content_type = (http_headers.get_header("Content-Type") or "").lower()
    media_type = content_type.split(";", 1)[0].strip()
    if media_type not in _HTML_CONTENT_TYPES:
        stats.drop("not_html")
        return None
    body = record.content_stream().read(max_bytes + 1)
    if len(body) > max_bytes:
        stats.error("oversized", where)
        return None
    if _is_cut_short(record):  # the file ends inside this page: don't pass half a page on
        raise _TruncatedError(where)
    html = _decode_html(body, content_type, where=where, stats=stats)
    if not html:
        stats.drop("empty_text")
        return None
    headers = record.rec_headers
    status = http_headers.get_statuscode()
    return Document(
        id=headers.get_header("WARC-Record-ID") or where,
        text=html,
        url=headers.get_header("WARC-Target-URI"),
        source=source,
        metadata={
            "crawl_date": headers.get_header("WARC-Date"),
            "http_status": int(status) if status and status.isdigit() else None,
        },
    )


def _decode_html(body: bytes, content_type: str, *, where: str, stats: StepStats) -> str:
    """Decode `body` with the charset in `content_type` (UTF-8 if none), counting any trouble."""
    encoding = "utf-8"
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip() == "charset" and value.strip().strip("'\""):
            label = value.strip().strip("'\"")
            try:
                encoding = codecs.lookup(label).name
            except LookupError:
                stats.error("unknown_charset", where)
            break
    try:
        return body.decode(encoding)
    except UnicodeDecodeError:
        stats.error("invalid_encoding", where)
        return body.decode(encoding, errors="replace")


@dataclass(frozen=True)
class WebPage:
    """One crawled page for `write_warc`."""

    url: str
    """The page's URL (WARC-Target-URI)."""
    body: bytes
    """The HTTP response body, e.g. the HTML file's bytes."""
    date: str = "2024-01-01T00:00:00Z"
    """When it was crawled (WARC-Date, ISO 8601 UTC): URL dedup keeps the latest crawl."""
    content_type: str = "text/html; charset=utf-8"
    """The HTTP Content-Type header."""


def write_warc(pages: Iterable[WebPage], path: str | os.PathLike[str]) -> int:
    """Write `pages` as HTTP 200 ``response`` records of a gzipped WARC file (each record its own
    gzip member, as crawlers write them), atomically; return the number of records.

    The WARC-Record-ID of a page is a UUID derived from its URL, date and body, so the same pages
    give the same file (and `read_warc` the same document ids) on every run."""
    path = Path(path)
    if not path.name.endswith(".warc.gz"):
        raise ValueError(f"write_warc writes gzipped WARC: {str(path)!r} must end in '.warc.gz'")
    count = 0
    with atomic_write(path) as temporary, open(temporary, "wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        for page in pages:
            identity = hashlib.sha256(f"{page.url}\n{page.date}\n".encode() + page.body)
            headers = StatusAndHeaders(
                "200 OK",
                [("Content-Type", page.content_type), ("Content-Length", str(len(page.body)))],
                protocol="HTTP/1.1",
            )
            record = writer.create_warc_record(
                page.url,
                "response",
                payload=BytesIO(page.body),
                length=len(page.body),
                http_headers=headers,
                warc_headers_dict={
                    "WARC-Record-ID": f"<urn:uuid:{uuid.UUID(bytes=identity.digest()[:16])}>",
                    "WARC-Date": page.date,
                },
            )
            writer.write_record(record)
            count += 1
    return count
