"""Every Python block in the project's READMEs runs as written (what users copy must work)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", *sorted(ROOT.glob("packages/*/README.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def python_blocks() -> list[tuple[str, str]]:
    return [
        (f"{path.relative_to(ROOT)}#{i}", block)
        for path in READMES
        for i, block in enumerate(BLOCK.findall(path.read_text(encoding="utf-8")))
    ]


@pytest.mark.parametrize(("where", "code"), python_blocks(), ids=[w for w, _ in python_blocks()])
def test_readme_block_runs(
    where: str, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block executes without error, in a scratch working directory."""
    monkeypatch.chdir(tmp_path)
    exec(compile(code, where, "exec"), {"__name__": "__readme__"})


TOML_BLOCK = re.compile(r"```toml\n(.*?)```", re.DOTALL)


def test_llama_train_readme_config_is_valid() -> None:
    """The training config shown in llama-train's README validates as a TrainConfig, including
    the parallel layout (checked against its model) and the pipeline split."""
    import tomllib

    from llama_train import TrainConfig
    from llama_train.parallel import check_tensor_parallel_config
    from llama_train.parallel.pipeline import check_layers_per_stage

    text = (ROOT / "packages" / "llama-train" / "README.md").read_text(encoding="utf-8")
    blocks = TOML_BLOCK.findall(text)
    assert blocks, "llama-train's README has no TOML config"
    config = TrainConfig.model_validate(tomllib.loads(blocks[0]))
    model, parallel = config.model.llama_config(), config.parallel
    check_tensor_parallel_config(model, parallel.tp)
    check_layers_per_stage(
        parallel.pp_layers_per_stage, model.n_layers, parallel.pp * parallel.pp_stages_per_rank
    )


def test_llama_align_readme_round_config_is_valid() -> None:
    """The round config shown in llama-align's README validates as a RoundConfig."""
    import tomllib

    from llama_align import RoundConfig

    text = (ROOT / "packages" / "llama-align" / "README.md").read_text(encoding="utf-8")
    blocks = TOML_BLOCK.findall(text)
    assert blocks, "llama-align's README has no TOML config"
    config = RoundConfig.model_validate(tomllib.loads(blocks[0]))
    assert config.dpo.beta == 0.1 and config.dpo.nll_weight == 0.2
