"""Byte counts written by people ("64M", "1.5G"): one exact reading for the CLI's sizes and the
configuration's rates. Exact because a float rounds past 2^53 and turns a long digit string into infinity."""
from __future__ import annotations

import re
from fractions import Fraction

POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}     # K, M, G, T: powers of 1024
MAX_DIGITS = 40         # more than any byte count needs; a longer string is a mistake, not a size


def scaled(number: str, unit: str) -> Fraction:
    """`number` (decimal digits, an optional fraction) times 1024 to the power of `unit` (K, M, G, T or
    nothing), exactly. ValueError for anything else."""
    power = POWERS.get(unit.lower())
    whole, dot, frac = number.partition(".")
    if (power is None or not whole.isdigit() or not whole.isascii() or (dot and not (frac.isdigit() and frac.isascii()))
            or len(whole) + len(frac) > MAX_DIGITS):
        raise ValueError(f"not a byte count: {number!r} {unit!r}")
    return Fraction(number) * 1024 ** power


def size(text: str) -> int:
    """'512', '64M', '1.5G', '2T' (binary units, an optional trailing 'iB' or 'B') as bytes; ValueError
    for anything else, a part of a byte included."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", text)
    if m is None:
        raise ValueError(f"not a size: {text!r}")
    value = scaled(m.group(1), m.group(2))
    if value.denominator != 1:
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(value)
