"""Streaming readers (JSONL, Parquet, WARC) and an atomic JSONL writer: the edges of the pipeline.

The corpus of §3.1 of the Llama 3 paper starts as web crawls (WARC files of HTML responses) and
intermediate dumps (JSONL, Parquet). Readers here turn those files into `Document`s one record at a
time, never loading a file whole, and never stop on a bad record (DESIGN.md: "never lose data
silently"): a malformed line, a run of non-UTF-8 bytes or an oversized document is counted in a
`StepStats` with its kind and its location, and the run goes on.

Error kinds counted with `StepStats.error(kind, "file:line")`:

- ``invalid_json``: the line is not JSON.
- ``not_an_object``: the line is JSON but not an object (e.g. a list or a number).
- ``missing_text``: the text field is absent or null; ``text_not_string``: it is another type.
- ``invalid_utf8``: the line's bytes are not valid UTF-8 (decoded strictly, never replaced), or
  its JSON holds a lone surrogate escape (``"\\ud800"``) that cannot be written back as UTF-8.
- ``oversized``: the text is longer than ``max_chars`` characters (``max_bytes`` for WARC).
- ``truncated_file``: the file ends inside a record (a compressed stream cut before its end
  marker, a WARC record cut short of its Content-Length); the file's earlier records are kept
  and reading stops there. ``corrupt_file``: the compressed data is damaged (bad CRC,
  corrupt zstd block) or the file cannot be opened as its format at all; same handling.
- WARC only: ``malformed_record`` (a record warcio cannot parse), ``invalid_encoding`` (HTML
  bytes that do not decode with the declared charset; the page is kept with U+FFFD replacements),
  ``unknown_charset`` (an unrecognised charset label; decoded as UTF-8 instead).

Documents a reader deliberately skips are counted with `StepStats.drop`: ``empty_text`` (a
record whose text is ""), ``not_html`` (a WARC response that is not HTML). Every yielded
document counts in `StepStats.kept`. Blank lines and non-response WARC records (requests,
warcinfo, metadata) are not records and are not counted.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import gzip
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from llama_data._atomic import atomic_write
from llama_data.document import Document, StepStats
from llama_data.warc import read_warc

__all__ = [
    "read_documents",
    "read_jsonl",
    "read_parquet",
    "read_warc",
    "write_jsonl",
]

DEFAULT_MAX_CHARS = 10_000_000
"""Longest text (in characters) a reader accepts; longer documents are counted as oversized."""

_CHUNK_BYTES = 1 << 20  # read compressed and plain files 1 MiB at a time
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_COMPRESSION_SUFFIXES = ("", ".gz", ".zst", ".zstd")
# Keys write_jsonl gives their own meaning; everything else in a record goes into metadata.
_METADATA_KEY = "metadata"
_SOURCE_KEY = "source"


class _TruncatedError(Exception):
    """A compressed stream ended before its end-of-stream marker."""


class _CorruptError(Exception):
    """A compressed stream's data is damaged."""


# ---------------------------------------------------------------------------------------------
# Byte streams and lines


def _compression(path: Path) -> str:
    """ "gz", "zst" or "" from the last suffix of `path`."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return "gz"
    if suffix in (".zst", ".zstd"):
        return "zst"
    return ""


def _plain_chunks(fh: IO[bytes]) -> Iterator[bytes]:
    while chunk := fh.read(_CHUNK_BYTES):
        yield chunk


def _gzip_chunks(fh: IO[bytes]) -> Iterator[bytes]:
    """Decompressed chunks of a (possibly multi-member) gzip stream."""
    with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
        while True:
            try:
                chunk = gz.read1(_CHUNK_BYTES)  # what is available: a later cut keeps it
            except EOFError as exc:
                raise _TruncatedError(str(exc)) from exc
            except (zlib.error, gzip.BadGzipFile) as exc:
                raise _CorruptError(str(exc)) from exc
            if not chunk:
                return
            yield chunk


def _zstd_chunks(fh: IO[bytes]) -> Iterator[bytes]:
    """Decompressed chunks of a (possibly multi-frame) zstd stream; a cut-off frame raises."""
    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    frame_started = False  # has the current frame received any bytes?
    while raw := fh.read(_CHUNK_BYTES):
        while raw:
            frame_started = True
            try:
                out = dobj.decompress(raw)
            except zstandard.ZstdError as exc:
                raise _CorruptError(str(exc)) from exc
            if out:
                yield out
            if dobj.eof:  # a frame ended; what follows it starts the next frame
                raw = dobj.unused_data
                dobj = dctx.decompressobj()
                frame_started = False
            else:
                raw = b""
    if frame_started:
        raise _TruncatedError("zstd stream ended in the middle of a frame")


def _split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The lines (without b"\\n") of a stream of chunks; a final line without b"\\n" counts."""
    pending: list[bytes] = []  # pieces of a line that spans chunks (joined once, not quadratic)
    for chunk in chunks:
        start = 0
        while (newline := chunk.find(b"\n", start)) >= 0:
            piece = chunk[start:newline]
            if pending:
                pending.append(piece)
                yield b"".join(pending)
                pending = []
            else:
                yield piece
            start = newline + 1
        if start < len(chunk):
            pending.append(chunk[start:])
    if pending:
        yield b"".join(pending)


