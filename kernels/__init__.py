"""Triton kernels for the training hot path, each beside its PyTorch reference.

None are implemented yet: the model in `training/model.py` runs on plain PyTorch ops, which are
the references the kernels will be tested against (forward and backward, on the CPU under
TRITON_INTERPRET=1). This package never imports Dagster.
"""
