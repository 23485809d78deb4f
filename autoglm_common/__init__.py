"""Small helpers the service and the gateway share: bounded text for logs and
messages, request-id syntax, structured logging setup. Depends on nothing of the project."""
