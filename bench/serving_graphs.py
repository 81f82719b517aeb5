"""Ways to run the published network on one photo's four test-time views, side by side in one run, on
1 and 2 threads: what serving_graph.py chose (a frozen TorchScript graph with oneDNN's kernels) against
the eager network and the other candidates.

  PYTHONPATH=sagemaker_code .venv-container/bin/python -m bench.serving_graphs --model models/bin-counter.tar.gz \\
      [--extra-path /tmp/ortlib]  # a folder with onnx and onnxruntime, to add those rows

Every variant runs the same normalised batch (00010.jpg's four views) in turn, --runs times after a
warm-up, in this process (the batching rows repeat it and divide by their photos); rows it cannot
build (int8 without a quantised engine, ONNX Runtime not importable) are left out with the reason.
The max. difference of each variant's class probabilities from the eager network's is printed
beside its p50.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tarfile
import tempfile
from pathlib import Path

from bench.serving_speed import p50, timed

ROOT = Path(__file__).resolve().parents[1]


def variants(net, views, torch, extra_path: str | None) -> dict:
    """name -> a callable running the four views (or the reason it could not be built)."""
    import serving_graph

    found: dict = {
        "eager, a pass per view (the baseline's way)": lambda: torch.cat([net(v[None]) for v in views]),
        "eager, the views as one batch": lambda: net(views),
    }
    channels_last = copy.deepcopy(net).to(memory_format=torch.channels_last)
    views_cl = views.contiguous(memory_format=torch.channels_last)
    found["eager, one batch, channels-last"] = lambda: channels_last(views_cl)
    frozen = serving_graph.export(copy.deepcopy(net), views.shape[-1], len(views))
    found["TorchScript traced and frozen"] = lambda: frozen(views)
    optimized = torch.jit.optimize_for_inference(serving_graph.export(copy.deepcopy(net), views.shape[-1], len(views)))
    found["frozen + optimize_for_inference (oneDNN): served"] = lambda: optimized(views)
    # Server-side batching would put several requests' views in one pass: per photo, is that cheaper?
    for photos in (2, 4):
        many = views.repeat(photos, 1, 1, 1)
        found[f"served, {photos} photos' views in one pass, per photo"] = (
            lambda m=many, n=photos: optimized(m)[: len(views)],
            photos,
        )
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        for engine in ("x86", "onednn"):
            torch.backends.quantized.engine = engine
            prepared = prepare_fx(copy.deepcopy(net), get_default_qconfig_mapping(engine), (views,))
            prepared(views)  # calibration on the same photo: a speed measurement, not a quality one
            quantized = torch.jit.freeze(torch.jit.trace(convert_fx(prepared), views))
            found[f"int8 (FX post-training, {engine} engine), frozen"] = lambda q=quantized: q(views)
    except (RuntimeError, ImportError) as exc:
        found["int8"] = f"not built: {exc}"
    if extra_path:
        sys.path.append(extra_path)
        try:
            import onnxruntime

            path = Path(tempfile.mkdtemp()) / "model.onnx"
            torch.onnx.export(net, views, str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}})
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            array = views.numpy()
            found[f"ONNX Runtime {onnxruntime.__version__}"] = lambda: torch.from_numpy(
                session.run(None, {"x": array})[0]
            )
        except Exception as exc:  # a row left out, with why
            found["ONNX Runtime"] = f"not built: {type(exc).__name__}: {exc}"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "bin-counter.tar.gz"), help="a model.tar.gz")
    parser.add_argument(
        "--photo",
        default=str(ROOT.parent / "shared" / "abid" / "bin-images" / "00010.jpg"),
        help="the photo whose views are run",
    )
    parser.add_argument("--runs", type=int, default=30, help="timed runs per variant")
    parser.add_argument("--extra-path", default=None, help="a folder holding onnx and onnxruntime")
    args = parser.parse_args()
    import torch

    import inference
    import preprocessing
    import serving_graph

    with tempfile.TemporaryDirectory() as work:
        with tarfile.open(args.model) as archive:
            archive.extractall(work, filter="data")
        card = json.loads((Path(work) / "model_card.json").read_text())
        net = serving_graph.rebuild(Path(work), card)
    image = preprocessing.normalize(preprocessing.decode(Path(args.photo).read_bytes(), 224).unsqueeze(0).float() / 255)
    views = torch.cat([inference.mirrored(image, view) for view in inference.TTA_VIEWS["flips"]])
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            reference = torch.softmax(net(views), 1)
            for name, run in variants(net, views, torch, args.extra_path).items():
                if isinstance(run, str):
                    rows.append((name, threads, run, ""))
                    continue
                run, per = run if isinstance(run, tuple) else (run, 1)
                difference = f"{(torch.softmax(run().float(), 1) - reference).abs().max().item():.1e}"
                rows.append((name, threads, round(p50(timed(run, args.runs)) / per, 1), difference))
                print(
                    json.dumps(
                        {
                            "variant": name,
                            "threads": threads,
                            "p50_ms": rows[-1][2],
                            "max_probability_difference": difference,
                        }
                    ),
                    flush=True,
                )
    print("\n| the four views of one photo | threads | p50 ms | max. difference of the probabilities |")
    print("| --- | --- | --- | --- |")
    for name, threads, value, difference in rows:
        print(f"| {name} | {threads} | {value} | {difference} |")


if __name__ == "__main__":
    main()
