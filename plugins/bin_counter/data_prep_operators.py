"""Airflow operators for data preparation: select and shard, fetch a shard, join the shards' reports,
contrast enhancement, split.

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
from dataclasses import asdict

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


def shard_path(selection: str, shard_size: int, index: int, what: str) -> str:
    """A shard's files beside the selection's reports: its keys, its fetch report, its good keys. The
    shard size is in the path: shards of another size are other keys under the same index."""
    return f"reports/{selection}/shards-of-{shard_size}/shard-{index:05d}-{what}.json"


def check_map_length(keys: int, shards: int, shard_size: int) -> None:
    """Airflow refuses to map a task over more than `[core] max_map_length` values (1024 by default):
    say so before any shard is written, with the shard size that fits."""
    from airflow.configuration import conf

    limit = conf.getint("core", "max_map_length", fallback=1024)
    if shards > limit:
        raise ValueError(
            f"{keys} keys in shards of {shard_size} make {shards} shards, more than Airflow maps one task "
            f"over ([core] max_map_length = {limit}): set shard_size to at least {-(-keys // limit)}"
        )


class AbidSelectOperator(BaseOperator):
    """Choose the keys to fetch and cut them into shards that fetch on their own.

    subset: "file_list" (the seed's 10,441 keys; `counts` and `limit` narrow it) or "key_range"
    (`key_range` = "01000:01600"). source: the public bucket (anonymous), `s3://...` read through
    `source_aws_conn_id`, `https://...`, or a local folder. Each shard's keys are written to
    `s3://<bucket>/<prefix>/reports/<selection>/shard-NNNNN-keys.json`; returns one small dict per shard
    (for XCom, and for mapping `AbidFetchOperator` over them).
    """

    template_fields: Sequence[str] = (
        "source",
        "bucket",
        "prefix",
        "subset",
        "key_range",
        "counts",
        "limit",
        "shard_size",
    )
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
        shard_size: int = 5000,
        aws_conn_id: str | None = "aws_default",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.bucket, self.prefix, self.source = bucket, prefix, source
        self.source_aws_conn_id, self.subset, self.key_range = source_aws_conn_id, subset, key_range
        self.counts, self.limit, self.seed, self.shard_size = counts, limit, seed, shard_size
        self.aws_conn_id = aws_conn_id

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

    def execute(self, context) -> list[dict]:
        from bin_counter import abid, fetch

        source_client = _s3_client(self.source_aws_conn_id) if self.source_aws_conn_id else None
        source = abid.open_source(self.source, s3_client=source_client)
        keys = list(dict.fromkeys(self.select(source)))
        if not keys:  # else every later task is skipped and the run ends "success" with no dataset
            raise ValueError(
                f"the selection is empty: subset {self.subset!r} of {source.uri} with counts "
                f"{self.counts} and limit {self.limit} names no key"
            )
        # Named by the selection, not the run: the same selection again lands on the same files.
        selection = selection_id({"source": source.uri, "keys": keys})
        shards = fetch.shard_keys(keys, int(self.shard_size))
        check_map_length(len(keys), len(shards), int(self.shard_size))
        dest = _store(_s3_client(self.aws_conn_id), self.bucket, self.prefix)
        described = []
        for index, shard in enumerate(shards):
            path = shard_path(selection, int(self.shard_size), index, "keys")
            dest.write(path, json.dumps(shard).encode())
            described.append(
                {
                    "selection": selection,
                    "source": source.uri,
                    "index": index,
                    "shards": len(shards),
                    "shard_size": int(self.shard_size),
                    "keys": len(shard),
                    "keys_path": path,
                }
            )
        log.info(
            "%d keys from %s in %d shards of at most %s: s3://%s/%s/reports/%s/",
            len(keys),
            source.uri,
            len(shards),
            self.shard_size,
            self.bucket,
            self.prefix,
            selection,
        )
        return described


class AbidFetchOperator(BaseOperator):
    """Copy one shard of keys into `s3://<bucket>/<prefix>/` (`bin-images/` + `metadata/`), checking
    every file; map it over `AbidSelectOperator`'s shards.

    Resumable and idempotent: a key already there whole is skipped, so a retried or re-run shard
    fetches only what it lacks. Missing or invalid keys never fail a shard (the selection's share of
    them is judged by `FetchReportOperator`); a source that stops answering does, and the shard retries
    alone. Writes the shard's report and its good keys; returns where they are.
    """

    template_fields: Sequence[str] = ("source", "bucket", "prefix", "shard", "subset", "counts")
    ui_color = "#d9ecf2"

    def __init__(
        self,
        *,
        bucket: str,
        shard: Mapping,
        prefix: str = "abid/raw",
        source: str = "s3://aft-vbi-pds",
        source_aws_conn_id: str | None = None,
        subset: str = "file_list",
        counts: Sequence[int] | None = None,
        workers: int = 8,
        retries_per_object: int = 3,
        aws_conn_id: str | None = "aws_default",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.bucket, self.prefix, self.source, self.shard = bucket, prefix, source, shard
        self.source_aws_conn_id, self.subset, self.counts = source_aws_conn_id, subset, counts
        self.workers, self.retries_per_object, self.aws_conn_id = workers, retries_per_object, aws_conn_id

    def execute(self, context) -> dict:
        from bin_counter import abid, fetch

        shard = dict(self.shard)
        source_client = _s3_client(self.source_aws_conn_id) if self.source_aws_conn_id else None
        source = abid.open_source(self.source, s3_client=source_client)
        dest = _store(_s3_client(self.aws_conn_id), self.bucket, self.prefix)
        keys = json.loads(dest.read(shard["keys_path"]))
        # With a key range the counts are only known from the metadata: other keys are left out there.
        counts = [int(c) for c in self.counts] if self.counts and self.subset == "key_range" else None
        log.info(
            "shard %d of %d: fetching %d keys from %s into s3://%s/%s",
            shard["index"] + 1,
            shard["shards"],
            len(keys),
            source.uri,
            self.bucket,
            self.prefix,
        )
        report = fetch.fetch_subset(
            source, keys, dest, workers=self.workers, retries=self.retries_per_object, max_bad_share=1.0, counts=counts
        )
        report_path = shard_path(shard["selection"], shard["shard_size"], shard["index"], "fetch")
        good_path = shard_path(shard["selection"], shard["shard_size"], shard["index"], "good")
        dest.write(good_path, json.dumps(dict(sorted(report.counts.items()))).encode())
        dest.write(report_path, json.dumps(report.to_dict()).encode())  # last: the shard is done
        return {
            **shard,
            "report_path": report_path,
            "good_path": good_path,
            "good": len(report.counts),
            "bad": report.bad,
        }


class FetchReportOperator(BaseOperator):
    """Join the fetched shards' reports into the selection's: `reports/fetch-<selection>.json` (what
    happened to every key) and `reports/keys-<selection>.json` (the good keys and their counts, which
    the split reads). Fails when missing and invalid keys exceed `max_bad_share` of the selection,
    after writing the report that lists them."""

    template_fields: Sequence[str] = ("bucket", "prefix", "shards", "max_bad_share")
    ui_color = "#d9ecf2"

    def __init__(
        self,
        *,
        bucket: str,
        shards: Sequence[Mapping],
        prefix: str = "abid/raw",
        max_bad_share: float = 0.5,
        aws_conn_id: str | None = "aws_default",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.bucket, self.prefix, self.shards = bucket, prefix, shards
        self.max_bad_share, self.aws_conn_id = max_bad_share, aws_conn_id

    def execute(self, context) -> dict:
        from bin_counter import fetch

        shards = sorted((dict(s) for s in self.shards), key=lambda s: s["index"])
        if not shards:
            raise ValueError("no shards were fetched: the selection is empty")
        if len(shards) != shards[0]["shards"]:
            raise ValueError(f"{len(shards)} of {shards[0]['shards']} shards were fetched: run the missing ones")
        dest = _store(_s3_client(self.aws_conn_id), self.bucket, self.prefix)
        report = fetch.merge_reports(
            [fetch.FetchReport.from_dict(json.loads(dest.read(s["report_path"]))) for s in shards]
        )
        try:
            fetch.check_bad_share(report, float(self.max_bad_share))
        except fetch.TooManyBadKeys as exc:
            from airflow.sdk.exceptions import AirflowFailException

            self._write_report(dest, shards[0], exc.report)
            # Fails for good: a retry would count the same keys again (reading the reports can retry).
            raise AirflowFailException(
                f"{exc}; the report lists them: s3://{self.bucket}/{self.prefix}/"
                f"reports/fetch-{shards[0]['selection']}.json"
            ) from exc
        return publish(context, self._write_report(dest, shards[0], report))

    def _write_report(self, dest, shard: Mapping, report) -> dict:
        selection = shard["selection"]
        report_path, keys_path = f"reports/fetch-{selection}.json", f"reports/keys-{selection}.json"
        dest.write(report_path, json.dumps(report.to_dict(), indent=2).encode())
        dest.write(keys_path, json.dumps(dict(sorted(report.counts.items()))).encode())
        log.info("%s; report at s3://%s/%s/%s", report.summary(), self.bucket, self.prefix, report_path)
        return {
            "bucket": self.bucket,
            "prefix": self.prefix,
            "keys_path": keys_path,
            "report_path": report_path,
            "source": report.source,
            "good": len(report.counts),
            "missing": len(report.missing),
            "invalid": len(report.invalid),
            "keys_digest": selection_id(report.counts),
        }


class ContrastEnhanceOperator(BaseOperator):
    """Enhance the photos of a key list (`keys_path`, relative to `source_prefix`: a fetched shard's good
    keys, or the selection's) from `source_prefix` into `<dest_root>/<enhancement id>/`, with their
    metadata beside them (ABID's layout); map it over the fetched shards.

    Method "none" (the default: see BENCHMARKS.md) writes nothing and points at `source_prefix`.
    Returns the enhancement (method, parameters, id, prefix) and what this call wrote.
    """

    template_fields: Sequence[str] = ("bucket", "source_prefix", "dest_root", "keys_path", "method", "method_params")
    ui_color = "#f2e8d9"

    def __init__(
        self,
        *,
        bucket: str,
        source_prefix: str,
        keys_path: str,
        method: str = "none",
        method_params: Mapping | None = None,
        dest_root: str = "abid/enhanced",
        workers: int = 4,
        aws_conn_id: str | None = "aws_default",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.bucket, self.source_prefix, self.keys_path = bucket, source_prefix, keys_path
        self.method, self.method_params, self.dest_root = method, method_params, dest_root
        self.workers, self.aws_conn_id = workers, aws_conn_id

    def execute(self, context) -> dict:
        from bin_counter import enhance

        client = _s3_client(self.aws_conn_id)
        source = _store(client, self.bucket, self.source_prefix)
        keys = sorted(json.loads(source.read(self.keys_path)))
        if self.method == "none":  # nothing to change: the split lists the fetched images directly
            log.info("enhancement 'none': %d images used as fetched", len(keys))
            return publish(
                context,
                {
                    **enhance.record("none"),
                    "images": len(keys),
                    "written": 0,
                    "skipped": len(keys),
                    "bucket": self.bucket,
                    "prefix": self.source_prefix,
                },
            )
        prefix = f"{self.dest_root}/{enhance.enhancement_id(self.method, self.method_params)}"
        dest = _store(client, self.bucket, prefix)
        enhance.write_record(dest, self.method, self.method_params)
        result = enhance.enhance_keys(source, dest, keys, self.method, self.method_params, workers=self.workers)
        return publish(context, {**result, "bucket": self.bucket, "prefix": prefix})


class LiveSourceOperator(BaseOperator):
    """Captured photos whose count a client or a reviewer confirmed (`bin_counter.live`), from the
    `lookback_hours` before the run, written in ABID's layout under `s3://<bucket>/<prefix>/` with
    `live-` keys, and their keys and counts to `reports/live-<digest>.json` (what the split reads,
    beside the fetch's key list). Off (`enabled` false): reads nothing and writes an empty key list,
    so that the tasks after it run the same way either way.

    Returns the keys file, its digest, and the source's report (what was found, confirmed, skipped).
    """

    template_fields: Sequence[str] = ("bucket", "prefix", "endpoint_name", "function_name", "lookback_hours", "enabled")
    ui_color = "#f2d9e8"

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_name: str | None,
        function_name: str | None,
        enabled: bool = False,
        lookback_hours: int = 168,
        prefix: str = "abid/raw",
        aws_conn_id: str | None = "aws_default",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.bucket, self.prefix, self.enabled, self.lookback_hours = bucket, prefix, enabled, lookback_hours
        self.endpoint_name, self.function_name, self.aws_conn_id = endpoint_name, function_name, aws_conn_id

    def window(self, context) -> tuple:
        """[start, end): the lookback before the run (its run_after, the same for every retry of it,
        so a retried task reads the same requests), or before now without a run."""
        from datetime import UTC, datetime, timedelta

        run = (context or {}).get("dag_run")
        end = getattr(run, "run_after", None) or datetime.now(UTC)
        return end - timedelta(hours=int(self.lookback_hours)), end

    def execute(self, context) -> dict:
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

        from bin_counter import capture, live

        client = _s3_client(self.aws_conn_id)
        dest = _store(client, self.bucket, self.prefix)
        enabled = self.enabled in (True, "True", "true")
        if not enabled:
            log.info("the live source is off (live_source Param): no captured photo is read")
            return publish(context, self._write_keys(dest, {}, {"enabled": False}))
        if not self.endpoint_name or not self.function_name:
            raise ValueError("the live source needs the endpoint's and the API function's names")
        start, end = self.window(context)
        logs = AwsBaseHook(aws_conn_id=self.aws_conn_id, client_type="logs").get_conn()
        keys = capture.capture_keys(client, self.bucket, self.endpoint_name, start, end)
        verdicts = capture.read_verdicts(logs, self.function_name, start, end)
        reviews, bad_rows = live.read_reviews(client, self.bucket)
        report = live.LiveReport(bad_review_rows=bad_rows)
        captured = capture.read_captures(client, self.bucket, keys, start, end)
        photos = live.confirmed_photos(captured, verdicts, reviews, report)
        written = live.write_photos(dest, photos)
        log.info("live photos from %s to %s: %s; %s", start, end, report.summary(), written)
        described = {
            "enabled": True,
            "endpoint": self.endpoint_name,
            "function": self.function_name,
            "window": [start.isoformat(timespec="seconds"), end.isoformat(timespec="seconds")],
            "capture_files": len(keys),
            **asdict(report),
            **written,
        }
        return publish(context, self._write_keys(dest, {p.key: p.count for p in photos}, described))

    def _write_keys(self, dest, counts: dict[str, int], described: dict) -> dict:
        """The keys file and the full report (which photos were skipped, and why); returns the report
        with the skipped photos and review rows counted, not listed (it goes to the dataset record)."""
        name = selection_id(counts)
        keys_path, report_path = f"reports/live-{name}.json", f"reports/live-report-{name}.json"
        dest.write(keys_path, json.dumps(dict(sorted(counts.items()))).encode())
        dest.write(report_path, json.dumps(described, indent=2, default=str).encode())
        listed = ("invalid", "bad_review_rows")
        return {
            **{k: len(v) if k in listed else v for k, v in described.items()},
            "photos": len(counts),
            "keys_path": keys_path,
            "report_path": report_path,
            "keys_digest": name if counts else None,
        }


class BlockSplitOperator(BaseOperator):
    """Split by key blocks into `s3://<bucket>/datasets/<version>/`: a SageMaker ManifestFile per split
    (`<split>.manifest`, the photos listed where they lie under `image_prefix`, with a labels file
    written beside them; nothing copied), `manifest.csv` and `dataset.json`, reading counts from the
    fetch's key list and, with `live_keys_path`, the live source's (its photos lie under the same prefix).

    `dataset` is what `bin_counter.dataset.plan` returns: the version and the split parameters it was
    derived from, so the split is made with exactly the parameters its version names. With
    `outlets`, each outlet's asset event carries the dataset's record (location, size, version).
    """

    template_fields: Sequence[str] = (
        "bucket",
        "keys_prefix",
        "keys_path",
        "live_keys_path",
        "image_prefix",
        "dataset",
        "extra",
    )
    ui_color = "#e3f2d9"

    def __init__(
        self,
        *,
        bucket: str,
        keys_prefix: str,
        keys_path: str,
        image_prefix: str,
        dataset: Mapping,
        extra: Mapping | None = None,
        live_keys_path: str | None = None,
        aws_conn_id: str | None = "aws_default",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.bucket, self.keys_prefix, self.keys_path = bucket, keys_prefix, keys_path
        self.image_prefix, self.dataset, self.live_keys_path = image_prefix, dataset, live_keys_path
        self.extra, self.aws_conn_id = extra, aws_conn_id

    def execute(self, context) -> dict:
        from bin_counter import abid, dataset, split

        version, parameters = self.dataset["version"], self.dataset["split"]
        dest_prefix = dataset.prefix_of(version)
        client = _s3_client(self.aws_conn_id)
        keys = _store(client, self.bucket, self.keys_prefix)
        counts = json.loads(keys.read(self.keys_path))
        if self.live_keys_path:  # the live source's photos, beside ABID's under the same prefix
            counts.update(json.loads(keys.read(self.live_keys_path)))
        records = [
            abid.Record(k, int(c))
            for k, c in counts.items()
            if parameters["max_count"] is None or int(c) <= parameters["max_count"]
        ]
        if not records:
            raise ValueError(f"no images to split in s3://{self.bucket}/{self.keys_prefix}/{self.keys_path}")
        assignment = split.assign_splits(records, parameters["shares"], parameters["block_size"], parameters["seed"])
        dest = _store(client, self.bucket, dest_prefix)
        rows = split.write_manifests(
            records, assignment, _store(client, self.bucket, self.image_prefix), dest, version, parameters["block_size"]
        )
        table = split.summarize(records, assignment)
        log.info("split %d images into s3://%s/%s: %s", len(rows), self.bucket, dest_prefix, json.dumps(table))
        result = {
            "bucket": self.bucket,
            "prefix": dest_prefix,
            "images": table,
            "sources": split.summarize_sources(records, assignment),
            "layout": dataset.LAYOUT,
            "image_prefix": self.image_prefix,
            "uri": f"s3://{self.bucket}/{dest_prefix}",
            "version": version,
            **parameters,
            **(self.extra or {}),
        }
        dataset.write_record(dest, result)
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = result
        return publish(context, result)
