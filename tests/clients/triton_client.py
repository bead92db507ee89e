"""Drives the server's Open Inference Protocol with NVIDIA's own client,
tritonclient[http] (run by tests/open_inference.rs against a live server).

Prints one JSON object with what it saw; the Rust test asserts on it.
usage: triton_client.py HOST:PORT LEFT.png RIGHT.png
"""

import json
import sys
import urllib.request
import uuid

import numpy as np
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

MODEL = "psmnet-kitti2015"


def read_pfm(data: bytes) -> np.ndarray:
    """A greyscale PFM: 'Pf', 'W H', scale (negative = little-endian), rows bottom to top."""
    lines = data.split(b"\n", 3)
    assert lines[0].strip() == b"Pf", lines[0]
    width, height = map(int, lines[1].split())
    scale = float(lines[2])
    dtype = "<f4" if scale < 0 else ">f4"
    values = np.frombuffer(lines[3], dtype=dtype, count=width * height).reshape(height, width)
    return np.flipud(values)


def api_v1_pfm(address: str, left: bytes, right: bytes, fmt: str = "pfm") -> np.ndarray:
    """The same pair through our own API, as float32 PFM (the disparity, or with
    fmt="uncertainty" its standard deviation)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, payload in (("left", left), ("right", right)):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
            "Content-Type: image/png\r\n\r\n".encode() + payload + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        f"http://{address}/api/v1/disparity?format={fmt}",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        return read_pfm(answer.read())


def pair_inputs(left: np.ndarray, right: np.ndarray, binary: bool) -> list:
    inputs = []
    for name, array in (("left", left), ("right", right)):
        tensor = httpclient.InferInput(name, list(array.shape), "UINT8")
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return inputs


def infer(client, left: np.ndarray, right: np.ndarray, binary: bool) -> np.ndarray:
    outputs = [httpclient.InferRequestedOutput("disparity", binary_data=binary)]
    result = client.infer(MODEL, pair_inputs(left, right, binary), outputs=outputs, request_id="pair-1")
    assert result.get_response()["id"] == "pair-1"
    assert result.as_numpy("uncertainty") is None, "only the disparity was asked for"
    return result.as_numpy("disparity")


def main() -> None:
    address, left_path, right_path = sys.argv[1:4]
    left_png, right_png = open(left_path, "rb").read(), open(right_path, "rb").read()
    left = np.asarray(Image.open(left_path).convert("RGB"), dtype=np.uint8)
    right = np.asarray(Image.open(right_path).convert("RGB"), dtype=np.uint8)
    client = httpclient.InferenceServerClient(url=address, network_timeout=120.0, connection_timeout=120.0)
    seen = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(MODEL),
        "server": client.get_server_metadata(),
        "model": client.get_model_metadata(MODEL),
    }
    reference = api_v1_pfm(address, left_png, right_png)
    for binary in (False, True):
        disparity = infer(client, left, right, binary)
        key = "binary" if binary else "json"
        seen[f"{key}_shape"] = list(disparity.shape)
        seen[f"{key}_dtype"] = str(disparity.dtype)
        seen[f"{key}_max_abs_diff"] = float(np.max(np.abs(disparity - reference)))
    # No outputs named: the protocol's "all of them", the deviation in binary beside the
    # disparity in JSON when asked that way.
    sigma_reference = api_v1_pfm(address, left_png, right_png, "uncertainty")
    result = client.infer(MODEL, pair_inputs(left, right, True))
    names = [o["name"] for o in result.get_response()["outputs"]]
    seen["default_outputs"] = names
    seen["default_uncertainty_max_abs_diff"] = float(np.max(np.abs(result.as_numpy("uncertainty") - sigma_reference)))
    seen["default_disparity_max_abs_diff"] = float(np.max(np.abs(result.as_numpy("disparity") - reference)))
    mixed = [
        httpclient.InferRequestedOutput("uncertainty", binary_data=True),
        httpclient.InferRequestedOutput("disparity", binary_data=False),
    ]
    result = client.infer(MODEL, pair_inputs(left, right, False), outputs=mixed)
    seen["mixed_uncertainty_max_abs_diff"] = float(np.max(np.abs(result.as_numpy("uncertainty") - sigma_reference)))
    seen["mixed_disparity_max_abs_diff"] = float(np.max(np.abs(result.as_numpy("disparity") - reference)))
    # Errors: the protocol's error object, through the client's exception.
    errors = {}
    try:
        wrong = httpclient.InferInput("left", [2, 2, 3], "FP32")
        wrong.set_data_from_numpy(np.zeros((2, 2, 3), dtype=np.float32))
        client.infer(MODEL, [wrong])
    except InferenceServerException as e:
        errors["wrong_datatype"] = [e.status(), e.message()]
    try:
        client.infer(MODEL, pair_inputs(left, right, True), outputs=[httpclient.InferRequestedOutput("depth")])
    except InferenceServerException as e:
        errors["unknown_output"] = [e.status(), e.message()]
    try:
        client.get_model_metadata("no-such-model")
    except InferenceServerException as e:
        errors["unknown_model"] = [e.status(), e.message()]
    seen["errors"] = errors
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
