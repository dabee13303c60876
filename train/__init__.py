"""Training code for the small DiffusionGemma code model bundled with dgemma."""
