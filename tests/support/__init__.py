"""Helpers shared by the test packages: polling with a deadline, a fake inference service."""
