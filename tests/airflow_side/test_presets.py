"""The documented confs in presets/ are runs the DAGs accept: every key a Param, every value valid."""

from __future__ import annotations

import copy
import json
import math

import pytest

from bin_counter.abid import parse_key_range
from tests.airflow_side.conftest import dag_without_retries
from tests.conftest import REPO

PRESETS = sorted((REPO / "presets").rglob("*.json"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: str(p.relative_to(REPO / "presets")))
def test_a_preset_is_a_conf_its_dag_accepts(path, airflow_db):
    dag_id = path.name.split(".")[0]
    dag = dag_without_retries(dag_id)
    conf = json.loads(path.read_text())
    unknown = set(conf) - set(dag.params)
    assert not unknown, f"{path.name}: not Params of {dag_id}: {sorted(unknown)}"
    params = copy.deepcopy(dag.params)
    params.update(conf)
    params.validate()  # the checks Airflow makes when a run is triggered with this conf


def test_a_conf_out_of_a_params_range_is_refused(airflow_db):
    from airflow.sdk.exceptions import ParamValidationError

    params = copy.deepcopy(dag_without_retries("bin_count_data_prep").params)
    with pytest.raises(ParamValidationError, match="shard_size: 0 is less than the minimum"):
        params.update({"shard_size": 0})


def test_the_whole_dataset_preset_maps_within_airflows_limit(airflow_db):
    from airflow.configuration import conf as airflow_conf

    preset = json.loads((REPO / "presets" / "full-dataset" / "bin_count_data_prep.json").read_text())
    keys = len(parse_key_range(preset["key_range"]))
    assert keys == 535234
    shards = math.ceil(keys / preset["shard_size"])
    assert shards <= airflow_conf.getint("core", "max_map_length")


def test_more_shards_than_airflow_maps_are_refused_with_the_shard_size_that_fits(airflow_db):
    from bin_counter.data_prep_operators import check_map_length

    check_map_length(535234, 108, 5000)
    with pytest.raises(ValueError, match=r"535234 keys in shards of 100 make 5353 shards.*at least 523"):
        check_map_length(535234, 5353, 100)
