#!/usr/bin/env bash
# The GPU benchmark in one command: build on a CPU machine what a GPU machine
# needs, run it there against that machine's own torch 2.11.0 wheel (no Rust
# toolchain, no network), bring back the table and the JSON.
#
#   tests/bench/gpu.sh prepare   here (cargo, the venv, the model): builds the
#                                release server and the speed bench, strips them,
#                                and stages them with the model, the checkpoint and
#                                the shared pairs in target/gpu-bundle (kept under
#                                64 MiB with the working tree, so it copies quickly).
#                                Prints what to run on the GPU machine.
#   tests/bench/gpu.sh run       on the GPU machine, from the repository root, with
#                                target/gpu-bundle carried: writes everything under
#                                $OUT (default target/gpu-results).
#   tests/bench/gpu.sh           both, on a machine that has cargo and a GPU.
#
# On the GPU machine, after `prepare`, with target/gpu-bundle copied beside the
# working tree: tests/bench/gpu.sh run
#
# What `run` does, each stage's output in $OUT (STAGES picks, default all):
# Files written (eight, few enough to copy back by hand): summary.md (every stage's
# table, the machine, failures), bench.json, levers.json, accuracy.json,
# profile.json, profile.txt.
#   table     models/bench.py: (a) eager PyTorch fp32, (b) TorchScript from Python,
#             (c) the Rust engine as `serve` runs it by default, (d) full HTTP
#             requests (format=png16) with 1, 4 and 16 clients, at SIZES
#             -> bench.json
#   levers    the Rust engine's A/B: every lever on and off, all engines loaded at
#             once, timed passes interleaved (tests/bench/speed.rs --variants), with
#             each variant's largest difference from the first of its precision
#             -> levers.json
#   accuracy  `stereo-recon eval` of every shared pair and data/ pair on the GPU in
#             fp32, fp16 and bf16 (EPE, D1 per pair) -> accuracy-<precision>.json
#   profile   models/gpu_profile.py: torch.profiler of eager and TorchScript, and the
#             same levers from Python -> profile.txt, profile.json (PROFILE_ARGS="--only
#             inductor": just torch.compile's measurement, what AOTInductor would give)
#   graphs    the CUDA graph cache under changing sizes: a server with --cuda-graphs 2 gets
#             three image sizes in turn, five rounds (eager, eager, recorded, then the
#             least recently used shape evicted and recorded again...); every answer
#             (PFM) from round 3 on must equal byte for byte round 2's eager answer
#   batch     `stereo-recon batch` over 40 KITTI-sized pairs, --pipeline-depth 3 (as
#             shipped) against 1 (strictly sequential), alternating A B B A: seconds,
#             pairs/s and the engine's busy fraction from each run's summary.json
#   check     .ci/gpu-check.sh with the bundle's server: KITTI requests' Server-Timing
#             phases (pfm, png16, json), a v2 inference, the CUDA allocator series of
#             /metrics, SIGTERM -> its summary in summary.md
# env: OUT, STAGES, SIZES (default "384x1248 512x960"), ITERS (default 40),
#      VARIANTS (the levers' list; see below)
set -euo pipefail
cd "$(dirname "$0")/../.."
bundle=target/gpu-bundle
mode="${1:-all}"

