from __future__ import annotations

import sys
from pathlib import Path

# The shared pack helpers live beside the tests; make them importable as `kernel_packs`.
sys.path.insert(0, str(Path(__file__).resolve().parent))
