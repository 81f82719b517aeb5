"""The four serving handlers, as SageMaker's PyTorch inference container calls them."""

from __future__ import annotations

import base64
import json

import pytest

from tests.conftest import REQUEST_FAULTS, make_bin_image

import api_contract
import inference


@pytest.fixture(scope="module")
def served(trained_model):
    model_dir, _ = trained_model
    return inference.model_fn(str(model_dir))


def invoke(model, body, content_type="image/jpeg", accept="application/json") -> dict:
    """input_fn -> predict_fn -> output_fn, as the container's transformer chains them."""
    data = inference.input_fn(body, content_type)
    prediction = inference.predict_fn(data, model)
    payload, response_type = inference.output_fn(prediction, accept)
    assert response_type == "application/json"
    return json.loads(payload)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def check_prediction(p: dict) -> None:
    assert p["count"] in (0, 1, 2, 3)
    assert len(p["probabilities"]) == 4
    assert abs(sum(p["probabilities"]) - 1) < 1e-3
    # The model card asks for median decoding (train.py's default): the count where the cumulative
    # probability reaches one half, and its own probability as the confidence.
    assert p["confidence"] == p["probabilities"][p["count"]]
    cumulative = [sum(p["probabilities"][: i + 1]) for i in range(len(p["probabilities"]))]
    assert p["count"] == next(i for i, c in enumerate(cumulative) if c >= 0.5 - 1e-4)
    assert 0 <= p["expected_count"] <= 3


@pytest.mark.parametrize("content_type", ["image/jpeg", "application/x-image", "image/jpeg; charset=binary"])
def test_jpeg_body(served, content_type):
    answer = invoke(served, make_bin_image(2, 1), content_type)
    check_prediction(answer)
    assert answer["model_version"] == "bin-count-test-job"


def test_png_body(served):
    check_prediction(invoke(served, make_bin_image(1, 2, fmt="PNG"), "image/png"))


def test_large_original_photo_is_resized(served):
    check_prediction(invoke(served, make_bin_image(3, 3, size=(1600, 1200))))


def test_json_single_image(served):
    answer = invoke(served, json.dumps({"image": b64(make_bin_image(1, 4))}), "application/json")
    check_prediction(answer)


def test_json_list_of_images(served):
    images = [b64(make_bin_image(c, 10 + c)) for c in range(3)]
    answer = invoke(served, json.dumps({"images": images, "expected": [0, 1, 2]}).encode(), "application/json")
    assert len(answer["predictions"]) == 3
    for p in answer["predictions"]:
        check_prediction(p)
    assert answer["model_version"] == "bin-count-test-job"


def test_same_image_same_answer_alone_or_in_a_batch(served):
    image = make_bin_image(2, 99)
    alone = invoke(served, image)
    batch = invoke(served, json.dumps({"images": [b64(make_bin_image(0, 5)), b64(image)]}), "application/json")
    assert batch["predictions"][1]["probabilities"] == pytest.approx(alone["probabilities"], abs=1e-4)


@pytest.mark.parametrize(
    ("name", "body", "content_type", "code"), REQUEST_FAULTS, ids=[case[0] for case in REQUEST_FAULTS]
)
def test_bad_input_is_a_client_error_with_the_tables_code(served, name, body, content_type, code):
    with pytest.raises(inference.RequestError) as caught:
        invoke(served, body, content_type)
    error = caught.value
    assert (error.status_code, error.code) == (api_contract.ERRORS[code]["status"], code)
    assert 400 <= error.status_code < 500
    # The toolkit sends `message` as the body's first line and `phrase` as the reason line.
    assert "\n" not in error.message
    assert json.loads(error.message) == {"error": code, "message": error.detail}
    assert error.phrase == code
    # The worker survives: the next good request is answered.
    check_prediction(invoke(served, make_bin_image(1, 1)))


@pytest.mark.parametrize(
    ("name", "body", "content_type", "code"), REQUEST_FAULTS, ids=[case[0] for case in REQUEST_FAULTS]
)
def test_batch_jobs_get_a_refusal_as_an_answer_with_the_same_code(served, monkeypatch, name, body, content_type, code):
    # BIN_COUNTER_REFUSALS=answer, as the batch DAG's transform jobs run: one bad photo must not fail the job.
    monkeypatch.setenv(inference.REFUSALS_SETTING, "answer")
    answer = invoke(served, body, content_type)
    assert answer["error"] == code
    assert answer["status"] == api_contract.ERRORS[code]["status"]
    assert answer["message"] and answer["model_version"] == "bin-count-test-job"
    assert "count" not in answer
    check_prediction(invoke(served, make_bin_image(1, 1)))  # and good photos are counted as ever


