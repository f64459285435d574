"""The lowest layer: what every op shares (backend choice, dropout masks, autocast, input checks, tracing,
the op-registration helper). Imports nothing of fastlora but fastlora.kernels.
"""
