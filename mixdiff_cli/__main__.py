from mixdiff_cli.cli import main

main()
