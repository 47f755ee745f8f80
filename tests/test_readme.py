"""README.md stays in sync with train_gpt.py: the knob table and the fixed log labels."""
import dataclasses
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
import readme_knobs  # noqa: E402
import train_gpt  # noqa: E402

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_knob_table_is_current():
    assert readme_knobs.readme_table(README) == readme_knobs.knob_table(), (
        "README.md knob table is stale; run: python3 tools/readme_knobs.py --write")


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(train_gpt.Hyperparameters)])
def test_every_field_has_a_row(name):
    assert f"| `{name.upper()}` |" in readme_knobs.readme_table(README)


@pytest.mark.parametrize("label", ["model_params:", "val_tokens:", "val_bytes:", "final_pre_quant"])
def test_log_labels_documented(label):
    assert label in README
