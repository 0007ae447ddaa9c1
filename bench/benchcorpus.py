"""The shared benchmark corpus (`../shared/bench-data/make-corpus`): made where a benchmark expects it when it
is missing, so that each benchmark runs on a fresh machine with its defaults."""
from __future__ import annotations

import os
import subprocess
import sys

MAKE_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "bench-data",
                           "make-corpus")     # also --mutate FILE PCT SEED
DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "var", "bench", "corpus.raw")


def ensure(raw: str = DEFAULT, size: str = "3G") -> str:
    """`raw` (a make-corpus corpus.raw, its corpus.vhdx beside it), made first if either is missing."""
    folder, name = os.path.split(os.path.abspath(raw))
    if os.path.exists(raw) and os.path.exists(os.path.join(folder, "corpus.vhdx")):
        return raw
    if name != "corpus.raw":
        sys.exit(f"{raw}: no such corpus (make-corpus makes DIR/corpus.raw and DIR/corpus.vhdx)")
    print(f"making the corpus in {folder} ({size}; a few minutes)", file=sys.stderr, flush=True)
    p = subprocess.run([MAKE_CORPUS, folder, size], capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"make-corpus {folder} {size} failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    return raw
