"""MILES inside the loops people already have.

* :mod:`miles.integrations.lightning`: ``MILESCallback`` for PyTorch Lightning
  (``miles-lr[lightning]``).
* :mod:`miles.integrations.hf`: ``MILESCallback`` and a ``compute_metrics`` helper for the Hugging
  Face ``Trainer`` (``miles-lr[hf]``).
* :mod:`miles.integrations.distributed`: how MILES makes every rank of a ``torch.distributed`` job
  take the same decision (torch only).

Nothing here is imported by ``import miles``: each module needs its framework only when imported.
"""
