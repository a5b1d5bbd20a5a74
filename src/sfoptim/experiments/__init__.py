"""Experiment code shared by ``sfoptim demo``, the benchmarks and the tests.

Each module is one task, usable on its own:

* :mod:`sfoptim.experiments.methods`: the method tables' entries: an optimizer
  recipe, the configurations it is tuned over, and whether its runs know
  their stopping time.
* :mod:`sfoptim.experiments.mnist1d_mlp`: the demo's task (MNIST-1D generated
  offline, a 3-layer MLP), its method table and training loop, and the
  comparison against schedules tuned per stopping time that ``sfoptim demo``
  reports.
* :mod:`sfoptim.experiments.compare`: the comparison loop those classification
  tasks share: every method trained, evaluated at T/8, T/4, T/2 and T, and
  tuned by held-out accuracy.
* :mod:`sfoptim.experiments.digits_convnet`: scikit-learn's 8x8 digits with a
  ConvNet with BatchNorm (``benchmarks/convnet_digits.py``).
* :mod:`sfoptim.experiments.char_lm`: a byte-level transformer trained on the
  running interpreter's standard-library source (``benchmarks/lm_stdlib.py``).
* :mod:`sfoptim.experiments.problems`: tiny deterministic regression problems
  and the twin-model runner that compares two optimizers step by step
  (``benchmarks/parity_report.py`` and the parity tests).

Importing this package imports nothing beyond torch; the MNIST-1D task needs
the ``demo`` extra (``mnist1d``, ``numpy``) only when its data is generated.
"""
