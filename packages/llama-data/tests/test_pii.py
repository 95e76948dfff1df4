"""PII scrubbing (§3.1.1): e-mails, phone numbers and IP addresses become placeholders, counted;
numbers that only look like them (years, versions, dates, digit runs in code) are left alone."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llama_data.document import Document, StepStats
from llama_data.pii import PiiConfig, PiiScrubber, scrub_pii


@pytest.mark.parametrize(
    "email",
    [
        "john.doe@example.com",
        "first+tag@mail.example.co.uk",
        "A_B-c%d@sub-domain.example.org",
    ],
)
def test_emails_are_replaced(email: str) -> None:
    """Common e-mail shapes become <EMAIL>, punctuation around them kept."""
    text, counts = scrub_pii(f"Write to {email}, or ({email}).")
    assert text == "Write to <EMAIL>, or (<EMAIL>)."
    assert counts == {"email": 2, "phone": 0, "ip_address": 0}


@pytest.mark.parametrize(
    "phone",
    [
        "+44 20 7946 0958",  # UK, international
        "+1-202-555-0173",  # North American, international
        "+49 (0)30 1234567",  # German, international with trunk zero
        "+33 1 23 45 67 89",  # French, international
        "+81 3-1234-5678",  # Japanese, international
        "(202) 555-0173",
        "202-555-0173",
        "202.555.0173",
        "030 12345678",  # German national
        "030/1234567",
        "020 7946 0958",  # UK national
        "01 23 45 67 89",  # French national
        "0171-1234567",
    ],
)
def test_phone_numbers_are_replaced(phone: str) -> None:
    """International and common national phone formats become <PHONE>, whole."""
    text, counts = scrub_pii(f"Call {phone} today.")
    assert text == "Call <PHONE> today."
    assert counts["phone"] == 1


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "203.0.114.7", "2606:4700:4700::1111", "2a00:1450:4001:82b::200e"],
)
def test_public_ip_addresses_are_replaced(address: str) -> None:
    """Public IPv4 and IPv6 addresses become <IP_ADDRESS>, also in URLs and brackets."""
    text, counts = scrub_pii(f"Server {address} (see http://[{address}]/ or {address}:8080).")
    assert "<IP_ADDRESS>" in text and address not in text
    assert counts["ip_address"] == 3


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "192.168.0.1", "10.0.0.254", "0.0.0.0", "fe80::1:2:3", "2001:db8::1:2"]
)
def test_non_public_ips_are_kept_by_default_and_replaced_on_request(address: str) -> None:
    """Loopback, private and documentation addresses identify no one: kept unless configured."""
    text = f"Bind to {address} first."
    assert scrub_pii(text) == (text, {"email": 0, "phone": 0, "ip_address": 0})
    scrubbed, counts = scrub_pii(text, PiiConfig(keep_non_public_ips=False))
    assert scrubbed == "Bind to <IP_ADDRESS> first."
    assert counts["ip_address"] == 1


@pytest.mark.parametrize(
    "text",
    [
        "Python 3.11.4 and numpy 1.26.0 were released in 2023.",
        "The years 1999 2000 2001 2002 2003 were listed.",
        "Dates: 2023-01-15, 15/01/2023, 01.02.2023 10:30, 12:30:45.",
        "Not an IP: 999.999.999.999 or 256.1.1.1 or 1.2.3.4.5.",
        "x = 12345678901234; y = 0x1234 5678; z = 3.14159265358979",
        "ISBN 978-3-16-148410-0 costs $1,234.56; order 100-200-3000.",
        "Hex dump: 01 02 03 04 05 06 07 08 09 10 11 12",
        "In C++ write std::vector<int> and a::b; MAC 00:1a:2b:3c:4d:5e.",
        "pip install foo@1.2; use @property; tel 2025550173.",
        "See https://example.com/2023/01/15/post-1234567890 and 1e-10.",
        "Score +123 and a total of 4096 65536 131072.",
    ],
)
def test_numbers_that_are_not_pii_are_untouched(text: str) -> None:
    """Versions, years, dates, times, code, ISBNs, MACs and digit runs survive unchanged."""
    assert scrub_pii(text) == (text, {"email": 0, "phone": 0, "ip_address": 0})


def test_four_part_version_is_the_documented_false_positive() -> None:
    """A public-looking dotted quad is replaced even when it is a version (precision trade-off)."""
    assert scrub_pii("release 9.1.2.3")[0] == "release <IP_ADDRESS>"


def test_scrubber_counts_in_metadata_and_leaves_input_alone() -> None:
    """The Mapper returns a new document with counts in metadata["pii"] and keeps everything."""
    doc = Document(
        id="1",
        text="Mail a@b.example or c@d.example, call +1 202 555 0173 from 8.8.4.4.",
        metadata={"lang": "en"},
    )
    stats = StepStats()
    (out,) = PiiScrubber().run([doc], stats)
    assert out.text == "Mail <EMAIL> or <EMAIL>, call <PHONE> from <IP_ADDRESS>."
    assert out.metadata == {"lang": "en", "pii": {"email": 2, "phone": 1, "ip_address": 1}}
    assert doc.text.startswith("Mail a@b") and "pii" not in doc.metadata
    assert stats.kept == 1 and not stats.dropped


def test_kinds_and_placeholders_are_configurable() -> None:
    """Each kind can be switched off and each placeholder changed."""
    config = PiiConfig(phones=False, email_placeholder="[email]")
    text, counts = scrub_pii("x@y.example 202-555-0173", config)
    assert text == "[email] 202-555-0173"
    assert counts == {"email": 1, "phone": 0, "ip_address": 0}
    with pytest.raises(ValidationError):
        PiiConfig(email=False)  # type: ignore[call-arg]  # misspelt field is refused
