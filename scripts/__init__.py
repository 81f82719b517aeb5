"""The stack and release scripts, each run as a module from the repository root: `python -m scripts.<name>`."""
