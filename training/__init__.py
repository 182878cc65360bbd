"""Foundry training: a small Llama-style model, its data stream, optimizer and training entry point.

Run a training job with ``python -m training.train --config RUN.json``.
"""
