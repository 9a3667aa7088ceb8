"""Diagnostics and choices over trained models: RiFT's module criticality, the layer-wise sharpness along the
WiSE-FT path, strength sweeps (one training run per strength of a callback, chosen on in-distribution data).

Nothing is imported here; the public names are exported lazily by ``robustft`` itself.
"""
