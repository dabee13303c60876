"""dgemma: local fill-in-the-middle and inline edits on DiffusionGemma."""
__version__ = "0.1.0"
