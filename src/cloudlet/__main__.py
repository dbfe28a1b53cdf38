"""`python -m cloudlet` runs the CLI."""

from cloudlet.cli.main import main

main()
