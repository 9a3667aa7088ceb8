"""Weight interpolation on whole models: WiSE-FT (weights, sweep, curve), DaWin, learned coefficients, WEMoE.

Nothing is imported here; the public names are exported lazily by ``robustft`` itself.
"""
