"""Calibration and training recipes (PTQ, QwT, QLA, GPLQ).

They produce tensors and module state and never call a kernel directly. The recipes arrive with
their own issues; this package holds none yet.
"""
