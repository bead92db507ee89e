"""Streams stereo frames to the server's WebSocket with the `websockets` package
(run by tests/stream.rs against a live server).

usage: stream_client.py HOST:PORT FRAMES_DIR frames|flood

FRAMES_DIR holds frame_K.png (side by side), left_K.png, right_K.png and
truth_K.pfm (the exact disparity of the left view) for K = 0, 1, ...

- frames: one frame at a time, each answer awaited; for each frame, the
  stream's PFM against the ground truth (EPE) and against POST
  /api/v1/disparity?format=pfm for the same pair (max difference).
- flood: 30 frames sent without waiting; then answers are read until every
  frame is answered or counted as dropped.

Prints one JSON object with what it saw; the Rust test asserts on it.
"""

import asyncio
import base64
import json
import sys
import urllib.request
from pathlib import Path

import numpy as np
import websockets


def read_pfm(data: bytes) -> np.ndarray:
    lines = data.split(b"\n", 3)
    assert lines[0].strip() == b"Pf", lines[0]
    width, height = map(int, lines[1].split())
    dtype = "<f4" if float(lines[2]) < 0 else ">f4"
    values = np.frombuffer(lines[3], dtype=dtype, count=width * height).reshape(height, width)
    return np.flipud(values)


def api_pfm(address: str, left: bytes, right: bytes) -> np.ndarray:
    body = json.dumps({"left": base64.b64encode(left).decode(), "right": base64.b64encode(right).decode()})
    request = urllib.request.Request(f"http://{address}/api/v1/disparity?format=pfm", data=body.encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return read_pfm(answer.read())


async def frames(address: str, folder: Path) -> dict:
    count = len(list(folder.glob("frame_*.png")))
    seen = []
    async with websockets.connect(f"ws://{address}/api/v1/stream", subprotocols=["stereo-recon"],
                                  max_size=None) as ws:
        protocol = ws.subprotocol
        await ws.send(json.dumps({"format": "pfm", "layout": "sbs"}))
        for k in range(count):
            await ws.send((folder / f"frame_{k}.png").read_bytes())
            info = json.loads(await ws.recv())
            disparity = read_pfm(await ws.recv())
            truth = read_pfm((folder / f"truth_{k}.pfm").read_bytes())
            valid = np.isfinite(truth)
            api = api_pfm(address, (folder / f"left_{k}.png").read_bytes(), (folder / f"right_{k}.png").read_bytes())
            seen.append({
                "frame": info["frame"],
                "dropped": info["dropped"],
                "shape": list(disparity.shape),
                "epe": float(np.abs(disparity[valid] - truth[valid]).mean()),
                "max_diff_to_api": float(np.abs(disparity - api).max()),
            })
    return {"subprotocol": protocol, "frames": seen}


async def flood(address: str, folder: Path) -> dict:
    packed = [p.read_bytes() for p in sorted(folder.glob("frame_*.png"))]
    sent = 30
    answered, dropped, order = 0, 0, []
    async with websockets.connect(f"ws://{address}/api/v1/stream", max_size=None) as ws:
        await ws.send(json.dumps({"format": "color", "layout": "sbs"}))
        for k in range(sent):
            await ws.send(packed[k % len(packed)])
        while answered + dropped < sent:
            info = json.loads(await asyncio.wait_for(ws.recv(), 300))
            image = await ws.recv()
            assert image[:8] == b"\x89PNG\r\n\x1a\n", "a colour PNG"
            answered += 1
            dropped += info["dropped"]
            order.append(info["frame"])
    return {"sent": sent, "answered": answered, "dropped": dropped, "frames": order}


def main() -> None:
    address, folder, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    run = {"frames": frames, "flood": flood}[mode]
    print(json.dumps(asyncio.run(run(address, folder))))


if __name__ == "__main__":
    main()
