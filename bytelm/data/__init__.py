"""The data layer: byte sources -> documents -> train/validation split -> cached arrays -> batches.

Imports only the core modules (bytelm/*.py). `load_corpus` (corpus.py) is the entry; batches.py feeds training.
"""
