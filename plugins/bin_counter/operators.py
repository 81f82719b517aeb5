"""Airflow operators for data preparation: fetch, contrast enhancement, split.

Each is a thin shell around the plain functions of this package, reading and writing S3 through
the Amazon provider's S3 hook (so the Airflow AWS connection decides whether that is AWS or a
moto server on loopback). Each can run without a scheduler: `op.execute(context={})`.

Heavy libraries (boto3, Pillow) are imported inside `execute`, so a DAG file importing these
operators stays fast to parse.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence

from airflow.sdk import BaseOperator

from bin_counter.artifacts import digest

log = logging.getLogger(__name__)


def _s3_client(aws_conn_id: str | None):
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id=aws_conn_id).get_conn()


def _store(client, bucket: str, prefix: str):
    from bin_counter.abid import S3Store

    return S3Store(bucket, prefix, client)


def publish(context, result: dict) -> dict:
    """Push each field of `result` as its own XCom too, so downstream tasks can take
    `op.output["field"]`; the whole dict stays the return value."""
    ti = context.get("ti") if context else None
    if ti is not None:
        for key, value in result.items():
            ti.xcom_push(key=key, value=value)
    return result


def selection_id(payload: Mapping) -> str:
    return digest(payload)


class AbidFetchOperator(BaseOperator):
    """Copy an ABID subset into `s3://<bucket>/<prefix>/` (`bin-images/` + `metadata/`).

    subset: "file_list" (the seed's 10,441 keys; `counts` and `limit` narrow it) or "key_range"
    (`key_range` = "01000:01600"; `counts` keeps only keys with those EXPECTED_QUANTITY values).
    source: the public bucket (anonymous), `s3://...` read through `source_aws_conn_id`,
    `https://...`, or a local folder. Returns, through XCom, where the list of
    good keys and their counts was written, and a summary of the report.
    """

    template_fields: Sequence[str] = ("source", "bucket", "prefix", "subset", "key_range", "counts", "limit",
                                      "max_bad_share")
    ui_color = "#d9ecf2"

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "abid/raw",
        source: str = "s3://aft-vbi-pds",
        source_aws_conn_id: str | None = None,
        subset: str = "file_list",
        key_range: str = "01000:01600",
        counts: Sequence[int] | None = None,
        limit: int | None = None,
        seed: int = 0,
        workers: int = 8,
        retries_per_object: int = 3,
        max_bad_share: float = 0.5,
        aws_conn_id: str | None = "aws_default",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.bucket, self.prefix, self.source = bucket, prefix, source
        self.source_aws_conn_id, self.subset, self.key_range = source_aws_conn_id, subset, key_range
        self.counts, self.limit, self.seed, self.workers = counts, limit, seed, workers
        self.retries_per_object, self.max_bad_share, self.aws_conn_id = retries_per_object, max_bad_share, aws_conn_id

    def select(self, source) -> list[str]:
        from bin_counter import abid
        from bin_counter.abid import parse_key_range

        if self.subset == "key_range":
            return parse_key_range(self.key_range)
        if self.subset != "file_list":
            raise ValueError(f"subset must be 'file_list' or 'key_range', not {self.subset!r}")
        counts = [int(c) for c in self.counts] if self.counts else None
        limit = int(self.limit) if self.limit else None
        return abid.select_keys(abid.file_list_from(source), counts, limit, int(self.seed))

    def execute(self, context) -> dict:
        from bin_counter import abid, fetch

        client = _s3_client(self.aws_conn_id)
        source_client = _s3_client(self.source_aws_conn_id) if self.source_aws_conn_id else None
        source = abid.open_source(self.source, s3_client=source_client)
        keys = self.select(source)
        log.info("fetching %d keys from %s into s3://%s/%s", len(keys), source.uri, self.bucket, self.prefix)
        dest = _store(client, self.bucket, self.prefix)
        try:
            counts = [int(c) for c in self.counts] if self.counts and self.subset == "key_range" else None
            report = fetch.fetch_subset(source, keys, dest, workers=self.workers, retries=self.retries_per_object,
                                        max_bad_share=float(self.max_bad_share), counts=counts)
        except fetch.TooManyBadKeys as exc:
            self._write_report(dest, keys, exc.report)
            raise
        return publish(context, self._write_report(dest, keys, report))

    def _write_report(self, dest, keys: list[str], report) -> dict:
        # Named by the selection, not the run: the same selection fetched again overwrites it.
        ident = selection_id({"source": report.source, "keys": keys})
        report_path = f"reports/fetch-{ident}.json"
        keys_path = f"reports/keys-{ident}.json"
        dest.write(report_path, json.dumps(report.to_dict(), indent=2).encode())
        dest.write(keys_path, json.dumps(dict(sorted(report.counts.items()))).encode())
        log.info("%s; report at s3://%s/%s/%s", report.summary(), self.bucket, self.prefix, report_path)
        return {"bucket": self.bucket, "prefix": self.prefix, "keys_path": keys_path, "report_path": report_path,
                "source": report.source, "good": len(report.counts), "missing": len(report.missing),
                "invalid": len(report.invalid), "keys_digest": selection_id(report.counts)}


class ContrastEnhanceOperator(BaseOperator):
    """Enhance every fetched image from `source_prefix` into `<dest_root>/<enhancement id>/`.

    Method "none" (the default: see BENCHMARKS.md) writes nothing and points at `source_prefix`.

    `keys_path` is the key list the fetch wrote (relative to `source_prefix`). Returns the
    enhancement record (method, parameters, id, prefix).
    """

    template_fields: Sequence[str] = ("bucket", "source_prefix", "dest_root", "keys_path", "method", "method_params")
    ui_color = "#f2e8d9"

    def __init__(self, *, bucket: str, source_prefix: str, keys_path: str, method: str = "none",
                 method_params: Mapping | None = None, dest_root: str = "abid/enhanced", workers: int = 4,
                 aws_conn_id: str | None = "aws_default", **kwargs) -> None:
        super().__init__(**kwargs)
        self.bucket, self.source_prefix, self.keys_path = bucket, source_prefix, keys_path
        self.method, self.method_params, self.dest_root = method, method_params, dest_root
        self.workers, self.aws_conn_id = workers, aws_conn_id

    def execute(self, context) -> dict:
        from bin_counter import enhance

        client = _s3_client(self.aws_conn_id)
        source = _store(client, self.bucket, self.source_prefix)
        keys = sorted(json.loads(source.read(self.keys_path)))
        ident = enhance.enhancement_id(self.method, self.method_params)
        if self.method == "none":  # nothing to change: the split reads the fetched images directly
            log.info("enhancement 'none': %d images used as fetched", len(keys))
            return publish(context, {"method": "none", "params": {}, "id": ident, "images": len(keys), "written": 0,
                                     "skipped": len(keys), "bucket": self.bucket, "prefix": self.source_prefix})
        prefix = f"{self.dest_root}/{ident}"
        record = enhance.enhance_keys(source, _store(client, self.bucket, prefix), keys, self.method,
                                      self.method_params, workers=self.workers)
        return publish(context, {**record, "bucket": self.bucket, "prefix": prefix})


class BlockSplitOperator(BaseOperator):
    """Split by key blocks into `s3://<bucket>/datasets/<version>/<split>/<count>/<key>.jpg` plus
    `manifest.csv` and `dataset.json`, reading counts from the fetch's key list and images from
    `image_prefix`.

    `dataset` is what `bin_counter.dataset.plan` returns: the version and the split parameters it was
    derived from, so the split is made with exactly the parameters its version names. With
    `outlets`, each outlet's asset event carries the dataset's record (location, size, version).
    """

    template_fields: Sequence[str] = ("bucket", "keys_prefix", "keys_path", "image_prefix", "dataset", "extra")
    ui_color = "#e3f2d9"

    def __init__(self, *, bucket: str, keys_prefix: str, keys_path: str, image_prefix: str, dataset: Mapping,
                 extra: Mapping | None = None, aws_conn_id: str | None = "aws_default", **kwargs) -> None:
        super().__init__(**kwargs)
        self.bucket, self.keys_prefix, self.keys_path = bucket, keys_prefix, keys_path
        self.image_prefix, self.dataset = image_prefix, dataset
        self.extra, self.aws_conn_id = extra, aws_conn_id

    def execute(self, context) -> dict:
        from bin_counter import abid, dataset, split

        version, parameters = self.dataset["version"], self.dataset["split"]
        dest_prefix = dataset.prefix_of(version)
        client = _s3_client(self.aws_conn_id)
        counts = json.loads(_store(client, self.bucket, self.keys_prefix).read(self.keys_path))
        records = [abid.Record(k, int(c)) for k, c in counts.items()
                   if parameters["max_count"] is None or int(c) <= parameters["max_count"]]
        if not records:
            raise ValueError(f"no images to split in s3://{self.bucket}/{self.keys_prefix}/{self.keys_path}")
        assignment = split.assign_splits(records, parameters["shares"], parameters["block_size"], parameters["seed"])
        dest = _store(client, self.bucket, dest_prefix)
        rows = split.write_split_layout(records, assignment, _store(client, self.bucket, self.image_prefix), dest,
                                        f"s3://{self.bucket}/{self.image_prefix}", parameters["block_size"])
        table = split.summarize(records, assignment)
        log.info("split %d images into s3://%s/%s: %s", len(rows), self.bucket, dest_prefix, json.dumps(table))
        result = {"bucket": self.bucket, "prefix": dest_prefix, "images": table,
                  "uri": f"s3://{self.bucket}/{dest_prefix}", "version": version, **parameters, **(self.extra or {})}
        dataset.write_record(dest, result)
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = result
        return publish(context, result)
