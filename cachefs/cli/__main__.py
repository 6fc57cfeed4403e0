"""`python -m cachefs.cli ...`: how cachefs starts its own background processes."""

from cachefs.cli import main

main()
