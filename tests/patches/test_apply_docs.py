"""The complete examples of docs/usage.md (its ```python blocks) run as written."""
import pathlib
import re

import pytest

USAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "usage.md"
EXAMPLES = re.findall(r"^```python\n(.*?)^```", USAGE.read_text(), flags=re.S | re.M)


def test_usage_has_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_usage_example_runs(index):
    exec(compile(EXAMPLES[index], f"{USAGE}:example{index}", "exec"), {"__name__": "usage_example"})
