import os
import sys
from pathlib import Path

# The Triton kernels run on CPU through the interpreter; it must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts live at the repo root


class StopAfter:
    """StopOnSigint stand-in: reports a Ctrl-C after `n` loop iterations (what a user's interrupt does)."""
    n = 2

    def __enter__(self):
        self.reads = 0
        return self

    def __exit__(self, *exc):
        return False

    @property
    def stop(self):
        self.reads += 1
        return self.reads > self.n