def _open_lines(fh: IO[bytes], compression: str) -> Iterator[bytes]:
    if compression == "gz":
        return _split_lines(_gzip_chunks(fh))
    if compression == "zst":
        return _split_lines(_zstd_chunks(fh))
    return _split_lines(_plain_chunks(fh))


# ---------------------------------------------------------------------------------------------
# JSONL


def read_jsonl(
    path: str | os.PathLike[str],
    *,
    stats: StepStats,
    text_key: str = "text",
    id_key: str = "id",
    url_key: str = "url",
    source: str = "",
    max_chars: int = DEFAULT_MAX_CHARS,
) -> Iterator[Document]:
    """Stream the documents of a JSON Lines file (plain, .gz or .zst, chosen by suffix).

    Each line is one JSON object. `text_key` holds the text, `id_key` the id (default
    "path:line", 1-based; non-string ids are converted with `str`), `url_key` the URL. A
    `"metadata"` object (as `write_jsonl` writes it) is merged into `Document.metadata`, and every
    other key goes there too. The document's source is `source` if given, else the record's
    `"source"` string, else "". Bad records are counted in `stats` (see the module docstring) and
    skipped; a truncated compressed file keeps its earlier records.
    """
    path = Path(path)
    if max_chars < 0:
        raise ValueError(f"max_chars must be >= 0, got {max_chars}")
    line_number = 0
    with path.open("rb") as fh:
        lines = _open_lines(fh, _compression(path))
        try:
            for line_number, raw in enumerate(lines, start=1):
                doc = _parse_json_line(
                    raw,
                    where=f"{path}:{line_number}",
                    stats=stats,
                    text_key=text_key,
                    id_key=id_key,
                    url_key=url_key,
                    source=source,
                    max_chars=max_chars,
                )
                if doc is not None:
                    stats.kept += 1
                    yield doc
        except _TruncatedError:
            stats.error("truncated_file", f"{path}:{line_number + 1}")
        except _CorruptError:
            stats.error("corrupt_file", f"{path}:{line_number + 1}")


def _parse_json_line(
    raw: bytes,
    *,
    where: str,
    stats: StepStats,
    text_key: str,
    id_key: str,
    url_key: str,
    source: str,
    max_chars: int,
) -> Document | None:
    """The document on one line, or None (after counting why) if there is none."""
    if not raw.strip():
        return None  # a blank line is not a record
    try:
        line = raw.decode("utf-8")  # strict: bad bytes are counted, never replaced
    except UnicodeDecodeError:
        stats.error("invalid_utf8", where)
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        stats.error("invalid_json", where)
        return None
    if not isinstance(record, dict):
        stats.error("not_an_object", where)
        return None
    text = record.pop(text_key, None)
    if text is None:
        stats.error("missing_text", where)
        return None
    if not isinstance(text, str):
        stats.error("text_not_string", where)
        return None
    if len(text) > max_chars:
        stats.error("oversized", where)
        return None
    if "\\u" in line and not _is_encodable(text):  # a lone surrogate escape such as "\ud800"
        stats.error("invalid_utf8", where)
        return None
    if not text:
        stats.drop("empty_text")
        return None
    doc_id = record.pop(id_key, None)
    url = record.pop(url_key, None)
    metadata: dict[str, Any] = {}
    nested = record.pop(_METADATA_KEY, None)
    if isinstance(nested, dict):
        metadata.update(nested)
    elif nested is not None:
        metadata[_METADATA_KEY] = nested
    record_source = record.pop(_SOURCE_KEY, None)
    if source:
        if record_source is not None:
            metadata[_SOURCE_KEY] = record_source
    elif isinstance(record_source, str):
        source = record_source
    elif record_source is not None:
        metadata[_SOURCE_KEY] = record_source
    metadata.update(record)
    return Document(
        id=where if doc_id is None else str(doc_id),
        text=text,
        url=url if isinstance(url, str) else None,
        source=source,
        metadata=metadata,
    )


def _is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def write_jsonl(
    docs: Iterable[Document], path: str | os.PathLike[str], *, compress: bool = True
) -> int:
    """Write `docs` as JSON Lines (gzip-compressed if `compress`) atomically; return the count.

    Each line is ``{"id", "text", "url", "source", "metadata"}``, which `read_jsonl` reads back
    unchanged. The data goes to a temporary file in the same directory, is fsynced, and replaces
    `path` with `os.replace` only when complete: a crash or an exception from `docs` leaves the
    previous file (or none) in place, never a truncated one. `path` must end in ".gz" exactly
    when `compress` is true, so that `read_jsonl` later picks the right decompressor.
    """
    path = Path(path)
    is_gz = path.suffix.lower() == ".gz"
    if compress != is_gz:
        want = "end in '.gz'" if compress else "not end in '.gz' (or pass compress=True)"
        raise ValueError(f"write_jsonl: with compress={compress}, path {str(path)!r} must {want}")
    if _compression(path) == "zst":
        raise ValueError(f"write_jsonl writes gzip or plain JSONL, not zstd: {str(path)!r}")
    with atomic_write(path) as temporary, open(temporary, "wb") as raw:
        if compress:
            # mtime=0 and no file name in the header: identical input gives identical bytes.
            with gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
                count = _write_documents(docs, gz.write)
        else:
            count = _write_documents(docs, raw.write)
    return count


