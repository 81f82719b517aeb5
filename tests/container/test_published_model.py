"""The published model (models/bin-counter.tar.gz) loads and serves in this environment from its own
code/ folder, as the inference image serves it, and counts real photos as it did in the environment it
was trained in (tests/data/published-model-answers.json)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import REPO, make_bin_image
from tests.container.conftest import clean_env

PUBLISHED = REPO / "models" / "bin-counter.tar.gz"
RECORDED = json.loads((REPO / "tests" / "data" / "published-model-answers.json").read_text())
# Only what model.tar.gz carries is importable, as in the serving container; one answer per line.
SERVE = """
import json, sys
sys.path.insert(0, sys.argv[1] + "/code")
import inference
model = inference.model_fn(sys.argv[1])
for path in sys.argv[2:]:
    body, kind = inference.output_fn(inference.predict_fn(inference.input_fn(open(path, "rb").read(), "image/jpeg"),
                                                          model), "application/json")
    print(body)
"""


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("published") / "model"
    with tarfile.open(PUBLISHED) as archive:
        archive.extractall(model_dir, filter="data")
    return model_dir


def serve(model_dir, images) -> list[dict]:
    served = subprocess.run(
        [sys.executable, "-I", "-c", SERVE, str(model_dir), *map(str, images)],
        capture_output=True,
        text=True,
        cwd=model_dir,
        env=clean_env(),
        check=False,
        timeout=600,
    )
    assert served.returncode == 0, served.stderr
    return [json.loads(line) for line in served.stdout.splitlines()]


def test_the_published_model_serves_from_its_own_code(published, tmp_path):
    image = tmp_path / "bin.jpg"
    image.write_bytes(make_bin_image(3, 0, (320, 240)))
    (answer,) = serve(published, [image])
    assert answer["model_version"] == RECORDED["model_version"]
    assert answer["count"] in range(6) and abs(sum(answer["probabilities"]) - 1) < 1e-3


@pytest.mark.real_data
def test_the_published_model_counts_real_photos_as_when_it_was_published(published, real_abid):
    names = sorted(RECORDED["answers"])
    answers = dict(zip(names, serve(published, [real_abid / "bin-images" / name for name in names]), strict=True))
    counts = {name: answer["count"] for name, answer in answers.items()}
    assert counts == {name: recorded["count"] for name, recorded in RECORDED["answers"].items()}
    for name, recorded in RECORDED["answers"].items():  # rounded to 5 places in the answers
        assert answers[name]["probabilities"] == pytest.approx(recorded["probabilities"], abs=2e-5), name
