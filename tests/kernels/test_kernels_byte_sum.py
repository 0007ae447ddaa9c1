"""byte_sum: native and pure agree with Python's sum on every length and alignment."""
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator import kernels


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=5000), start=st.integers(0, 63))
def test_byte_sum_matches_python(data, start):
    view = memoryview(data)[min(start, len(data)):]
    expected = sum(view)
    assert kernels.pure.byte_sum(view) == expected
    if kernels.native is not None:
        assert kernels.native.byte_sum(view) == expected


def test_byte_sum_large_all_ones():
    big = b"\xff" * (3 << 20) + b"\x01"
    assert kernels.byte_sum(big) == 255 * (3 << 20) + 1
