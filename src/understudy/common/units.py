"""Sizes people write on command lines: '8GiB', '512MiB', '1.5G' or a byte count."""

from __future__ import annotations

import argparse
import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'8GiB', '512MiB', '1.5G' or a plain byte count."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 8GiB, 512MiB or a byte count)")
    unit = (m.group(2) or "b").lower()[0]
    return int(float(m.group(1)) * {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit])


def positive_int(text: str) -> int:
    """A count of at least 1 (an argparse type)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return n


_COUNT = re.compile(r"^(\d+(?:\.\d+)?)([kmgtKMGT]?)$")


def parse_token_count(text: str) -> int:
    """A count as vLLM writes it (--max-model-len 32k): a lowercase suffix is decimal (32k = 32000, 1.5m =
    1500000), an uppercase one binary and whole (32K = 32768, 1M = 1048576), or a plain number."""
    m = _COUNT.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (try 4096, 32k = 32000 or 32K = 32768)")
    number, suffix = m.groups()
    if suffix.islower():
        return int(float(number) * 1000 ** ("kmgt".index(suffix) + 1))
    if "." in number:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (a binary suffix takes a whole number; "
                                         f"did you mean {number}{suffix.lower()}?)")
    return int(number) * (1 << 10 * ("KMGT".index(suffix) + 1)) if suffix else int(number)
