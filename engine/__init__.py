"""The engine: a request becomes seeded diffusion canvases, and denoised canvases become text.

No sockets and no files: the daemon and the command line call it (docs/engine.md).
"""
