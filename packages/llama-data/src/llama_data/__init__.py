"""llama_data: documents in, curated token shards out (§3.1 of "The Llama 3 Herd of Models").

Readers for JSONL, Parquet and WARC; HTML-to-text extraction that keeps code and math; URL block
lists, PII scrubbing, Gopher-style quality rules, a fastText quality classifier, the paper's duplicated-n-gram, dirty-word and
token-distribution heuristics and fastText language identification; URL, exact, MinHash and line
deduplication (sharded stages with bounded memory at any scale); weighted mixing; token shards for llama-train; a resumable parallel `Pipeline`; and
the crash-safe writes all of them use (`atomic_write`, `publish_directory`).
It never imports torch (DESIGN.md): a data engineer runs it on CPU fleets.
"""

from llama_data._atomic import atomic_write, publish_directory
from llama_data.dedup import (
    ExactDedup,
    LineDedup,
    NearDedup,
    NearDedupConfig,
    UrlDedup,
    near_duplicate_clusters,
    shingle_set,
)
from llama_data.document import Document, Filter, Mapper, Step, StepStats
from llama_data.extract import HtmlExtractor, extract_text
from llama_data.filters import DirtyWordFilter, TokenKLFilter, UrlBlocklist
from llama_data.langid import LanguageFilter, LanguageIdentifier, route_by_language
from llama_data.minhash import LshIndex, MinHasher
from llama_data.mix import ANNEALING_MIX, LLAMA3_PRETRAINING_MIX, mix
from llama_data.pii import PiiScrubber
from llama_data.pipeline import Pipeline, PipelineReport
from llama_data.quality import FastTextClassifier, QualityFilter
from llama_data.quality_rules import GopherQualityFilter, GopherRepetitionFilter
from llama_data.readers import read_documents, read_jsonl, read_parquet, write_jsonl
from llama_data.sharded import (
    LocalExecutor,
    RayExecutor,
    ShardedKeyDedup,
    ShardedLineDedup,
    ShardedNearDedup,
    as_sharded,
)
from llama_data.shards import Manifest, TokenizerInfo, write_token_shards
from llama_data.token_shards import TokenShards, WindowStream
from llama_data.warc import WebPage, read_warc, write_warc

__all__ = [
    # documents and steps
    "Document",
    "Filter",
    "Mapper",
    "Step",
    "StepStats",
    # reading and writing
    "read_documents",
    "read_jsonl",
    "read_parquet",
    "read_warc",
    "write_warc",
    "WebPage",
    "write_jsonl",
    # extraction
    "HtmlExtractor",
    "extract_text",
    # filters
    "DirtyWordFilter",
    "GopherQualityFilter",
    "GopherRepetitionFilter",
    "PiiScrubber",
    "TokenKLFilter",
    "UrlBlocklist",
    # model-based quality filtering
    "FastTextClassifier",
    "QualityFilter",
    # language identification
    "LanguageFilter",
    "LanguageIdentifier",
    "route_by_language",
    # deduplication
    "ExactDedup",
    "LineDedup",
    "LshIndex",
    "MinHasher",
    "NearDedup",
    "NearDedupConfig",
    "UrlDedup",
    "near_duplicate_clusters",
    "shingle_set",
    # the global steps as sharded stages, and where their tasks run
    "LocalExecutor",
    "RayExecutor",
    "ShardedKeyDedup",
    "ShardedLineDedup",
    "ShardedNearDedup",
    "as_sharded",
    # mixing
    "ANNEALING_MIX",
    "LLAMA3_PRETRAINING_MIX",
    "mix",
    # token shards and pipelines
    "Manifest",
    "Pipeline",
    "PipelineReport",
    "TokenizerInfo",
    "TokenShards",
    "WindowStream",
    "write_token_shards",
    # crash-safe writes
    "atomic_write",
    "publish_directory",
]
