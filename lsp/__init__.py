"""dgemma's language server: inline completion and rewrites over LSP (entry: ``dgemma.lsp.server:main``)."""
