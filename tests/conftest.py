"""Test-wide settings."""

import torch

# One intra-op thread: the suite also starts worker subprocesses, and OpenMP
# threads that wait for a busy core slow small operators down by an order of
# magnitude on a shared 2-core machine.
torch.set_num_threads(1)
