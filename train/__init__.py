"""Training code for the small DiffusionGemma code model bundled with dgemma."""
# First, before anything imports transformers: run as `python -m train.…` from the checkout, the
# checkout root is sys.path[0] and its `kernels/` would shadow the installed package.
import dgemma  # noqa: F401
