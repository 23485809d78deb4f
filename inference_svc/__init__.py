"""autoglm-serve inference service: transport -> engine -> model."""
