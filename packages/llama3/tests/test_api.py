"""The umbrella's public surface is pinned: no re-exports, the demo module's names, the
`llama-demo` console script, and a dependency on every member of the workspace."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from importlib.resources import files
from pathlib import Path

import pytest

import llama3
import llama3.demo
import llama3.report

EXPECTED: list[str] = []  # the libraries are imported by their own names, never through llama3
EXPECTED_DEMO = ["STAGES", "docstring_corpus", "main"]
EXPECTED_REPORT = ["read_metrics", "write_report"]
MEMBERS = {
    "llama-kernels", "llama-model", "llama-data", "llama-train", "llama-serve", "llama-align",
}  # fmt: skip
PACKAGES_DIR = Path(__file__).resolve().parents[2]  # packages/ in a checkout of the workspace


def _requirement_names(distribution: str) -> set[str]:
    """The project names in `distribution`'s installed Requires-Dist (extras' markers included)."""
    requirements = importlib.metadata.requires(distribution) or []
    return {re.split(r"[\s;=<>!~\[@(]", r, maxsplit=1)[0].lower() for r in requirements}


def test_public_api_is_pinned() -> None:
    """llama3 exports nothing; llama3.demo the entry point, its stages and the corpus reader;
    llama3.report the report writer."""
    assert sorted(llama3.__all__) == sorted(EXPECTED)
    assert sorted(llama3.demo.__all__) == sorted(EXPECTED_DEMO)
    assert sorted(llama3.report.__all__) == sorted(EXPECTED_REPORT)
    for name in EXPECTED_DEMO:
        assert getattr(llama3.demo, name) is not None
    assert [stage.name for stage in llama3.demo.STAGES] == [
        "curate", "shards", "pretrain", "sft", "rm", "sample", "dpo", "fp8", "serve",
    ]  # fmt: skip


def test_package_ships_type_information() -> None:
    """The installed package carries py.typed, so type checkers use its annotations."""
    assert files("llama3").joinpath("py.typed").is_file()


def test_llama_demo_console_script_points_at_the_demo() -> None:
    """The installed `llama-demo` command runs llama3.demo:main (and llama-train no longer
    provides one)."""
    scripts = importlib.metadata.entry_points(group="console_scripts", name="llama-demo")
    assert [(s.dist.name if s.dist else None, s.value) for s in scripts] == [
        ("llama3", "llama3.demo:main")
    ]
    (script,) = scripts
    assert script.load() is llama3.demo.main


def test_umbrella_depends_on_every_member() -> None:
    """Installing llama3 installs each library of the workspace: the declared dependencies hold
    every member, and, in a checkout, every other directory under packages/ is among them."""
    declared = _requirement_names("llama3")
    assert declared >= MEMBERS, f"missing: {sorted(MEMBERS - declared)}"
    if not (PACKAGES_DIR / "llama3" / "pyproject.toml").is_file():
        pytest.skip("not run from a checkout of the workspace")
    members = {
        tomllib.loads((p / "pyproject.toml").read_text())["project"]["name"]
        for p in PACKAGES_DIR.iterdir()
        if (p / "pyproject.toml").is_file()
    } - {"llama3"}
    assert members == MEMBERS, f"update MEMBERS and llama3's dependencies: {sorted(members)}"
