"""Memory daemon: probes (readings) -> policy (pure) -> actuator (control client)."""
