"""The web path end to end, as `examples/web_curation` runs it: real HTML (the pages `pydoc` writes
for standard-library modules, so that no download is needed) crawled into WARC files, then the
example's own pipeline file: extraction, quality filters, language ID, sharded URL / exact / near /
line dedup and Llama 3 token shards that llama-data's reader opens."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from llama_data import Manifest, StepStats, TokenShards, read_jsonl, read_warc
from llama_data.cli import main as llama_data_main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "web_curation"


def _make_warcs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_warcs", EXAMPLE / "make_warcs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_warc_to_token_shards_with_the_example_pipeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_warcs = _make_warcs()
    assert make_warcs.main([str(tmp_path / "warcs"), "--pydoc", "--files", "4"]) == 0
    records = [
        doc
        for path in sorted((tmp_path / "warcs").glob("*.warc.gz"))
        for doc in read_warc(path, stats=StepStats())
    ]
    pages = len(make_warcs.PYDOC_MODULES)
    # 1 + 1/5 recrawled + 1/4 mirrored + 1/3 older versions
    assert len(records) == pages + len(range(0, pages, 5)) + len(range(0, pages, 4)) + len(
        range(0, pages, 3)
    )
    assert len({d.id for d in records}) == len(records)  # ids derived from content: unique

    shutil.copy(EXAMPLE / "pipeline.toml", tmp_path / "pipeline.toml")
    assert llama_data_main(["run", str(tmp_path / "pipeline.toml"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    stats = json.loads((tmp_path / "curated" / "stats.json").read_text())["steps"]
    assert stats["read"]["kept"] == len(records)
    assert stats["html_extract"]["kept"] > 0
    for step, reason in [
        ("url_dedup", "url_duplicate"),  # the June recrawls win over March
        ("exact_dedup", "exact_duplicate"),  # the mirror
        ("near_dedup", "near_duplicate"),  # the /3.10/ versions with words changed
    ]:
        assert stats[step]["dropped"].get(reason, 0) > 0, (step, stats[step])
    kept = list(read_jsonl(tmp_path / "curated" / "documents.jsonl.gz", stats=StepStats()))
    assert len(kept) == stats["line_dedup"]["kept"] > 0
    assert len({" ".join(d.text.split()) for d in kept}) == len(kept)  # no exact copies left
    recrawled = {d.url for d in records if d.metadata["crawl_date"].startswith("2024-06")}
    latest = [d for d in kept if d.url in recrawled]
    assert latest and all(d.metadata["crawl_date"].startswith("2024-06") for d in latest)

    manifest = Manifest.read(tmp_path / "tokens")
    assert manifest.tokenizer.name == "llama3" and manifest.num_documents == len(kept)
    assert f"({manifest.num_tokens:,} tokens)" in printed
    shards = TokenShards(tmp_path / "tokens")
    assert (
        len(shards) == len(kept)
        and sum(len(shards[i]) for i in range(len(kept))) == manifest.num_tokens
    )

    # A second run finds every part, step and the token shards done.
    before = (tmp_path / "tokens").stat().st_mtime_ns
    assert llama_data_main(["run", str(tmp_path / "pipeline.toml"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "curated" / "stats.json").read_text())
    assert again["parts_run"] == [] and again["steps"] == stats
    assert (tmp_path / "tokens").stat().st_mtime_ns == before
