"""The image tests (`pytest -m images tests/images`, run by scripts/test-images.sh after it built the
images): kmock from the integration tests, the images' names from the environment."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from kmockenv import api  # noqa: E402,F401  (pytest fixture)
