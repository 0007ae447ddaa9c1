"""Byte counts as people write them: read exactly, or refused with one line."""
from fractions import Fraction

import pytest

from replicator.cli.common import parse_size
from replicator.errors import UsageError
from replicator.orchestration.settings import parse_bandwidth
from replicator.units import MAX_DIGITS, scaled


@pytest.mark.parametrize("number,unit,value", [
    ("0", "", 0), ("512", "", 512), ("64", "M", 64 << 20), ("1.5", "g", 3 << 29), ("2", "T", 2 << 40),
    ("0.1", "K", Fraction(512, 5)), ("9007199254740993", "", 2 ** 53 + 1), ("8", "t", 8 << 40)])
def test_scaled_is_exact(number, unit, value):
    assert scaled(number, unit) == value


@pytest.mark.parametrize("number,unit", [("", ""), ("1.", ""), (".5", ""), ("1e3", ""), ("-1", ""), ("٣", ""),
                                         ("1", "P"), ("1", "KB"), ("1" * (MAX_DIGITS + 1), "")])
def test_scaled_refuses(number, unit):
    with pytest.raises(ValueError):
        scaled(number, unit)


def test_sizes_past_the_floats_are_exact():
    """2^53 + 1 bytes: a float made it 2^53."""
    assert parse_size("9007199254740993") == 2 ** 53 + 1
    with pytest.raises(UsageError, match="not a whole number"):     # a float rounded it up to 8 PiB
        parse_size("8191.999999999999999T")
    assert parse_bandwidth("9007199254740993") == 2 ** 53 + 1


@pytest.mark.parametrize("text", ["1" * 400, "9" * 309 + "K", "٣K", "1,5G", "1.5.1M", "M", ""])
def test_unreadable_sizes_are_one_line(text):
    """A long digit string was an OverflowError (float infinity); other digits than ASCII ones are refused."""
    with pytest.raises(UsageError, match="cannot read size"):
        parse_size(text)
    with pytest.raises(ValueError, match="bytes per second"):
        parse_bandwidth(text)


def test_fractions_of_a_byte():
    with pytest.raises(UsageError, match="not a whole number of bytes"):
        parse_size("0.1K")
    assert parse_size("0.5K") == 512
    assert parse_bandwidth("0.1K") == 102           # a rate rounds down
