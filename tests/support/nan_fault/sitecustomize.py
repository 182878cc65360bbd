"""A fault inside a torchrun worker, where a test cannot monkeypatch: Python imports this module at
start-up in every process that has this folder on PYTHONPATH. With FOUNDRY_TEST_NAN_AT=RANK:CALL,
the process of that torchrun RANK makes its CALL-th torch.nn.functional.cross_entropy return NaN."""

import os

_spec = os.environ.get("FOUNDRY_TEST_NAN_AT", "")
if _spec and os.environ.get("RANK") == _spec.split(":")[0]:
    import torch.nn.functional as _F

    _original, _calls, _at = _F.cross_entropy, [0], int(_spec.split(":")[1])

    def _poisoned(*args, **kwargs):
        _calls[0] += 1
        loss = _original(*args, **kwargs)
        return loss * float("nan") if _calls[0] == _at else loss

    _F.cross_entropy = _poisoned
