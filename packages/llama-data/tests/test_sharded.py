"""The sharded global steps (`llama_data.sharded`) equal the single-process steps of
`llama_data.dedup` over the same parts in order (documents, order, statistics) for 1, 2 and 4
workers and any partition count, and a second run skips every finished task."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from llama_data import (
    Document,
    ExactDedup,
    LineDedup,
    NearDedup,
    NearDedupConfig,
    Pipeline,
    StepStats,
    UrlDedup,
    read_jsonl,
    write_jsonl,
)
from llama_data.sharded import (
    LocalExecutor,
    ShardedKeyDedup,
    ShardedLineDedup,
    ShardedNearDedup,
    ShardedResult,
    ShardedStep,
)


def _corpus(seed: int, n_parts: int = 5, per_part: int = 40) -> list[list[Document]]:
    rng = random.Random(seed)
    texts = [
        f"document {i} " + " ".join(rng.choice("abcdefgh") for _ in range(20)) for i in range(60)
    ]
    urls = [f"https://Example.com/page{i}" for i in range(50)]
    parts = []
    for _ in range(n_parts):
        docs = []
        for _ in range(per_part):
            text = rng.choice(texts) + ("  " if rng.random() < 0.3 else "")  # whitespace variants
            url = rng.choice(urls) if rng.random() < 0.9 else None
            date = f"2024-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}" if rng.random() < 0.8 else None
            metadata = {"crawl_date": date} if date else {}
            if rng.random() < 0.02:
                metadata = {"crawl_date": "not a date"}
            docs.append(
                Document(id=f"d{rng.randint(0, 30)}", text=text, url=url, metadata=metadata)
            )
        parts.append(docs)
    return parts


def _read_back(paths: list[Path]) -> list[Document]:
    """The parts' documents in order, read as the pipeline's global stage reads them (a document
    with an empty text is counted by the reader and not passed on)."""
    return [d for path in paths for d in read_jsonl(path, stats=StepStats())]


def _write(parts: list[list[Document]], directory: Path) -> list[Path]:
    directory.mkdir(parents=True)
    paths = [directory / f"part-{i:05d}.jsonl.gz" for i in range(len(parts))]
    for docs, path in zip(parts, paths, strict=True):
        write_jsonl(docs, path)
    return paths


def _run(step: ShardedStep, paths: list[Path], tmp_path: Path, workers: int) -> ShardedResult:
    with LocalExecutor(workers) as executor:
        return step.run(paths, tmp_path / "work", tmp_path / "out", executor=executor)


@pytest.mark.parametrize("kind", ["exact", "url"])
@pytest.mark.parametrize(("workers", "partitions"), [(1, 1), (2, 3), (4, 16)])
def test_sharded_equals_single_process(
    tmp_path: Path, kind: str, workers: int, partitions: int
) -> None:
    corpus = _corpus(seed=7)
    paths = _write(corpus, tmp_path / "parts")
    single = ExactDedup() if kind == "exact" else UrlDedup()
    expected_stats = StepStats()
    expected = list(single.run(_read_back(paths), expected_stats))
    step = ShardedKeyDedup(kind=kind, partitions=partitions)  # type: ignore[arg-type]
    stats = _run(step, paths, tmp_path, workers).stats
    got = [
        d
        for i in range(len(paths))
        for d in read_jsonl(tmp_path / "out" / f"part-{i:05d}.jsonl.gz", stats=StepStats())
    ]
    assert [(d.id, d.text, d.url) for d in got] == [(d.id, d.text, d.url) for d in expected]
    assert stats.kept == expected_stats.kept and stats.dropped == expected_stats.dropped
    assert stats.errors == expected_stats.errors
    assert sum(stats.dropped.values()) > 20  # the corpus has duplicates to find


def test_second_run_skips_finished_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _write(_corpus(seed=3, n_parts=2), tmp_path / "parts")
    step = ShardedKeyDedup(kind="url", partitions=4)
    first = _run(step, paths, tmp_path, 1).stats
    import llama_data.sharded as sharded

    def fail(*_: object) -> None:
        raise AssertionError("a finished task ran again")

    monkeypatch.setattr(sharded, "read_jsonl", fail)
    second = _run(step, paths, tmp_path, 1).stats
    assert second.kept == first.kept and second.dropped == first.dropped


def _boilerplate_corpus(seed: int, n_parts: int = 4, per_part: int = 30) -> list[list[Document]]:
    rng = random.Random(seed)
    menu = ["Home | About | Contact", "Accept cookies", "Subscribe now", "Share this page"]
    parts = []
    for p in range(n_parts):
        docs = []
        for j in range(per_part):
            lines = [rng.choice(menu) for _ in range(rng.randint(0, 3))]
            lines += [f"unique line {p}-{j}-{k}" for k in range(rng.randint(0, 2))]
            rng.shuffle(lines)
            docs.append(
                Document(id=f"{p}-{j}", text="\n".join(lines) + ("\n\n  \n" if j % 5 == 0 else ""))
            )
        parts.append(docs)
    return parts


@pytest.mark.parametrize(
    ("workers", "partitions", "bucket_size"), [(1, 1, 1000), (2, 3, 17), (4, 16, 7)]
)
def test_sharded_line_dedup_equals_single_process(
    tmp_path: Path, workers: int, partitions: int, bucket_size: int
) -> None:
    corpus = _boilerplate_corpus(seed=5)
    paths = _write(corpus, tmp_path / "parts")
    expected_stats = StepStats()
    expected = list(
        LineDedup(max_occurrences=3, bucket_size=bucket_size).run(_read_back(paths), expected_stats)
    )
    step = ShardedLineDedup(max_occurrences=3, bucket_size=bucket_size, partitions=partitions)
    stats = _run(step, paths, tmp_path, workers).stats
    got = [
        d
        for i in range(len(paths))
        for d in read_jsonl(tmp_path / "out" / f"part-{i:05d}.jsonl.gz", stats=StepStats())
    ]
    assert [(d.id, d.text) for d in got] == [(d.id, d.text) for d in expected]
    assert stats.kept == expected_stats.kept and stats.dropped == expected_stats.dropped
    assert sum(len(d.text) for d in got) < sum(len(d.text) for docs in corpus for d in docs)


def _near_corpus(seed: int, n_parts: int = 4, per_part: int = 25) -> list[list[Document]]:
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(300)]
    bases = [" ".join(rng.choice(vocabulary) for _ in range(60)) for _ in range(12)]
    parts = []
    for _ in range(n_parts):
        docs = []
        for _ in range(per_part):
            words = rng.choice(bases).split()
            for _ in range(rng.choice([0, 1, 2, 6, 15])):  # near copies at various distances
                words[rng.randrange(len(words))] = rng.choice(vocabulary)
            text = " ".join(words) if rng.random() < 0.95 else "!!! ???"  # a few without words
            docs.append(Document(id=f"n{rng.randint(0, 40)}", text=text))
        parts.append(docs)
    return parts


@pytest.mark.parametrize("confirm", ["exact", "estimate"])
@pytest.mark.parametrize(("workers", "partitions"), [(1, 1), (2, 3), (4, 16)])
def test_sharded_near_dedup_equals_single_process(
    tmp_path: Path, confirm: str, workers: int, partitions: int
) -> None:
    corpus = _near_corpus(seed=11)
    paths = _write(corpus, tmp_path / "parts")
    config = NearDedupConfig(confirm=confirm, shingle_hash="xxh3")  # type: ignore[arg-type]
    expected_stats = StepStats()
    expected = list(NearDedup(config).run(_read_back(paths), expected_stats))
    step = ShardedNearDedup(config=config, partitions=partitions)
    stats = _run(step, paths, tmp_path, workers).stats
    got = [
        d
        for i in range(len(paths))
        for d in read_jsonl(tmp_path / "out" / f"part-{i:05d}.jsonl.gz", stats=StepStats())
    ]
    assert [(d.id, d.text) for d in got] == [(d.id, d.text) for d in expected]
    assert stats.kept == expected_stats.kept and stats.dropped == expected_stats.dropped
    assert 10 < sum(stats.dropped.values()) < 80  # near duplicates found, distant ones kept


@pytest.mark.parametrize(("workers", "backend"), [(1, "processes"), (2, "processes"),
                                                  (4, "processes"), (2, "ray")])  # fmt: skip
def test_pipeline_global_steps_equal_the_single_process_chain(
    tmp_path: Path, workers: int, backend: str, web_corpora: Callable[..., list[list[Document]]]
) -> None:
    """A pipeline's global steps (URL, exact, near and line dedup) give the documents, order and
    statistics of the single-process steps chained over the parts, whatever the workers and
    executor."""
    inputs = _write(web_corpora(seed=2), tmp_path / "in")
    config = NearDedupConfig(shingle_hash="xxh3")
    steps = [
        UrlDedup(),
        ExactDedup(),
        NearDedup(config),
        LineDedup(max_occurrences=4, bucket_size=50),
    ]
    report = Pipeline([], global_steps=steps, partitions=5).run(
        inputs,
        tmp_path / "out",
        workers=workers,
        progress=False,
        backend=backend,  # type: ignore[arg-type]
    )
    expected: dict[str, StepStats] = {"global_read": StepStats()}
    docs = [
        d
        for i in range(len(inputs))
        for d in read_jsonl(
            tmp_path / "out" / "parts" / f"part-{i:05d}.jsonl.gz",
            stats=expected["global_read"],
        )
    ]
    for step in steps:
        expected[step.name] = StepStats()
        docs = list(step.run(docs, expected[step.name]))
    got = list(read_jsonl(tmp_path / "out" / "documents.jsonl.gz", stats=StepStats()))
    assert [(d.id, d.text) for d in got] == [(d.id, d.text) for d in docs]
    for name, stats in expected.items():
        assert report.stats[name].to_dict() == stats.to_dict(), name
    dropped = {name: sum(s.dropped.values()) for name, s in report.stats.items()}
    assert all(dropped[s.name] > 0 for s in steps[:3])
    assert not any("Accept all cookies" in d.text for d in got)  # boilerplate lines removed
    assert report.stats["line_dedup"].kept == len(got)
    assert not list((tmp_path / "out" / "global").glob("*/work"))  # scratch removed when done
