"""What CloudWatch does that moto does not: evaluate metric alarms (`alarms`, `evaluator`), and
SageMaker's publishing of its endpoints' metrics (`metrics`)."""
