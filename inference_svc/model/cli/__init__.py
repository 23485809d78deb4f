"""The model command lines: autoglm-bundle (cli/bundle.py) and autoglm-plan (cli/plan.py)."""
