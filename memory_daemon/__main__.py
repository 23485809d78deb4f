"""`python -m memory_daemon` runs the daemon's CLI."""

from memory_daemon.cli import main

main()
