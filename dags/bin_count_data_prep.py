"""bin_count_data_prep: fetch an ABID subset in shards, enhance contrast, split by key blocks into manifests,
publish a version."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from bin_counter.alerts import failure_alert
from bin_counter.assets import BIN_COUNT_DATASET
from bin_counter.data_prep_operators import (
    AbidFetchOperator,
    AbidSelectOperator,
    BlockSplitOperator,
    ContrastEnhanceOperator,
    FetchReportOperator,
    LiveSourceOperator,
)
from bin_counter.stack import name_param, stack_name

DOC = """
### Bin count data preparation

Builds a versioned training dataset from the Amazon Bin Image Dataset (ABID, Amazon.com,
CC BY-NC-SA 3.0 US) in our bucket, and announces it on the `bin_count_dataset` asset, on which
`bin_count_retrain` is scheduled.

1. **select**: the subset (`file_list`: the seed project's 10,441 keys, or a `key_range`) cut into
   shards of `shard_size` keys, written to `abid/raw/reports/<selection>/`.
2. **fetch** (one mapped task per shard, side by side on a Celery or Kubernetes executor): copies the
   shard from `source` into `s3://<bucket>/abid/raw/`, checking that every image decodes and every
   metadata file has `EXPECTED_QUANTITY`. A shard that fails retries alone, and a re-run skips what
   already arrived whole.
3. **report**: joins the shards' reports. Bad or missing keys are counted in the log and in
   `abid/raw/reports/fetch-*.json`; the task fails only when they exceed `max_bad_share` of the subset.
4. **enhance** (mapped per shard): applies the contrast method to every image, with its metadata,
   into `abid/enhanced/<method-id>/` (method `none`: nothing is written).
5. **version**: derives the dataset version from the fetched keys, the enhancement and the split
   parameters below, and hands both to the split.
6. **live** (with `live_source` on; off by default, the photos being the clients' data): the
   captured requests of the last `live_lookback_hours` whose count a client (`expected`) or a reviewer
   (`s3://<bucket>/reviews/*.csv`: inference_id,count[,image]) confirmed, written beside ABID's photos
   as `live-<yyyymmddhh>-<request id>-<n>`; undecodable photos are skipped and counted. **enhance_live**
   gives them the same enhancement.
7. **split**: train/validation/test by blocks of consecutive keys (a live photo's block: its capture
   hour; each source dealt on its own), stratified by count, into
   `datasets/<version>/<split>.manifest` (SageMaker ManifestFiles: the photos stay where the fetch or
   the enhancement put them, nothing is copied) with `manifest.csv`; then updates the asset. The
   record (`dataset.json`) says how many photos came from each source into each split (`sources`).

The same parameters give the same version: a second run writes nothing new.

**Alerts**: a task that fails for good publishes to the SNS topic in the Airflow Variable
`bin_counter_alerts_topic` (DAG, task, run, log URL, reason).

**When a task fails**
- *fetch*, "cannot read from ...": the source is unreachable (network, permissions, bucket name).
  Check the `source` Param and, for S3 sources, the `source_aws_conn_id` connection.
- *fetch*, one shard failed: its log names the error; clear that map index alone, or let it retry.
- *report*, "N of M keys missing or invalid": the subset does not match the source (a partial
  mirror?). The report object named in the log lists the keys; raise `max_bad_share` only if
  that is expected.
- *live*, "needs the endpoint's and the API function's names": set `endpoint_name` and
  `function_name`, or the stack's Variable. Unreadable rows of a reviewer's CSV are listed in the
  task log and in `abid/raw/reports/live-report-*.json`; they never fail the task.
- *enhance* / *split*, `NoSuchKey`, "have no image or metadata" or "no images to split": the objects
  of an earlier step are gone from the bucket; clear and re-run from *select*.
- Any task, credentials or endpoint errors: the `aws_default` connection (on a laptop it points at
  the moto server on loopback).
"""

RAW_PREFIX = "abid/raw"
# The enhancement's parameters, the same for ABID's photos and the live ones.
ENHANCEMENT_PARAMS = "{{ {'cutoff': params.autocontrast_cutoff} if params.enhancement == 'autocontrast' else {} }}"


def good_keys_path(fetched: dict) -> str:
    """A fetched shard's good keys, which its enhancement task reads."""
    return fetched["good_path"]


@dag(
    dag_id="bin_count_data_prep",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    user_defined_macros={"stack_name": stack_name},
    doc_md=DOC,
    tags=["bin-counter", "data"],
    default_args={
        "owner": "bin-counter",
        "retries": 2,
        "retry_delay": timedelta(minutes=2),
        "retry_exponential_backoff": True,
        "on_failure_callback": failure_alert(),
    },
    params={
        "bucket": name_param("bucket", "Our S3 bucket: raw copy, enhanced images, datasets"),
        "source": Param(
            "s3://aft-vbi-pds",
            type="string",
            description="Where ABID is read: the public bucket, s3://bucket/prefix, https://... "
            "or a local folder in the bucket's layout",
        ),
        "subset": Param(
            "file_list",
            enum=["file_list", "key_range"],
            description="file_list: the seed project's 10,441 keys; key_range: consecutive keys",
        ),
        "counts": Param(
            [0, 1, 2, 3, 4, 5],
            type="array",
            items={"type": "integer", "minimum": 0},
            description="The counts (EXPECTED_QUANTITY) to take; with key_range, other "
            "keys are left out after reading their metadata",
        ),
        "limit": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            description="With file_list: at most this many keys, drawn evenly across counts",
        ),
        "key_range": Param(
            "01000:01600", type="string", pattern=r"^\d+:\d+$", description="With key_range: START:STOP, zero-padded"
        ),
        "shard_size": Param(
            5000,
            type="integer",
            minimum=1,
            maximum=100000,
            description="Keys per fetch and enhance task: the unit that runs side by side and "
            "retries alone (the whole public dataset at 5,000: 108 shards)",
        ),
        "max_bad_share": Param(
            0.5,
            type="number",
            minimum=0,
            maximum=1,
            description="Fail the report when more than this share of keys is missing or invalid",
        ),
        "enhancement": Param(
            "none",
            enum=["none", "autocontrast", "equalize"],
            description="Contrast method applied to every image (see BENCHMARKS.md for its effect)",
        ),
        "autocontrast_cutoff": Param(
            1.0,
            type="number",
            minimum=0,
            maximum=49,
            description="autocontrast: percent of darkest and lightest pixels to saturate",
        ),
        "train_share": Param(0.8, type="number", minimum=0, maximum=1, description="Share of images for training"),
        "validation_share": Param(
            0.1,
            type="number",
            minimum=0,
            maximum=1,
            description="Share for validation (epoch selection, tuning objective)",
        ),
        "test_share": Param(
            0.1,
            type="number",
            minimum=0,
            maximum=1,
            description="Share held out for the final test; the three shares must add up to 1",
        ),
        "block_size": Param(
            100,
            type="integer",
            minimum=1,
            description="Consecutive keys kept on one side of the split (re-photographed bins)",
        ),
        "split_seed": Param(0, type="integer", description="Seed of the block assignment"),
        "max_count": Param(
            None,
            type=["null", "integer"],
            minimum=0,
            description="Leave out images with more items than this (empty: keep all; "
            "train.py then drops or clips them)",
        ),
        # Off by default: the photos are the clients' data, and training on them is a decision for
        # whoever runs the service (their agreement with the clients), not a default; off, a dataset
        # is the public ABID subset alone and can be rebuilt by anyone.
        "live_source": Param(
            False,
            type="boolean",
            description="Add the captured photos whose count a client or a reviewer confirmed "
            "(the clients' data: see README, Data prep)",
        ),
        "live_lookback_hours": Param(
            168,
            type="integer",
            minimum=1,
            description="With live_source: the captured requests of this many hours before the run",
        ),
        "endpoint_name": name_param("endpoint_name", "With live_source: the endpoint whose captures are read"),
        "function_name": name_param(
            "function_name", "With live_source: the API function whose log has the clients' expected counts"
        ),
    },
)
def bin_count_data_prep():
    # What select and fetch both read: where the keys come from and where they go.
    where = {
        "bucket": "{{ stack_name(params, 'bucket') }}",
        "prefix": RAW_PREFIX,
        "source": "{{ params.source }}",
        "subset": "{{ params.subset }}",
        "counts": "{{ params.counts }}",
    }
    select = AbidSelectOperator(
        task_id="select",
        **where,
        limit="{{ params.limit }}",
        key_range="{{ params.key_range }}",
        shard_size="{{ params.shard_size }}",
        execution_timeout=timedelta(minutes=10),
        doc_md="Chooses the keys and writes one key list per shard.",
    )
    fetch = AbidFetchOperator.partial(
        task_id="fetch",
        **where,
        # Each shard reads with 8 threads: 16 shards at once keep 128 requests in flight, which S3
        # serves without throttling and a laptop's moto server still answers.
        max_active_tis_per_dagrun=16,
        execution_timeout=timedelta(minutes=45),
        doc_md="Copies and checks one shard. Its report lists the shard's missing and invalid keys.",
    ).expand(shard=select.output)
    report = FetchReportOperator(
        task_id="report",
        bucket="{{ stack_name(params, 'bucket') }}",
        prefix=RAW_PREFIX,
        shards=fetch.output,
        max_bad_share="{{ params.max_bad_share }}",
        execution_timeout=timedelta(minutes=10),
        doc_md="Joins the shards' reports; fails when too many keys are missing or invalid.",
    )
    enhance = ContrastEnhanceOperator.partial(
        task_id="enhance",
        bucket="{{ stack_name(params, 'bucket') }}",
        source_prefix=RAW_PREFIX,
        method="{{ params.enhancement }}",
        method_params=ENHANCEMENT_PARAMS,
        max_active_tis_per_dagrun=16,
        execution_timeout=timedelta(minutes=45),
    ).expand(keys_path=fetch.output.map(good_keys_path))
    report >> enhance
    live = LiveSourceOperator(
        task_id="live",
        bucket="{{ stack_name(params, 'bucket') }}",
        prefix=RAW_PREFIX,
        enabled="{{ params.live_source }}",
        lookback_hours="{{ params.live_lookback_hours }}",
        endpoint_name="{{ stack_name(params, 'endpoint_name') if params.live_source else None }}",
        function_name="{{ stack_name(params, 'function_name') if params.live_source else None }}",
        execution_timeout=timedelta(minutes=30),
        doc_md="Captured photos with a confirmed count (live_source Param; off: nothing is read).",
    )
    # The live photos get the same enhancement as ABID's, into the same prefix the split lists.
    enhance_live = ContrastEnhanceOperator(
        task_id="enhance_live",
        bucket="{{ stack_name(params, 'bucket') }}",
        source_prefix=RAW_PREFIX,
        method="{{ params.enhancement }}",
        method_params=ENHANCEMENT_PARAMS,
        keys_path=live.output["keys_path"],
        execution_timeout=timedelta(minutes=45),
    )

    @task(retries=0, execution_timeout=timedelta(minutes=1), multiple_outputs=True)
    def version(fetched: dict, enhanced: list[dict], live_photos: dict) -> dict:
        """The dataset to write: the split parameters, read from the Params here only, the version
        derived from them, the fetched keys (and the live photos' keys) and the enhancement, and
        where the photos are."""
        from bin_counter import dataset
        from bin_counter.artifacts import digest

        p = get_current_context()["params"]
        split = dataset.split_parameters(
            {"train": p["train_share"], "validation": p["validation_share"], "test": p["test_share"]},
            p["block_size"],
            p["split_seed"],
            p["max_count"],
        )
        first = enhanced[0]  # every shard's enhancement is the same: the shards differ in keys only
        keys = fetched["keys_digest"]
        if live_photos.get("keys_digest"):  # without live photos, the version an ABID-only dataset always had
            keys = digest({"abid": keys, "live": live_photos["keys_digest"]})
        return {
            **dataset.plan(keys, first["id"], split),
            "image_prefix": first["prefix"],
            "enhancement": first["id"],
            "enhancement_params": first["params"],
        }

    planned = version(report.output, enhance.output, live.output)
    split = BlockSplitOperator(
        task_id="split",
        bucket="{{ stack_name(params, 'bucket') }}",
        keys_prefix=RAW_PREFIX,
        keys_path=report.output["keys_path"],
        live_keys_path=live.output["keys_path"],
        image_prefix=planned["image_prefix"],
        dataset=planned,
        extra={
            "enhancement": planned["enhancement"],
            "enhancement_params": planned["enhancement_params"],
            "fetch_report": report.output["report_path"],
            "live": live.output,
        },
        outlets=[BIN_COUNT_DATASET],
        execution_timeout=timedelta(hours=1),
    )
    enhance_live >> split


bin_count_data_prep()
