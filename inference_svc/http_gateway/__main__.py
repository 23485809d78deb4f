"""`python -m inference_svc.http_gateway`: same as the `autoglm-gateway` command."""

from .cli import main

main()
