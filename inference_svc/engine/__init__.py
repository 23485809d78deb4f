"""The engine: admission, scheduling and the model-execution loop."""
