"""Tests run in the container-side environment (.venv-container): train.py, inference.py, evaluate.py."""
