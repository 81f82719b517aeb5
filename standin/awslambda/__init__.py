"""Lambda as the stand-in serves it, laid out as moto lays out a service (`awslambda`, since `lambda`
is Python's): `responses` (the REST-JSON API), `models` (the backend: functions and their execution
environments) and `exceptions` (AWS's errors); `runner` is one execution environment's process."""
