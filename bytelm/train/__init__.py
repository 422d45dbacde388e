"""The training layer: the loop (loop.py, read top to bottom), its config and presets, schedule, optimizer,
resume, run files, metrics, evaluation, distributed setup and the run report.

Imports core, data, and infer (the evaluation's sample text goes through the one generator).
"""
