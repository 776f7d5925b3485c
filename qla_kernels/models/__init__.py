"""Per-architecture facts (norm/attention/MLP locations, token layout) for timm and HF models.

Used by the fused block modules and the calibration methods; none are described yet.
"""
