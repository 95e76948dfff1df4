"""A pipeline killed with SIGKILL, sent to its whole process group at seeded random moments in
every stage (per-file parts and each stage of each sharded global step), restarts, skips finished
work and ends with the documents and statistics of an uninterrupted run: nothing lost, nothing
duplicated. The run is the `llama-data` command in a subprocess, as a user runs it."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from llama_data import Document, write_jsonl

# Stages in the order a run reaches them, each named by the first file it commits (a task marker);
# the kill lands a random moment after that file appears, so inside the stage, with more to do.
_GLOBAL_STAGES = {
    "00-url_dedup": ["map", "reduce"],
    "01-exact_dedup": ["map", "reduce"],
    "02-near_dedup": ["sig", "bucket", "shingle", "confirm", "components"],
    "03-line_dedup": ["count", "lmap", "lreduce"],
}
STAGES = [
    "parts/part-*.stats.json",
    *(
        pattern
        for step, stages in _GLOBAL_STAGES.items()
        for pattern in [
            *(f"global/{step}/work/{stage}*.done.json" for stage in stages),
            f"global/{step}/parts/part-*.done.json",  # the filter stage
        ]
    ),
    "global/03-line_dedup/step.done.json",  # then the final concatenation
]

PIPELINE = """
inputs = ["in/*.jsonl.gz"]
out_dir = "out"
workers = 2
partitions = 8

[[steps]]
type = "gopher_repetition"

[[global_steps]]
type = "url_dedup"

[[global_steps]]
type = "exact_dedup"

[[global_steps]]
type = "near_dedup"
shingle_hash = "xxh3"

[[global_steps]]
type = "line_dedup"
max_occurrences = 4
bucket_size = 200
"""


def _setup(root: Path, corpus: list[list[Document]]) -> Path:
    (root / "in").mkdir(parents=True)
    for i, docs in enumerate(corpus):
        write_jsonl(docs, root / "in" / f"file-{i:03d}.jsonl.gz")
    (root / "pipeline.toml").write_text(PIPELINE)
    return root / "pipeline.toml"


def _start(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "llama_data.cli", "run", str(config), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the kill reaches every worker
    )


def _finish(config: Path) -> None:
    process = _start(config)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()


def _result(root: Path) -> tuple[bytes, dict[str, object]]:
    documents = gzip.decompress((root / "out" / "documents.jsonl.gz").read_bytes())
    stats = json.loads((root / "out" / "stats.json").read_text())
    return documents, stats["steps"]


def _kill_in(config: Path, pattern: str, rng: random.Random) -> bool:
    """Run until a file matching `pattern` appears, wait a random moment, SIGKILL the process
    group. False when the run ended (or passed the stage) before the file appeared."""
    process = _start(config)
    out = config.parent / "out"
    deadline = time.monotonic() + 120
    while not any(out.glob(pattern)):
        if process.poll() is not None or time.monotonic() > deadline:
            process.communicate()
            return False
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.05))
    alive = process.poll() is None
    with contextlib.suppress(ProcessLookupError):  # the group may have exited just now
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    return alive and process.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_in_every_stage_then_resume_gives_the_uninterrupted_result(
    tmp_path: Path, web_corpora: Callable[..., list[list[Document]]]
) -> None:
    corpus = web_corpora(seed=4, n_files=16, per_file=150)
    reference = _setup(tmp_path / "reference", corpus)
    started = time.monotonic()
    _finish(reference)
    duration = time.monotonic() - started
    expected = _result(reference.parent)
    assert expected[0].count(b"\n") > 1000
    print(f"uninterrupted run: {duration:.1f} s")

    for trial in range(2):
        rng = random.Random(trial)
        config = _setup(tmp_path / f"trial-{trial}", corpus)
        killed = [pattern for pattern in STAGES if _kill_in(config, pattern, rng)]
        # The kills land in most stages (a stage whose tasks all finish within the random delay
        # is passed by a kill in the next one).
        print(f"trial {trial}: killed in {len(killed)} of {len(STAGES)} stages")
        assert len(killed) >= len(STAGES) // 2, killed
        _finish(config)
        assert _result(config.parent) == expected, f"trial {trial}, killed in {killed}"

    # And at uniformly random moments of a whole run, several times in a row.
    rng = random.Random(7)
    config = _setup(tmp_path / "random-times", corpus)
    for _ in range(4):
        process = _start(config)
        time.sleep(rng.uniform(0.0, duration))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
    _finish(config)
    assert _result(config.parent) == expected
