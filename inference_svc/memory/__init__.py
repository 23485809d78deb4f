"""The memory account and the actions that free memory, each measured."""
