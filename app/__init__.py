"""rnnserve: train and serve character-level recurrent language models."""

import os

__version__ = "0.1.0"

# torch's OpenMP threads spin a short while for their next parallel region, long enough to bridge the gaps
# between a step's kernels, then sleep (libgomp's own default spins a thousand times longer): a spinning
# thread holds its core while the thread it waits for may be off a core, so on a busy machine each region
# of a prompt's pass waited a scheduler slice. libgomp reads it once, when torch loads, hence here; set it
# (or OMP_WAIT_POLICY) to override.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
