"""README.md stays in sync with train_gpt.py: the knob table (log labels: tests/test_boundaries.py)."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
import readme_knobs  # noqa: E402

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_knob_table_is_current():
    assert readme_knobs.readme_table(README) == readme_knobs.knob_table(), (
        "README.md knob table is stale; run: python3 tools/readme_knobs.py --write")
