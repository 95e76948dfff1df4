"""PII scrubbing: e-mail addresses, phone numbers and IP addresses (§3.1.1 of the Llama 3 paper).

"PII and safety filtering" removes "data from websites ... known to contain high volumes of personally
identifiable information". Page-level removal is `filters.UrlBlocklist`; `PiiScrubber` additionally
replaces the identifiers left inside kept documents with placeholders ("<EMAIL>", "<PHONE>",
"<IP_ADDRESS>") and counts the replacements in `metadata["pii"]`.

Precision over recall. Pretraining text is full of numbers that are not phone numbers (years,
versions, prices, hashes, table cells, digit runs in code); mangling them damages the data for no
privacy gain, so each pattern demands a shape real identifiers have:

- Phone numbers need separators or a leading '+': "+44 20 7946 0958", "+1-202-555-0173",
  "(202) 555-0173", "202-555-0173", "202.555.0173" (North American: area code and exchange start with
  2-9), and national numbers with a trunk '0' and one consistent separator ("030 12345678",
  "020 7946 0958", "01 23 45 67 89"). International numbers must have 8-15 digits (E.164's maximum
  is 15), national ones 9-12. Missed on purpose: bare digit runs ("2025550173"), space-only
  North American numbers ("202 555 0173", which look like table rows), and numbers glued to other
  digit groups, so "1999 2000 2001" or hex dumps are left alone.
- IPv4 needs four dot-separated octets in 0..255, not inside a longer dotted run: "999.999.999.999",
  "1.2.3.4.5" and "3.11.4" are kept; a four-part version number such as "1.2.3.4" is replaced (the
  accepted false positive).
- IPv6 candidates are validated by `ipaddress` and need at least three colons, which keeps C++ and
  Rust paths ("a::b") and times ("12:30:45") but misses two-group forms like "2001::1".

Non-public IP addresses (private, loopback, link-local, documentation and reserved ranges, e.g.
127.0.0.1, 192.168.0.1, ::1, 2001:db8::1) identify no one and are everywhere in technical text and
code, so by default they are kept (`PiiConfig.keep_non_public_ips`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import replace

from pydantic import BaseModel, ConfigDict

from llama_data.document import Document, Mapper

__all__ = ["PiiConfig", "PiiScrubber", "scrub_pii"]


class PiiConfig(BaseModel):
    """Which identifiers `PiiScrubber` replaces and with what."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    emails: bool = True
    """Replace e-mail addresses."""
    phones: bool = True
    """Replace phone numbers (international with '+', North American, trunk-'0' national)."""
    ip_addresses: bool = True
    """Replace IPv4 and IPv6 addresses."""
    keep_non_public_ips: bool = True
    """Leave addresses that are not globally routable (private, loopback, documentation, ...)."""
    email_placeholder: str = "<EMAIL>"
    """Replacement for an e-mail address."""
    phone_placeholder: str = "<PHONE>"
    """Replacement for a phone number."""
    ip_placeholder: str = "<IP_ADDRESS>"
    """Replacement for an IP address."""


EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24}(?![\w-])"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not preceded by a word character or a dot, not followed by a digit or ".digit".
IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)")
IPV6_CANDIDATE = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{0,4})(?![\w:])"
)
# No phone number starts right after a word character, '+', '.', '/', '-' or a digit group.
_PHONE_BEFORE = r"(?<![\w+./-])(?<!\d[ .-])"
_PHONE_AFTER = r"(?![\w-])(?!\.\d)(?![ .]\d)"
# The digit groups sit in an atomic group (?>...): once matched they are never re-split, so a long
# digit run after a '+' costs linear time instead of trying every way to cut it (ReDoS).
PHONE_INTERNATIONAL = re.compile(
    _PHONE_BEFORE + r"\+[1-9]\d{0,2}(?>(?:[ .-]?\(?\d{1,4}\)?){1,6})" + _PHONE_AFTER
)
PHONE_NORTH_AMERICAN = re.compile(
    _PHONE_BEFORE
    + r"(?:\([2-9]\d{2}\) ?|[2-9]\d{2}(?P<sep>[-.]))[2-9]\d{2}(?(sep)(?P=sep)|[-. ])\d{4}"
    + _PHONE_AFTER
)
PHONE_NATIONAL = re.compile(
    _PHONE_BEFORE
    + r"\(?0[1-9]\d{0,3}\)?(?P<sep>[ ./-])\d{2,8}(?:(?P=sep)\d{2,8}){0,4}"
    + _PHONE_AFTER
)


def _digits(text: str) -> int:
    return sum(c.isdigit() for c in text)


def _is_ip(candidate: str, keep_non_public: bool) -> bool:
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return address.is_global or not keep_non_public


def scrub_pii(text: str, config: PiiConfig | None = None) -> tuple[str, dict[str, int]]:
    """`text` with PII replaced by placeholders, and the count of replacements per kind."""
    config = config or PiiConfig()
    counts = {"email": 0, "phone": 0, "ip_address": 0}

    def substitute(
        pattern: re.Pattern[str], kind: str, placeholder: str, accept: Callable[[str], bool]
    ) -> None:
        nonlocal text

        def replacement(match: re.Match[str]) -> str:
            if not accept(match.group()):
                return match.group()
            counts[kind] += 1
            return placeholder

        text = pattern.sub(replacement, text)

    def ipv6(s: str) -> bool:
        return s.count(":") >= 3 and _is_ip(s, config.keep_non_public_ips)

    # E-mails first (their domains may hold digits), then IPs (dotted quads are not phones).
    if config.emails:
        substitute(EMAIL, "email", config.email_placeholder, lambda s: True)
    if config.ip_addresses:
        ip = config.ip_placeholder
        substitute(IPV4, "ip_address", ip, lambda s: _is_ip(s, config.keep_non_public_ips))
        substitute(IPV6_CANDIDATE, "ip_address", ip, ipv6)
    if config.phones:
        phone = config.phone_placeholder
        substitute(PHONE_INTERNATIONAL, "phone", phone, lambda s: 8 <= _digits(s) <= 15)
        substitute(PHONE_NORTH_AMERICAN, "phone", phone, lambda s: True)
        substitute(PHONE_NATIONAL, "phone", phone, lambda s: 9 <= _digits(s) <= 12)
    return text, counts


class PiiScrubber(Mapper):
    """Replaces e-mails, phone numbers and IP addresses; counts them in `metadata["pii"]`.

    Returns a new `Document` (the input is not modified); `metadata["pii"]` maps "email", "phone" and
    "ip_address" to the number of replacements, zeros included, so reports can sum them.
    """

    name = "pii_scrubber"

    def __init__(self, config: PiiConfig | None = None) -> None:
        self.config = config or PiiConfig()

    def map(self, doc: Document) -> Document:
        text, counts = scrub_pii(doc.text, self.config)
        return replace(doc, text=text, metadata={**doc.metadata, "pii": counts})
