"""The local stand-in for SageMaker (and, later, Lambda): the laptop and CI default, not a SageMaker clone."""
