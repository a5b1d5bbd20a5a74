"""sfoptim: schedule-free optimizers for PyTorch."""

__version__ = "0.1.0"
