"""Whole jobs built on the library, behind the `qla` commands and the examples: the calibration
workflow (`qla quantize` / `qla eval`), the end-to-end benchmark (`qla bench`,
benchmarks/bench_e2e.py) and the sentence-embedding helpers of the MiniLM demo. The top layer:
nothing below imports it."""
