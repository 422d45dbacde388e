"""The codec layer: per-byte scores of any input (score.py), lossless compression with a model (compress.py)
and its file format (container.py).

Imports core and infer.
"""
