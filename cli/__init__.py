"""The `dgemma` command: edit, fill, undo, serve, status, stop, doctor, lsp, plan, quantize."""
