"""Splits the shipped English corpus into its calibration / validation / test files.

    python scripts/split_corpus.py SENTENCES.txt [--out qla_kernels/data/corpus]

The sentences (one per line) are sorted, shuffled with seed 0 and cut into 1500 calibration,
600 validation and the rest test (900 for the 3000 shipped). `tests/test_corpus.py` checks that
the shipped files are this split of their own union, so the split can be reproduced and no
sentence moves between splits unnoticed.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Dict, List, Sequence

SPLIT_SIZES = {"calibration": 1500, "validation": 600}  # the test split takes the rest


def split(sentences: Sequence[str]) -> Dict[str, List[str]]:
    """{"calibration", "validation", "test"} → sentences, from `sentences` in any order."""
    unique = sorted(set(s.strip() for s in sentences if s.strip()))
    if len(unique) <= sum(SPLIT_SIZES.values()):
        raise ValueError(f"{len(unique)} distinct sentences leave none for the test split")
    random.Random(0).shuffle(unique)
    calibration_end = SPLIT_SIZES["calibration"]
    validation_end = calibration_end + SPLIT_SIZES["validation"]
    return {"calibration": unique[:calibration_end], "validation": unique[calibration_end:validation_end],
            "test": unique[validation_end:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sentences")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "qla_kernels" / "data" / "corpus"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, lines in split(Path(args.sentences).read_text().splitlines()).items():
        (out / f"{name}.txt").write_text("\n".join(lines) + "\n")
        print(f"{out / name}.txt: {len(lines)} sentences")


if __name__ == "__main__":
    main()
