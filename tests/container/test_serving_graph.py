"""The network as endpoints run it (serving_graph.py): the frozen graph train.py writes answers as the
eager network does, for any batch; a worker loads it without torchvision; archives without it still
load; each worker takes its share of the cores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, make_bin_image

import inference
import preprocessing
import serving_graph


def images_of(count: int, size: int) -> torch.Tensor:
    batch = [preprocessing.decode(make_bin_image(n % 3, seed=n), size) for n in range(count)]
    return preprocessing.normalize(torch.stack(batch).float() / 255)


def test_train_py_writes_the_serving_graph_and_it_answers_as_the_network(trained_model):
    model_dir, _ = trained_model
    assert (model_dir / serving_graph.GRAPH_FILE).is_file()
    assert (model_dir / "code" / "serving_graph.py").is_file()
    card = json.loads((model_dir / "model_card.json").read_text())
    net = serving_graph.rebuild(model_dir, card)
    graph = serving_graph.load(model_dir, card)
    for count in (1, 3, 8):  # traced on one photo's views; any batch runs
        images = images_of(count, card["preprocessing"]["resize"][0])
        with torch.inference_mode():
            expected = torch.softmax(net(images), 1)
        assert torch.allclose(inference.class_probabilities(graph, images), expected, atol=1e-4)
        flips = inference.class_probabilities(graph, images, "flips")
        views = [images, images.flip(3), images.flip(2), images.flip(2).flip(3)]
        with torch.inference_mode():
            by_view = sum(torch.softmax(net(v), 1) for v in views) / 4
        assert flips.shape == (count, len(card["classes"]))
        assert torch.allclose(flips, by_view, atol=1e-4)


def test_a_worker_loads_the_graph_without_torchvision(trained_model):
    model_dir, _ = trained_model
    code = (
        "import sys, inference; model = inference.model_fn(sys.argv[1]); "
        "print(sorted(m for m in ('torchvision', 'backbones', 'torch._dynamo') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(model_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(model_dir / "code"), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_an_archive_without_the_graph_is_traced_at_load_and_answers_the_same(trained_model, tmp_path):
    model_dir, _ = trained_model
    older = tmp_path / "older"
    shutil.copytree(model_dir, older)
    (older / serving_graph.GRAPH_FILE).unlink()
    new, old = inference.model_fn(str(model_dir)), inference.model_fn(str(older))
    image = make_bin_image(2, seed=7)
    answers = [inference.predict_fn(inference.input_fn(image, "image/jpeg"), m) for m in (new, old)]
    assert answers[0]["count"] == answers[1]["count"]
    assert answers[0]["probabilities"] == pytest.approx(answers[1]["probabilities"], abs=1e-4)


@pytest.mark.parametrize(
    ("workers", "cpus", "threads"),
    [
        (None, 2, 1),  # TorchServe's default: one worker per logical CPU, so one thread each
        ("1", 2, 2),
        ("2", 4, 2),
        ("3", 2, 1),
        ("", 8, 1),
    ],
)
def test_each_worker_takes_its_share_of_the_cores(workers, cpus, threads):
    environ = {} if workers is None else {serving_graph.WORKERS_SETTING: workers}
    assert serving_graph.worker_threads(environ, cpus) == threads


def test_a_wrong_worker_count_is_refused_with_the_setting_named():
    for bad in ("two", "0"):
        with pytest.raises(ValueError, match="SAGEMAKER_MODEL_SERVER_WORKERS"):
            serving_graph.worker_threads({serving_graph.WORKERS_SETTING: bad}, 2)


def test_omp_num_threads_decides_when_set():
    before, cpus = torch.get_num_threads(), len(os.sched_getaffinity(0))
    try:
        torch.set_num_threads(1)
        assert serving_graph.set_threads({"OMP_NUM_THREADS": "1", serving_graph.WORKERS_SETTING: "1"}) == 1
        assert serving_graph.set_threads({serving_graph.WORKERS_SETTING: "1"}) == cpus
        assert torch.get_num_threads() == cpus
    finally:
        torch.set_num_threads(before)


def test_the_published_model_carries_its_graph():
    import tarfile

    with tarfile.open(REPO / "models" / "bin-counter.tar.gz") as archive:
        names = set(archive.getnames())
    assert {serving_graph.GRAPH_FILE, "model.pth", "code/serving_graph.py", "code/inference.py"} <= names
