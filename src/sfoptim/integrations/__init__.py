"""Framework integrations for sfoptim.

Each submodule imports its framework, so import the one you use:

* :mod:`sfoptim.integrations.lightning` -- ``ScheduleFreeCallback`` for the
  PyTorch Lightning ``Trainer`` (``pip install "lightning>=2.6"``).
* :mod:`sfoptim.integrations.transformers` -- ``ScheduleFreeCallback`` and
  ``ScheduleFreeTrainer`` for the Hugging Face ``Trainer``
  (``pip install "transformers>=5.0" "accelerate>=1.0"``).

Accelerate needs no integration module: ``accelerator.prepare(optimizer)``
keeps ``train()``/``eval()`` working, and the helpers in :mod:`sfoptim.modes`
accept the prepared optimizer.
"""
