"""Diagnostics of a trained model: RiFT's module criticality, the layer-wise sharpness along the WiSE-FT path.

Nothing is imported here; the public names are exported lazily by ``robustft`` itself.
"""