prepare() {
    # shellcheck disable=SC1091
    [[ -n "${VIRTUAL_ENV:-}" ]] || { echo "gpu.sh prepare: activate the project's venv (make venv) first" >&2; exit 1; }
    export LIBTORCH_USE_PYTORCH=1
    make --no-print-directory model >&2
    cargo build --release --locked --bin stereo-recon >&2
    local speed
    speed="$(cargo bench --locked --bench speed --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "speed" and m.get("executable"):
        print(m["executable"])')"
    [[ -x "$speed" ]] || { echo "gpu.sh prepare: speed bench binary not found" >&2; exit 1; }
    rm -rf "$bundle"
    mkdir -p "$bundle"
    # Stripped and xz-compressed (19 MB of server becomes 4): the checkpoint and
    # the model (21 MB each, incompressible) take most of the 64 MiB.
    strip -o "$bundle/stereo-recon" target/release/stereo-recon
    strip -o "$bundle/speed" "$speed"
    xz -T0 -6 "$bundle/stereo-recon" "$bundle/speed"
    cp models/psmnet_kitti2015.pt models/psmnet_kitti2015.json "$bundle/"
    local checkpoint="${WEIGHTS:-${CACHE:-$HOME/.cache/stereo-recon}/weights/pretrained_model_KITTI2015.tar}"
    cp "$checkpoint" "$bundle/checkpoint.tar"
    if [[ -d ../shared/stereo ]]; then
        mkdir -p "$bundle/shared"
        cp -r ../shared/stereo "$bundle/shared/"
    fi
    # The device's checkout may not know this commit: say here what was built.
    echo "$(git rev-parse --short HEAD)$(git status --porcelain --untracked-files=no | grep -q . && echo ' + uncommitted changes')" \
        >"$bundle/COMMIT"
    local tree bundled
    tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
    bundled=$(du -sb "$bundle" | cut -f1)
    echo "bundle: $((bundled / 1048576)) MiB + working tree $((tree / 1048576)) MiB (limit 64 MiB)" >&2
    if (( bundled + tree > 64 * 1048576 )); then
        echo "gpu.sh prepare: the bundle is over 64 MiB" >&2
        exit 1
    fi
    echo 'now, on the GPU machine with target/gpu-bundle copied: tests/bench/gpu.sh run'
}

# The levers, each against the others in one run (see speed.rs --variants).
default_variants="precision=fp32,memory=contiguous,graphs=0,pinned=off;\
precision=fp32,memory=contiguous,graphs=0,pinned=on;\
precision=fp32,memory=contiguous,graphs=2,pinned=on;\
precision=fp32,memory=channels-last,graphs=2,pinned=on;\
precision=fp16,memory=contiguous,graphs=0,pinned=on;\
precision=fp16,memory=contiguous,graphs=2,pinned=on;\
precision=fp16,memory=channels-last,graphs=2,pinned=on;\
precision=bf16,memory=contiguous,graphs=2,pinned=on;\
precision=bf16,memory=channels-last,graphs=2,pinned=on"

run_device() {
    local out="${OUT:-target/gpu-results}" stages="${STAGES:-levers accuracy table profile graphs batch check}"
    local sizes="${SIZES:-384x1248 512x960}" iters="${ITERS:-40}"
    mkdir -p "$out"
    [[ -f "$bundle/stereo-recon.xz" ]] || { echo "gpu.sh run: $bundle missing (gpu.sh prepare, then carry it)" >&2; exit 1; }
    # Unpacked outside the bundle (a carried folder may be read-only there).
    local bin=/tmp/stereo-recon-gpu-bin
    mkdir -p "$bin"
    for program in stereo-recon speed; do
        python3 -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.open(sys.argv[1]).read())' \
            "$bundle/$program.xz" "$bin/$program"
        chmod +x "$bin/$program"
    done
    local torch_lib
    torch_lib="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" PYTHONUNBUFFERED=1
    export STEREO_RECON_BIN="$bin/stereo-recon" STEREO_RECON_MODEL="$bundle/psmnet_kitti2015.pt"
    {
        date -u +"date: %Y-%m-%dT%H:%M:%SZ"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
        python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())'
        echo "built from commit: $(cat "$bundle/COMMIT" 2>/dev/null || echo unknown)"
    } | tee "$out/summary.md"
    for stage in $stages; do
        echo "== $stage ($(date -u +%H:%M:%S)) ==" >&2
        # A stage that fails or hangs is reported and the next one still runs.
        ( run_stage "$stage" ) || echo "stage $stage FAILED (exit $?)" | tee -a "$out/summary.md"
    done
}

run_stage() {
    local stage="$1" limit="timeout --kill-after=10 ${STAGE_TIMEOUT:-300}"
    case "$stage" in
        table)
            # shellcheck disable=SC2086
            $limit python3 models/bench.py --checkpoint "$bundle/checkpoint.tar" --model "$bundle/psmnet_kitti2015.pt" \
                --device cuda --sizes $sizes --iters "$iters" --speed-cmd "$bin/speed" --json "$out/bench.json" \
                --requests-per-client "${REQUESTS_PER_CLIENT:-8}" | tee -a "$out/summary.md"
            ;;
        levers)
            $limit "$bin/speed" --device cuda --size "${LEVER_SIZE:-384x1248}" --iters "$iters" --clients "" \
                --model "$bundle/psmnet_kitti2015.pt" --variants "${VARIANTS:-$default_variants}" \
                --json "$out/levers.json" >/dev/null
            python3 - "$out/levers.json" <<'EOF' | tee -a "$out/summary.md"
