"""The inference layer: the generator, the one-byte decode step, the batched step, sampling, and the optional
C library (native.py compiles csrc/ on first use).

Imports only the core modules.
"""
