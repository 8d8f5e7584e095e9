"""Make `import lorakit` work from a plain checkout (src layout, not pip-installed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("lorakit") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
