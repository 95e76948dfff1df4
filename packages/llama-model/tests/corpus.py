"""Texts the tokenizer, chat and Hugging Face export tests share (loaded by conftest.py fixtures).

`PLAIN_TEXTS` hold no special-token strings, so every tokenizer (ours, Meta's reference, Hugging
Face's) must agree on them; `SPECIAL_LOOKALIKES` hold special-token strings written as text, which
ours and Meta's encode as ordinary text but Hugging Face parses as special tokens.
"""

from __future__ import annotations

PLAIN_TEXTS: dict[str, str] = {
    "empty": "",
    "english": (
        "The Llama 3 herd of models natively supports multilinguality, coding, reasoning, and "
        "tool usage. Our largest model is a dense Transformer with 405B parameters."
    ),
    "contractions": "I'm sure you're right; they've said we'll go, she'd agree, it's DON'T We'RE",
    "numbers": "1234567890 3.14159 1,000,000 -42 0x1F 2024-07-23 ٣٤٥ ½",
    "python": (
        "def fib(n: int) -> int:\n"
        '    """Return the n-th Fibonacci number."""\n'
        "    a, b = 0, 1\n"
        "    for _ in range(n):\n"
        "        a, b = b, a + b\n"
        "    return a\n"
    ),
    "javascript": "const add = (a, b) => {\n\treturn a + b; // sum\n};\nconsole.log(`x=${add(1, 2)}`);",
    "chinese": "你好，世界！大型语言模型正在改变自然语言处理。",
    "japanese": "こんにちは、世界。カタカナと漢字が混ざった文章です。",
    "korean": "안녕하세요, 세계! 한국어 문장입니다.",
    "arabic": "مرحبا بالعالم، هذه جملة باللغة العربية.",
    "hindi_russian": "नमस्ते दुनिया। Привет, мир! Ёжик в тумане.",
    "emoji_zwj": "🤦🏻‍♂️ 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️‍🔥 🇫🇷 ok 👍🏽",
    "combining_and_nbsp": "e\u0301te\u0301 caf\u00e9\u00a0bar\u2003em\u200bzero-width",
    "spaces": "a  b   c    d     e      f",
    "tabs_newlines": "line1\n\nline2\t\tcol\r\nwindows\n\n\n\nend",
    "mixed_whitespace": " \t \n \r\n\t  \n   ",
    "trailing_whitespace": "trailing spaces   ",
    "leading_whitespace": "   leading spaces",
    "space_run": " " * 1000,
    "newline_run": "\n" * 300,
    "markdown_json": '# Title\n\n- item **bold** [link](https://example.com/?q=1&r=2)\n\n{"key": [1, 2.5, null]}',
    "punctuation": "!!!??? ... --- *** ((( ))) <<< >>> ||| @#$%^&",
}

SPECIAL_LOOKALIKES: dict[str, str] = {
    "eot_alone": "<|eot_id|>",
    "bos_inside": "before <|begin_of_text|> after",
    "reserved": "<|reserved_special_token_17|>",
    "malformed": "<|eot_id <|eot_id| |eot_id|> <eot_id>",
    "header": "<|start_header_id|>assistant<|end_header_id|>\n\nhi<|eom_id|>",
}

ALL_TEXTS: dict[str, str] = {**PLAIN_TEXTS, **SPECIAL_LOOKALIKES}
