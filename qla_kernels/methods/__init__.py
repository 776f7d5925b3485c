"""Calibration and training recipes: PTQ (static activation scales, scale folding, GPTQ), QwT,
QLA, GPLQ, AQ-DETR, and the `paper` preset for accuracy studies.

They produce tensors and module state and never call a kernel directly.
"""

from . import aqdetr, folding, gplq, gptq, paper, ptq, qla, qwt, rotation

__all__ = ["aqdetr", "folding", "gplq", "gptq", "paper", "ptq", "qla", "qwt", "rotation"]
