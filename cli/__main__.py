from dgemma.cli.main import main

main()
