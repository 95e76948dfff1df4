"""The public API of llama_data is pinned, and importing all of it never loads torch."""

from __future__ import annotations

import subprocess
import sys
from importlib.resources import files

import llama_data

EXPECTED = [
    "ANNEALING_MIX", "DirtyWordFilter", "Document", "ExactDedup", "FastTextClassifier", "Filter", "GopherQualityFilter",
    "GopherRepetitionFilter", "HtmlExtractor", "LLAMA3_PRETRAINING_MIX", "LanguageFilter",
    "LanguageIdentifier", "LineDedup", "LshIndex", "Manifest", "Mapper", "MinHasher", "NearDedup", "NearDedupConfig",
    "PiiScrubber", "Pipeline", "PipelineReport", "QualityFilter", "Step", "StepStats", "TokenKLFilter",
    "TokenShards", "TokenizerInfo", "UrlBlocklist", "UrlDedup", "WindowStream", "extract_text", "mix", "near_duplicate_clusters", "read_documents", "shingle_set",
    "read_jsonl", "read_parquet", "read_warc", "route_by_language", "write_jsonl",
    "write_token_shards", "atomic_write", "publish_directory", "write_warc", "WebPage", "LocalExecutor",
    "RayExecutor", "ShardedKeyDedup", "ShardedLineDedup", "ShardedNearDedup", "as_sharded",
]  # fmt: skip


def test_public_api_is_pinned() -> None:
    """__all__ lists exactly the expected names, and each one is importable."""
    assert sorted(llama_data.__all__) == sorted(EXPECTED)
    for name in EXPECTED:
        assert getattr(llama_data, name) is not None


def test_package_ships_type_information() -> None:
    """The installed package carries py.typed."""
    assert files("llama_data").joinpath("py.typed").is_file()


def test_no_module_imports_torch() -> None:
    """Importing every llama_data module (and using the language model) loads no torch (DESIGN.md)."""
    code = (
        "import sys, pkgutil, importlib, llama_data\n"
        "for m in pkgutil.iter_modules(llama_data.__path__):\n"
        "    importlib.import_module('llama_data.' + m.name)\n"
        "llama_data.LanguageIdentifier().identify('hello world, this is English text')\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
