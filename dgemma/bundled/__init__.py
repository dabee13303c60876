"""The bundled small DiffusionGemma-architecture code model (package data)."""
