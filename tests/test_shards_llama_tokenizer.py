"""llama_data's token shards written with llama_model's real Llama 3 tokenizer (data -> train)."""

from __future__ import annotations

from pathlib import Path

from llama_data import Document, TokenShards, write_token_shards
from llama_model import Tokenizer


def test_shards_hold_exactly_what_the_llama3_tokenizer_encodes(tmp_path: Path) -> None:
    """Each stored document is BOS + the tokenizer's ids + EOS, the manifest names the tokenizer
    by its file's sha256, and packed windows carry per-token document ids."""
    tokenizer = Tokenizer.llama3()
    texts = ["The Llama 3 herd of models.", "def f(x):\n    return x  # code", "多语言 🦙"]
    docs = [Document(id=str(i), text=t, source="web") for i, t in enumerate(texts)]
    manifest = write_token_shards(docs, tokenizer, tmp_path / "shards")
    shards = TokenShards(tmp_path / "shards")
    for i, text in enumerate(texts):
        assert shards.document(i).tolist() == tokenizer.encode(text, bos=True, eos=True)
        assert tokenizer.decode(shards.document(i).tolist()[1:-1]) == text
    assert manifest.tokenizer.sha256 == tokenizer.sha256
    assert manifest.tokenizer.vocab_size == 128_256
    tokens, document_ids = next(iter(shards.sample_sequences(8, seed=0)))
    assert tokens.shape == document_ids.shape == (8,)
