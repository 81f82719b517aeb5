"""SageMaker as the stand-in serves it, laid out as moto lays out a service: `responses` (the wire
format), `models` (the backend: resources and what happens to them) and `exceptions` (AWS's
errors). The backend hands the work to `training` (a job's process), `tuning` (a tuning job's
choices) and `endpoints` (model servers: `model_frontend` processes)."""