import json, sys
rows = json.load(open(sys.argv[1]))["engine_variants"]
print("| variant | p50 ms | mean ms | upload p50 | forward p50 | download p50 | max diff px (vs) |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    p = r["phases_ms"]
    print(f"| {r['variant']} | {r['latency_ms']['p50']:.2f} | {r['latency_ms']['mean']:.2f} | {p['upload']['p50']:.2f} | "
          f"{p['forward']['p50']:.2f} | {p['download']['p50']:.2f} | {r['max_abs_diff_px']:.4f} ({r['max_abs_diff_px_vs']}) |")
EOF
            ;;
        accuracy)
            local pairs=(data)
            [[ -d "$bundle/shared/stereo" ]] && pairs=("$bundle/shared/stereo" data)
            local work=/tmp/stereo-recon-gpu-eval
            mkdir -p "$work"
            for precision in fp32 fp16 bf16; do
                $limit "$bin/stereo-recon" eval "${pairs[@]}" --json --device cuda --precision "$precision" \
                    --model "$bundle/psmnet_kitti2015.pt" >"$work/accuracy-$precision.json" 2>"$work/accuracy-$precision.log" \
                    || { echo "eval $precision failed"; grep -v Warning "$work/accuracy-$precision.log" | tail -3; }
            done
            python3 - "$work" "$out/accuracy.json" <<'EOF' | tee -a "$out/summary.md"
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
runs = {}
for p in ("fp32", "fp16", "bf16"):
    try:
        runs[p] = json.loads((work / f"accuracy-{p}.json").read_text())
    except Exception as e:
        print(f"{p}: no result ({e})")
Path(sys.argv[2]).write_text(json.dumps(runs, indent=1) + "\n")
def pairs(doc):
    return {r["name"]: r["metrics"] for r in doc.get("pairs", []) if r.get("metrics")}
base = pairs(runs.get("fp32", {}))
print("| pair | EPE fp32 | EPE fp16 (diff) | EPE bf16 (diff) | D1 fp32 % | D1 fp16 % | D1 bf16 % |")
print("|---|---|---|---|---|---|---|")
for name, r in base.items():
    cells = [f"{r['epe']:.4f}"]
    for p in ("fp16", "bf16"):
        o = pairs(runs.get(p, {})).get(name)
        cells.append(f"{o['epe']:.4f} ({o['epe'] - r['epe']:+.4f})" if o else "-")
    d1 = [f"{pairs(runs.get(p, {})).get(name, {}).get('d1', float('nan')):.2f}" for p in ("fp32", "fp16", "bf16")]
    print(f"| {name} | " + " | ".join(cells + d1) + " |")
EOF
            ;;
        profile)
            $limit python3 models/gpu_profile.py --checkpoint "$bundle/checkpoint.tar" \
                --model "$bundle/psmnet_kitti2015.pt" --size "${LEVER_SIZE:-384x1248}" --iters 30 ${PROFILE_ARGS:-} \
                --json "$out/profile.json" >"$out/profile.txt" 2>&1 || echo "profile failed (see profile.txt)"
            { grep -A3 "== profile" "$out/profile.txt"; sed -n '/^| precision | weights/,$p;/^| compiled/,$p' "$out/profile.txt"; } \
                | tee -a "$out/summary.md" || true
            ;;
        graphs)
            local dir=/tmp/stereo-recon-gpu-graphs port=5093
            rm -rf "$dir" && mkdir -p "$dir"
            python3 - "$dir" <<'EOF'
import sys
from PIL import Image
for w, h in ((512, 384), (640, 480), (800, 600)):
    for side in ("left", "right"):
        Image.open(f"data/synthetic/{side}.png").convert("RGB").resize((w, h)).save(f"{sys.argv[1]}/{side}_{w}x{h}.png")