def _write_documents(docs: Iterable[Document], write: Callable[[bytes], object]) -> int:
    count = 0
    for doc in docs:
        write(_encode_document(doc))
        count += 1
    return count


def _json_value(value: Any) -> Any:
    """JSON for the metadata types readers produce beyond JSON's own (Parquet timestamps, dates,
    decimals, bytes): ISO 8601 strings, decimal strings, base64."""
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _encode_document(doc: Document) -> bytes:
    record = {
        "id": doc.id,
        "text": doc.text,
        "url": doc.url,
        "source": doc.source,
        "metadata": doc.metadata,
    }
    try:
        return (json.dumps(record, ensure_ascii=False, default=_json_value) + "\n").encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise ValueError(
            f"write_jsonl: document {doc.id!r} cannot be written as JSON ({exc}); "
            "metadata values must be JSON types and text must be valid Unicode"
        ) from exc


# ---------------------------------------------------------------------------------------------
# Parquet


def read_parquet(
    path: str | os.PathLike[str],
    *,
    stats: StepStats,
    text_column: str = "text",
    id_column: str = "id",
    url_column: str = "url",
    source: str = "",
    batch_size: int = 1024,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> Iterator[Document]:
    """Stream the documents of a Parquet file, `batch_size` rows at a time.

    `text_column` must exist (ValueError naming it and the columns present otherwise). The id is
    `id_column` (default "path:row", 0-based), the URL `url_column`, and every other column goes
    into metadata. Null or non-string text, oversized and empty texts are counted as in
    `read_jsonl`; a file that is not Parquet or is damaged mid-way is counted as ``corrupt_file``
    and the rows read before the damage are kept.
    """
    path = Path(path)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        stats.error("corrupt_file", f"{path}:0")
        return
    columns = parquet.schema_arrow.names
    if text_column not in columns:
        raise ValueError(
            f"Parquet file {str(path)!r} has no text column {text_column!r}; columns present: "
            f"{columns}. Pass text_column= naming the column that holds the text."
        )
    row = 0
    with parquet:
        batches = parquet.iter_batches(batch_size=batch_size)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (pa.ArrowException, OSError):
                stats.error("corrupt_file", f"{path}:{row}")
                return
            for record in batch.to_pylist():
                where = f"{path}:{row}"
                row += 1
                doc = _parquet_document(
                    record,
                    where=where,
                    stats=stats,
                    text_column=text_column,
                    id_column=id_column,
                    url_column=url_column,
                    source=source,
                    max_chars=max_chars,
                )
                if doc is not None:
                    stats.kept += 1
                    yield doc


def _parquet_document(
    record: dict[str, Any],
    *,
    where: str,
    stats: StepStats,
    text_column: str,
    id_column: str,
    url_column: str,
    source: str,
    max_chars: int,
) -> Document | None:
    text = record.pop(text_column)
    if text is None:
        stats.error("missing_text", where)
        return None
    if not isinstance(text, str):
        stats.error("text_not_string", where)
        return None
    if len(text) > max_chars:
        stats.error("oversized", where)
        return None
    if not text:
        stats.drop("empty_text")
        return None
    doc_id = record.pop(id_column, None)
    url = record.pop(url_column, None)
    return Document(
        id=where if doc_id is None else str(doc_id),
        text=text,
        url=url if isinstance(url, str) else None,
        source=source,
        metadata=record,
    )


# ---------------------------------------------------------------------------------------------
# Dispatch


def read_documents(path: str | os.PathLike[str], **kwargs: Any) -> Iterator[Document]:
    """Stream documents from `path` with the reader its suffix names; `kwargs` go to the reader.

    .jsonl/.json/.ndjson (optionally + .gz/.zst) → `read_jsonl`; .parquet → `read_parquet`;
    .warc/.warc.gz → `read_warc`. Pass ``stats=StepStats()`` (all readers require it).
    """
    path = Path(path)
    suffixes = [suffix.lower() for suffix in path.suffixes]
    last = suffixes[-1] if suffixes else ""
    before = suffixes[-2] if len(suffixes) > 1 else ""
    if last in _JSONL_SUFFIXES or (last in _COMPRESSION_SUFFIXES and before in _JSONL_SUFFIXES):
        return read_jsonl(path, **kwargs)
    if last == ".parquet":
        return read_parquet(path, **kwargs)
    if last == ".warc" or (last == ".gz" and before == ".warc"):
        return read_warc(path, **kwargs)
    raise ValueError(
        f"read_documents: no reader for {str(path)!r} (suffix {''.join(path.suffixes)!r}); "
        "supported: .jsonl/.json/.ndjson[.gz|.zst], .parquet, .warc[.gz]"
    )
