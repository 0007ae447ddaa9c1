"""Build hook: the native kernels are compiled by cffi in API mode (see native/build_kernels.py)."""
from setuptools import setup

setup(cffi_modules=["native/build_kernels.py:ffibuilder"])
