import os
import sys
from pathlib import Path

# The Triton kernels run on CPU through the interpreter; it must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts live at the repo root
