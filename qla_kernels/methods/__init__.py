"""Calibration and training recipes: PTQ (static activation scales, scale folding, GPTQ), QwT,
QLA, GPLQ, and the `paper` preset for accuracy studies.

They produce tensors and module state and never call a kernel directly.
"""

from . import folding, gplq, gptq, paper, ptq, qla, qwt

__all__ = ["folding", "gplq", "gptq", "paper", "ptq", "qla", "qwt"]
