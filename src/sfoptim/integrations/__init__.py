"""Framework integrations for sfoptim.

Each submodule imports its framework, so import the one you use:

* :mod:`sfoptim.integrations.lightning` -- ``ScheduleFreeCallback`` for the
  PyTorch Lightning ``Trainer`` (``pip install sfoptim[lightning]``).
* :mod:`sfoptim.integrations.transformers` -- ``ScheduleFreeCallback`` and
  ``ScheduleFreeTrainer`` for the Hugging Face ``Trainer``
  (``pip install sfoptim[transformers]``).

Accelerate needs no integration module: ``accelerator.prepare(optimizer)``
keeps ``train()``/``eval()`` working, and the helpers in :mod:`sfoptim.modes`
accept the prepared optimizer.
"""
