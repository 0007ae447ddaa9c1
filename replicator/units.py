"""Byte counts written by people ("64M", "1.5G"): one exact reading for the CLI's sizes and the
configuration's rates. Exact because a float rounds past 2^53 and turns a long digit string into infinity."""
from __future__ import annotations

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
