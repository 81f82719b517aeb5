"""The stand-in's checkpoint sync copies what SageMaker copies: every file under the local path,
whatever its name, so that a training script leaving temporary files there shows in the bucket as
it would on AWS (audit finding L9; train.py's own side is tests/container/test_train.py)."""

from __future__ import annotations

from standin.sagemaker.training import CheckpointSync
from tests.airflow_side.conftest import list_objects


def test_stray_and_temporary_files_in_the_checkpoint_folder_are_uploaded_and_restored(s3, bucket, tmp_path):
    folder = tmp_path / "checkpoints"
    sync = CheckpointSync(s3, f"s3://{bucket}/checkpoints/job", folder, quiet=0.0, log=lambda line: None)
    assert sync.restore() == 0
    (folder / "checkpoint.pth").write_bytes(b"epoch 1")
    (folder / "checkpoint.pth.tmp").write_bytes(b"epoch 2, half written")  # an atomic write under way
    (folder / "notes.txt").write_text("a stray file")
    assert sync.finish() == 3
    assert set(list_objects(s3, bucket)) == {
        "checkpoints/job/checkpoint.pth",
        "checkpoints/job/checkpoint.pth.tmp",
        "checkpoints/job/notes.txt",
    }
    # The next job with the same S3Uri (a retry) gets them all back, the stale partial file included.
    again = CheckpointSync(s3, f"s3://{bucket}/checkpoints/job", tmp_path / "retry", log=lambda line: None)
    assert again.restore() == 3
    assert (tmp_path / "retry" / "checkpoint.pth.tmp").read_bytes() == b"epoch 2, half written"