EOF
            "$bin/stereo-recon" serve --host 127.0.0.1 --port "$port" --device cuda --cuda-graphs 2 \
                --model "$bundle/psmnet_kitti2015.pt" >"$dir/server.log" 2>&1 &
            local server=$!
            for _ in $(seq 1 240); do
                curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v2/health/ready" | grep -q 200 && break
                sleep 0.5
            done
            # Round 1 at a size is TorchScript's profiling pass (unoptimised graph, so its
            # rounding may differ); round 2 is the optimised eager pass every later round,
            # recorded or replayed, must equal byte for byte.
            local mismatches=0 answers=0 first_differs=0
            for round in 1 2 3 4 5; do
                for size in 512x384 640x480 800x600; do
                    curl -s -f -o "$dir/answer_${size}_$round.pfm" -F "left=@$dir/left_$size.png" \
                        -F "right=@$dir/right_$size.png" "http://127.0.0.1:$port/api/v1/disparity?format=pfm" \
                        || echo "request $size round $round failed"
                    answers=$((answers + 1))
                    if ((round == 2)); then
                        cmp -s "$dir/answer_${size}_1.pfm" "$dir/answer_${size}_2.pfm" || first_differs=$((first_differs + 1))
                    elif ((round > 2)); then
                        cmp -s "$dir/answer_${size}_2.pfm" "$dir/answer_${size}_$round.pfm" \
                            || { mismatches=$((mismatches + 1)); echo "$size round $round differs from round 2"; }
                    fi
                done
            done
            curl -s "http://127.0.0.1:$port/metrics" | grep -E '^stereo_recon_cuda_' || true
            kill -TERM "$server"
            wait "$server" || true
            {
                echo "graphs: $answers answers at 3 sizes; rounds 3-5 (recorded, replayed, evicted and recorded again)"
                echo "  differing from round 2 (eager, optimised): $mismatches of 9"
                echo "  sizes whose round 1 (profiling pass) differs from round 2: $first_differs of 3"
                grep -v Warning "$dir/server.log" | grep -E "CUDA graph|recorded|dropped" | cut -c1-200
            } | tee -a "$out/summary.md"
            ;;
        batch)
            local dir=/tmp/stereo-recon-gpu-batch
            rm -rf "$dir" && mkdir -p "$dir/pairs/left" "$dir/pairs/right"
            python3 - "$dir/pairs" <<'EOF'
import sys
from PIL import Image
left = Image.open("data/synthetic/left.png").convert("RGB").resize((1300, 375))
right = Image.open("data/synthetic/right.png").convert("RGB").resize((1300, 375))
for k in range(40):  # 40 distinct KITTI-sized pairs: the views cropped at moving offsets
    box = (k, 0, k + 1242, 375)
    left.crop(box).save(f"{sys.argv[1]}/left/f{k:03d}.png")
    right.crop(box).save(f"{sys.argv[1]}/right/f{k:03d}.png")
EOF
            {
                echo "batch: 40 pairs of 1242x375, png16 + color, cuda"
                echo "| pipeline depth | seconds | pairs/s | engine busy |"
                echo "|---|---|---|---|"
            } | tee -a "$out/summary.md"
            for depth in 3 1 1 3; do
                rm -rf "$dir/out"
                $limit "$bin/stereo-recon" batch "$dir/pairs" --out "$dir/out" --formats png16,color --device cuda \
                    --pipeline-depth "$depth" --model "$bundle/psmnet_kitti2015.pt" >"$dir/batch.log" 2>&1 \
                    || { echo "batch depth $depth failed"; tail -3 "$dir/batch.log"; continue; }
                python3 - "$dir/out/summary.json" "$depth" <<'EOF' | tee -a "$out/summary.md"
import json, sys
s = json.load(open(sys.argv[1]))
print(f"| {sys.argv[2]} | {s['seconds']:.2f} | {s['pairs_per_second']:.2f} | {100 * (s['engine_busy'] or 0):.1f} % |")
EOF
            done
            ;;
        check)
            rm -rf /tmp/stereo-recon-gpu-check
            OUT=/tmp/stereo-recon-gpu-check BINARY="$bin/stereo-recon" MODEL="$bundle/psmnet_kitti2015.pt" \
                $limit .ci/gpu-check.sh >/dev/null 2>&1 || echo "gpu-check failed"
            tee -a "$out/summary.md" </tmp/stereo-recon-gpu-check/summary.txt
            grep -v Warning /tmp/stereo-recon-gpu-check/server.log | tail -5
            ;;
        *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
}

case "$mode" in
prepare) prepare ;;
run) run_device ;;
all) prepare && run_device ;;
*) echo "usage: tests/bench/gpu.sh [prepare|run|all]" >&2; exit 2 ;;
esac