def test_an_unknown_refusal_mode_is_a_clear_error(served, monkeypatch):
    monkeypatch.setenv(inference.REFUSALS_SETTING, "ignore")
    with pytest.raises(ValueError, match="BIN_COUNTER_REFUSALS='ignore': choose one of"):
        invoke(served, b"", "image/jpeg")


def test_unsupported_accept_type(served):
    with pytest.raises(inference.RequestError) as caught:
        invoke(served, make_bin_image(1, 1), accept="text/csv")
    assert (caught.value.status_code, caught.value.code) == (406, "unsupported_accept")


def test_errors_use_the_inference_toolkits_contract():
    # sagemaker_inference.errors.BaseInferenceToolkitError(status_code, message, phrase), or our stand-in
    # of it where the toolkit is not installed.
    error = inference.RequestError("too_large", what="image 0", size=5, limit=4)
    assert isinstance(error, inference.BaseInferenceToolkitError)
    assert error.args == (413, '{"error":"too_large","message":"image 0 is 5 bytes; the limit is 4"}', "too_large")
    assert str(error) == "413 too_large: image 0 is 5 bytes; the limit is 4"
    # Fields a message needs but the raiser did not give: the table's public message.
    assert inference.RequestError("too_large").detail == api_contract.ERRORS["too_large"]["message"]


def test_decodings_read_the_most_likely_the_median_and_the_expected_count():
    import torch

    probabilities = torch.tensor([[0.4, 0.2, 0.4], [0.1, 0.1, 0.8], [0.5, 0.0, 0.5], [0.0, 0.0, 1.0]])
    assert inference.decode(probabilities, "argmax").tolist() == [0, 2, 0, 2]
    assert inference.decode(probabilities, "median").tolist() == [1, 2, 0, 2]
    # Expected counts 1.0, 1.7, 1.0 and 2.0; 0.5 above a count rounds up.
    assert inference.decode(probabilities, "expected").tolist() == [1, 2, 1, 2]
    assert inference.decode(torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]), "expected").tolist() == [1, 2]
    with pytest.raises(ValueError, match="unknown decoding"):
        inference.decode(probabilities, "mode")


def test_flip_tta_averages_exactly_the_four_mirror_images():
    import torch

    # A "network" that looks at one halves only, so every mirror image gives another answer.
    def net(batch):
        return batch[:, 0, 0, :3] * 5

    images = torch.rand(2, 3, 4, 4)
    views = [images, images.flip(3), images.flip(2), images.flip(2).flip(3)]
    expected = sum(torch.softmax(net(v), 1) for v in views) / 4
    assert torch.allclose(inference.class_probabilities(net, images, "flips"), expected)
    assert torch.allclose(inference.class_probabilities(net, images, "none"), torch.softmax(net(images), 1))


def test_with_flip_tta_a_photo_and_its_mirror_image_get_the_same_answer(served):
    import io

    from PIL import Image, ImageOps

    # A network that compares the image's halves, so a mirror image changes its answer.
    def halves(batch):
        import torch

        half = batch.shape[3] // 2
        halves = [batch[..., :half], batch[..., half:], batch[..., :half, :], batch[..., half:, :]]
        return torch.stack([h.mean(dim=(1, 2, 3)) for h in halves], dim=1) * 20

    photo = make_bin_image(3, 11, (64, 64), "PNG")
    mirrored = io.BytesIO()
    ImageOps.mirror(Image.open(io.BytesIO(photo))).save(mirrored, "PNG")

    def answers(tta: str) -> tuple[dict, dict]:
        model = {**served, "model": halves, "card": {**served["card"], "test_time_augmentation": tta}}
        return invoke(model, photo, "image/png"), invoke(model, mirrored.getvalue(), "image/png")

    plain, plain_mirrored = answers("none")
    assert plain["probabilities"] != pytest.approx(plain_mirrored["probabilities"], abs=1e-3)
    original, flipped = answers("flips")
    assert original["probabilities"] == pytest.approx(flipped["probabilities"], abs=1e-4)
    assert original["count"] == flipped["count"]
