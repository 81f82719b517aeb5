"""The network as an endpoint runs it: a frozen TorchScript graph, every test-time view of a request in
one batch, oneDNN's prepacked kernels where PyTorch has them, and as many threads as the worker's share
of the cores.

train.py writes the graph beside the weights (`model.pt`, traced and frozen on CPU), so `model_fn`
loads it with `torch.jit.load` alone: no torchvision (which pulls in torch._dynamo, sympy and triton:
about 120 MB per worker) and no Python model code. An archive without it (written before the graph
file existed) is traced from `model.pth` at load, through backbones.py. Freezing folds batch norm into
the convolutions, and `torch.jit.optimize_for_inference` converts them to oneDNN's layout once, at
load: a photo's four views take about a quarter of the eager, view-by-view time (BENCHMARKS.md,
"Serving fast").
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

GRAPH_FILE = "model.pt"
WORKERS_SETTING = "SAGEMAKER_MODEL_SERVER_WORKERS"  # the inference toolkit's: TorchServe's workers per model


def export(net: torch.nn.Module, image_size: int, views: int = 4) -> torch.jit.ScriptModule:
    """`net` traced on CPU on a batch of one photo's `views` and frozen; it answers any batch size."""
    net = net.to("cpu").eval()
    example = torch.zeros(views, 3, image_size, image_size)
    with torch.no_grad():
        return torch.jit.freeze(torch.jit.trace(net, example))


def save(graph: torch.jit.ScriptModule, model_dir: Path) -> Path:
    path = Path(model_dir) / GRAPH_FILE
    torch.jit.save(graph, str(path))
    return path


def load(model_dir: Path, card: dict) -> torch.jit.ScriptModule:
    """The model's serving graph, ready for CPU inference."""
    path = Path(model_dir) / GRAPH_FILE
    if path.is_file():
        graph = torch.jit.load(str(path), map_location="cpu")
    else:
        graph = export(rebuild(model_dir, card), card["preprocessing"]["resize"][0])
    if torch.backends.mkldnn.is_available():
        graph = torch.jit.optimize_for_inference(graph)
    return graph


def rebuild(model_dir: Path, card: dict) -> torch.nn.Module:
    """The network of `model.pth`, as train.py built it (for archives without the graph file)."""
    import backbones  # imports torchvision: only archives without model.pt pay for it

    net = backbones.build_model(card["backbone"], len(card["classes"]), weights="none", head=card.get("head", "linear"))
    state = torch.load(Path(model_dir) / "model.pth", map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.eval()


def worker_threads(environ: Mapping[str, str] | None = None, cpus: int | None = None) -> int:
    """Threads for one model worker: its share of the cores, so that workers x threads never exceeds
    them. TorchServe starts one worker per logical CPU unless SAGEMAKER_MODEL_SERVER_WORKERS says
    otherwise; each of them would otherwise take every core for itself."""
    environ = os.environ if environ is None else environ
    cpus = cpus or len(os.sched_getaffinity(0))
    raw = environ.get(WORKERS_SETTING) or ""
    try:
        workers = int(raw) if raw else cpus
    except ValueError as exc:
        raise ValueError(f"{WORKERS_SETTING}={raw!r} is not a whole number of workers") from exc
    if workers < 1:
        raise ValueError(f"{WORKERS_SETTING}={raw!r}: a model needs at least one worker")
    return max(1, cpus // workers)


def set_threads(environ: Mapping[str, str] | None = None) -> int:
    """Give this process its share of the cores, unless OMP_NUM_THREADS already decides."""
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = worker_threads(environ)
    torch.set_num_threads(threads)
    return threads
