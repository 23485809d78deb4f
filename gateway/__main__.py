"""`python -m gateway`: same as the `autoglm-gateway` command."""

from .cli import main

main()
