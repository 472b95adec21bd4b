"""Helpers for the rank scripts under tests/dist (run by torchrun, never by pytest)."""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def write_result(obj) -> None:
    """Write this rank's result for the pytest side (conftest.torchrun) to read."""
    rank = int(os.environ.get("RANK", "0"))
    out = Path(os.environ["EMBER_TEST_OUT"]) / f"rank{rank}.json"
    out.write_text(json.dumps(obj))
