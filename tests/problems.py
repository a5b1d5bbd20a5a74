"""The tests' tiny problems: the package's public ones (``sfoptim.experiments.problems``)."""

from sfoptim.experiments.problems import loss_fn, make_batches, make_model, rel_diff, run_pair, two_groups

__all__ = ["make_model", "make_batches", "loss_fn", "rel_diff", "two_groups", "run_pair"]
