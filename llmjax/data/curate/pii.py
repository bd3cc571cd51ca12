"""PII masking: e-mail addresses, phone numbers, IPv4 and IPv6 addresses, counted per kind.

Patterns (Python `re`, applied in this order, each match replaced by its tag):
- email  `[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\\.[A-Za-z0-9-]+)*\\.[A-Za-z]{2,}` -> "|||EMAIL_ADDRESS|||"
- ipv6   eight groups of 1-4 hex digits separated by ":", or a "::"-compressed form, not inside a
         longer word, kept only with at least three groups and a digit (so Python slices "x[1::2]",
         "a::b" and C++ "std::vector" stay; the loopback "::1" stays too) -> "|||IP_ADDRESS|||"
- ipv4   four dot-separated numbers 0-255, not preceded by a word character, "." or "v" and not
         followed by "." + digit or a word character -> "|||IP_ADDRESS|||"
- phone  international: "+" country code (1-3 digits) then 6-14 more digits in groups separated
         by spaces, dots or dashes; North American: optional "1", area code (3 digits, in
         parentheses or not), exchange (3 digits), line (4 digits), separated by spaces, dots or
         dashes (at least one separator or parentheses) -> "|||PHONE_NUMBER|||"

Not masked (tested): version numbers ("3.12.1", "1.2.3.4.5": five parts is not an address,
"v10.0.0.1": a "v" prefix marks a version), dates ("2026-12-06", "12/06/2026"), plain long
digit runs without separators (e.g. "5551234567" stays: too many false positives in code),
numbers in which a part exceeds 255 ("999.1.1.1").
"""

from __future__ import annotations

import re

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.]){OCTET}(?:\.{OCTET}){{3}}(?!\.\d|\w)")
HEX = r"[0-9A-Fa-f]{1,4}"
IPV6 = re.compile(
    rf"(?<![\w:])(?:(?:{HEX}:){{7}}{HEX}"
    rf"|(?:{HEX}:){{1,6}}:(?:{HEX}:){{0,5}}{HEX}"
    rf"|(?:{HEX}:){{1,7}}:"
    rf"|::(?:{HEX}:){{0,6}}{HEX})(?![\w:])"
)
PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"  # international: +CC then groups
    r"|(?:1[ .-])?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}"  # North American
    r")(?![\w.-]\d|\w)"
)
TAGS = {"email": "|||EMAIL_ADDRESS|||", "ipv6": "|||IP_ADDRESS|||", "ipv4": "|||IP_ADDRESS|||",
        "phone": "|||PHONE_NUMBER|||"}
PATTERNS = {"email": EMAIL, "ipv6": IPV6, "ipv4": IPV4, "phone": PHONE}


def international_digits_ok(match: str) -> bool:
    digits = sum(c.isdigit() for c in match)
    return 8 <= digits <= 15


def ipv6_ok(match: str) -> bool:
    groups = [g for g in match.split(":") if g]
    return len(groups) >= 3 and any(c.isdigit() for c in match)


CHECKS = {"phone": lambda m: not m.startswith("+") or international_digits_ok(m), "ipv6": ipv6_ok}


def mask_pii(text: str) -> tuple[str, dict[str, int]]:
    """(text with each e-mail / IP / phone replaced by its tag, {kind: count})."""
    counts: dict[str, int] = {}
    for kind, pattern in PATTERNS.items():
        check = CHECKS.get(kind, lambda m: True)

        def replace(match, kind=kind, check=check):
            if not check(match.group(0)):
                return match.group(0)
            counts[kind] = counts.get(kind, 0) + 1
            return TAGS[kind]

        text = pattern.sub(replace, text)
    return text, counts
