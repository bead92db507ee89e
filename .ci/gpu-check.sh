#!/usr/bin/env bash
# One full check of a release build on a GPU machine (the `device` tool's H100),
# in one call, writing everything under OUT for the session to read:
#
#   - starts `target/release/stereo-recon serve` against the machine's own torch
#     (LD_LIBRARY_PATH = that torch's lib), waits for ready, logs the model info;
#   - times KITTI-sized requests (the shared kitti_000001 pair when the checkout has
#     ../shared or shared/, else data/synthetic) as pfm and json, from Server-Timing;
#   - one Open Inference Protocol inference (JSON tensors) through curl;
#   - scrapes /metrics, keeping the CUDA allocator series (stereo_recon_cuda_*),
#     which only a GPU can show;
#   - SIGTERM and the exit status.
#
# Build here first (`cargo build --release`), then, with the device tool:
#   run(command=".ci/gpu-check.sh", carry=["target/release/stereo-recon"])
# (the model, models/psmnet_kitti2015.pt, is tracked and travels with the tree).
# Also runs on a CPU machine (DEVICE=cpu), which is how it was tested.
#
# env: OUT (default target/gpu-check), DEVICE (default cuda), PORT (default 5091),
#      REQUESTS (timed requests per format, default 10), BINARY (the server, default
#      target/release/stereo-recon), MODEL (default models/psmnet_kitti2015.pt)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-target/gpu-check}"
device="${DEVICE:-cuda}"
port="${PORT:-5091}"
requests="${REQUESTS:-10}"
mkdir -p "$out"
binary="${BINARY:-target/release/stereo-recon}"
model="${MODEL:-models/psmnet_kitti2015.pt}"
[[ -x "$binary" ]] || { echo "gpu-check: $binary missing (cargo build --release here, then carry it)" >&2; exit 1; }

torch_lib="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
pair=data/synthetic
for shared in ../shared/stereo/kitti_000001 shared/stereo/kitti_000001 target/gpu-bundle/shared/stereo/kitti_000001; do
    [[ -f "$shared/left.png" ]] && pair="$shared" && break
done
echo "pair: $pair  device: $device  torch lib: $torch_lib" | tee "$out/summary.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$out/summary.txt" 2>/dev/null || true

"$binary" serve --host 127.0.0.1 --port "$port" --device "$device" --warm-sizes 1242x375 --model "$model" \
    >"$out/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
    if curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v2/health/ready" | grep -q 200; then break; fi
    kill -0 "$server" 2>/dev/null || { echo "gpu-check: the server exited; see $out/server.log" >&2; exit 1; }
    sleep 0.5
done
curl -s "http://127.0.0.1:$port/api/v1/model" >"$out/model.json"
python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print("model:", m["device"], m["precision"], m["libtorch_version"])' \
    "$out/model.json" | tee -a "$out/summary.txt"

# Timed requests: the Server-Timing phases of each, then medians.
for format in pfm png16 uncertainty json; do
    : >"$out/timing-$format.txt"
    for i in $(seq 0 "$requests"); do
        curl -s -o /dev/null -D - -w 'client_ms %{time_total}\n' \
            -F "left=@$pair/left.png" -F "right=@$pair/right.png" \
            "http://127.0.0.1:$port/api/v1/disparity?format=$format" \
            | tr -d '\r' | grep -iE '^server-timing:|^client_ms' | tr '\n' ' ' >>"$out/timing-$format.txt"
        echo >>"$out/timing-$format.txt"
    done
done
python3 - "$out" >>"$out/summary.txt" <<'EOF'
import re, statistics, sys
out = sys.argv[1]
for fmt in ("pfm", "png16", "uncertainty", "json"):
    rows = [l for l in open(f"{out}/timing-{fmt}.txt") if l.strip()][1:]  # the first pays cold start
    phases = {}
    for row in rows:
        for name, ms in re.findall(r"(\w+);dur=([\d.]+)", row):
            phases.setdefault(name, []).append(float(ms))
        client = re.search(r"client_ms ([\d.]+)", row)
        if client:
            phases.setdefault("client", []).append(float(client.group(1)) * 1000)
    print(fmt, " ".join(f"{k} p50 {statistics.median(v):.1f} ms" for k, v in phases.items()), f"({len(rows)} requests)")
EOF

# One inference through the Open Inference Protocol (JSON tensors).
python3 - "$out/infer.json" <<'EOF'
import json, sys
# A small synthetic UINT8 pair keeps the JSON light: 64x128, textured, shifted by 3.
h, w = 64, 128
left = [(x * 37 + y * 11 + c * 5) % 256 for y in range(h) for x in range(w) for c in range(3)]
right = [((x + 3) * 37 + y * 11 + c * 5) % 256 for y in range(h) for x in range(w) for c in range(3)]
json.dump({"inputs": [
    {"name": "left", "shape": [h, w, 3], "datatype": "UINT8", "data": left},
    {"name": "right", "shape": [h, w, 3], "datatype": "UINT8", "data": right},
]}, open(sys.argv[1], "w"))
EOF
curl -s -H 'Content-Type: application/json' --data-binary "@$out/infer.json" \
    "http://127.0.0.1:$port/v2/models/psmnet-kitti2015/infer" -o "$out/infer-answer.json" -w 'v2 infer: %{http_code}\n' \
    | tee -a "$out/summary.txt"
rm -f "$out/infer.json"

curl -s "http://127.0.0.1:$port/metrics" >"$out/metrics.txt"
{
    echo "cuda series (none on CPU):"
    grep -E '^stereo_recon_cuda_' "$out/metrics.txt" || echo "  (none)"
    grep -E '^stereo_recon_model_info' "$out/metrics.txt"
} | tee -a "$out/summary.txt"

kill -TERM "$server"
status=0
wait "$server" || status=$?
trap - EXIT
echo "SIGTERM exit status: $status" | tee -a "$out/summary.txt"
