"""Test configuration: one thread, so timings and results are stable on 2 cores."""

import torch

torch.set_num_threads(1)
