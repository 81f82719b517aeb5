"""Where an Airflow worker finds the code the other runtimes run: `sagemaker_code/` (what the jobs
and the endpoint run, packaged by the retraining DAG) and `lambda/` (the API function). Beside
`plugins/` in a checkout; elsewhere (the compose file's containers, MWAA) the two variables say where.
"""

from __future__ import annotations

import os
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[2]
CODE_DIR = Path(os.environ.get("BIN_COUNTER_CODE_DIR", _CHECKOUT / "sagemaker_code"))
LAMBDA_DIR = Path(os.environ.get("BIN_COUNTER_LAMBDA_DIR", _CHECKOUT / "lambda"))
