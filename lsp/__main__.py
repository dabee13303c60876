"""``python -m dgemma.lsp``: the language server on stdio."""
from dgemma.lsp.server import main

main()
