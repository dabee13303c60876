"""dgemma: local fill-in-the-middle and inline edits on DiffusionGemma."""
import os

__version__ = "0.1.0"

# OpenMP threads that spin while waiting make a CPU model 10-40x slower as soon as anything
# else wants the cores (an editor, a build; measured: a 1.3 s fill took 49 s next to one busy
# process). Sleeping waiters cost microseconds. It must be set before torch loads OpenMP, and
# every dgemma entry point imports this package first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
