"""The control API: memory account and memory actions for a trusted peer."""
