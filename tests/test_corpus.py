"""The shipped English corpus: three disjoint splits, reproducible from their union."""

import importlib.util
from pathlib import Path

import pytest

from qla_kernels.apps.sentence_embedding import SENTENCES, calibration_sentences, corpus, corpus_path

ROOT = Path(__file__).resolve().parent.parent


def _split_script():
    spec = importlib.util.spec_from_file_location("split_corpus", ROOT / "scripts" / "split_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_splits_are_disjoint_and_the_scripts_split_of_their_union():
    splits = {name: corpus(name) for name in ("calibration", "validation", "test")}
    assert {name: len(lines) for name, lines in splits.items()} == {"calibration": 1500, "validation": 600,
                                                                    "test": 900}
    union = [line for lines in splits.values() for line in lines]
    assert len(set(union)) == len(union) == 3000
    assert _split_script().split(union) == splits
    assert not set(union) & (set(SENTENCES) | set(calibration_sentences()))
    assert all(line.isascii() for line in union)


def test_an_unknown_split_is_a_value_error():
    with pytest.raises(ValueError, match="split must be one of"):
        corpus_path("train")
    with pytest.raises(ValueError, match="none for the test split"):
        _split_script().split(["one sentence."] * 3000)
