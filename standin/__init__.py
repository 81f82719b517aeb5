"""The local stand-in for SageMaker and Lambda, with a local API Gateway route in front of the API
function: the laptop and CI default, not a SageMaker clone."""
