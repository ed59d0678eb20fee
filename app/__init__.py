"""rnnserve: train and serve character-level recurrent language models."""

import os

__version__ = "0.1.0"

# torch's OpenMP threads wait for their next parallel region by sleeping, not spinning (libgomp reads this
# once, when torch loads, hence here): a spinning thread holds its core while the thread it waits for may
# be off a core, so on a busy machine each region of a prompt's pass waited a scheduler slice. Set it to
# override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
