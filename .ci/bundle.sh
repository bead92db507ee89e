#!/usr/bin/env bash
# Assembles the runtime layout of the Docker image into a directory:
#
#   OUT/bin/stereo-recon          the server (RUNPATH rewritten to $ORIGIN/../lib)
#   OUT/lib/*.so*                 libtorch 2.11.0 + the CUDA/cuDNN user-space libraries it needs
#   OUT/models/psmnet_kitti2015.{pt,json}
#   OUT/static/  OUT/data/
#   OUT/MANIFEST                  every file with its size
#
# The Dockerfile's builder stage runs this and the runtime stage copies OUT to
# /opt/stereo-recon; CI runs it too (tests/bundle.rs) and starts the server from
# OUT with an empty environment, so a library left out here fails a test instead
# of a deployment. Templates are not copied: askama compiles them into the binary.
#
# The libraries come from the PyPI torch wheel (torch/lib and nvidia/*/lib in the
# venv) and are chosen by walking DT_NEEDED from the binary, plus the libraries
# libtorch and cuDNN open with dlopen (listed below), so nothing the server cannot
# load is shipped and nothing it loads is missing. Any dependency found neither in
# the wheel nor in SYSTEM_LIBS stops the script.
#
# usage: .ci/bundle.sh --binary PATH --out DIR [--model PATH] [--link]
#   --link     hard-link the libraries instead of copying (fast, same filesystem only)
# env: PYTHON (a python with torch==2.11.0; default python3), PATCHELF (default patchelf)
set -euo pipefail

binary=""
out=""
model="models/psmnet_kitti2015.pt"
link=0
while (($#)); do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --model) model="$2"; shift 2 ;;
        --link) link=1; shift ;;
        -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "bundle: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ -n "$binary" && -n "$out" ]] || { echo "bundle: --binary and --out are required" >&2; exit 2; }
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"
patchelf="${PATCHELF:-patchelf}"
sidecar="${model%.pt}.json"
for f in "$binary" "$model" "$sidecar"; do
    [[ -f "$f" ]] || { echo "bundle: $f is missing (make release / make model)" >&2; exit 1; }
done
command -v "$patchelf" >/dev/null || { echo "bundle: $patchelf not found (make tools)" >&2; exit 1; }
command -v readelf >/dev/null || { echo "bundle: readelf (binutils) not found" >&2; exit 1; }

# Where the wheel keeps its libraries.
torch_dir="$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
torch_version="$("$python" -c 'import torch; print(torch.__version__)')"
site="$(dirname "$torch_dir")"
search=("$torch_dir/lib")
for d in "$site"/nvidia/*/lib; do
    [[ -d "$d" ]] && search+=("$d")
done

# Provided by the runtime image's Debian (glibc, libstdc++) or, for libcuda, by
# the host driver through the NVIDIA container toolkit.
SYSTEM_LIBS=" libc.so.6 libm.so.6 libdl.so.2 librt.so.1 libpthread.so.0 libutil.so.1 ld-linux-x86-64.so.2 \
libstdc++.so.6 libgcc_s.so.1 libz.so.1 libcuda.so.1 "

# Opened with dlopen, so no DT_NEEDED leads to them:
# - libcaffe2_nvrtc.so: NVRTC for TorchScript's CUDA fusion of elementwise ops;
# - libtorch_cuda_linalg.so: CUDA linear algebra, loaded on first use;
# - cuDNN 9's engine and op libraries, loaded by libcudnn.so.9 on demand;
# - libnvrtc-builtins: loaded by NVRTC at compile time.
DLOPENED=(libcaffe2_nvrtc.so libtorch_cuda_linalg.so "libcudnn_*.so.9" "libnvrtc-builtins.so.*")

find_lib() {
    local name="$1" d
    for d in "${search[@]}"; do
        if [[ -f "$d/$name" ]]; then
            echo "$d/$name"
            return 0
        fi
    done
    return 1
}

needed_of() {
    readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'
}

declare -A chosen=()   # soname -> path in the wheel
queue=()
for pattern in "${DLOPENED[@]}"; do
    found=0
    for d in "${search[@]}"; do
        for f in "$d"/$pattern; do
            [[ -f "$f" ]] || continue
            queue+=("$f")
            found=1
        done
    done
    ((found)) || { echo "bundle: no $pattern in the torch wheel ($torch_version)" >&2; exit 1; }
done
for name in $(needed_of "$binary"); do
    if [[ "$SYSTEM_LIBS" == *" $name "* ]]; then continue; fi
    path="$(find_lib "$name")" || { echo "bundle: $binary needs $name, found nowhere" >&2; exit 1; }
    queue+=("$path")
done
while ((${#queue[@]})); do
    path="${queue[0]}"
    queue=("${queue[@]:1}")
    name="$(basename "$path")"
    [[ -n "${chosen[$name]:-}" ]] && continue
    chosen[$name]="$path"
    for dep in $(needed_of "$path"); do
        [[ -n "${chosen[$dep]:-}" ]] && continue
        if [[ "$SYSTEM_LIBS" == *" $dep "* ]]; then continue; fi
        dep_path="$(find_lib "$dep")" || { echo "bundle: $name needs $dep, found nowhere" >&2; exit 1; }
        queue+=("$dep_path")
    done
done

rm -rf "$out"
mkdir -p "$out/bin" "$out/lib" "$out/models"
for name in "${!chosen[@]}"; do
    if ((link)); then
        ln "${chosen[$name]}" "$out/lib/$name" 2>/dev/null || cp "${chosen[$name]}" "$out/lib/$name"
    else
        cp "${chosen[$name]}" "$out/lib/$name"
    fi
done

# Reproducible lib/: every file and the folder carry the wheel's lib folder's
# timestamp, so the image layer made from lib/ is byte-identical from one build to
# the next while the venv is unchanged (a source edit changes bin/ only). Not in
# --link mode: the hard links share their inode with the venv's files.
if ((!link)); then
    find "$out/lib" -exec touch -h -r "$torch_dir/lib" {} +
fi

cp "$binary" "$out/bin/stereo-recon"
# build.rs points RUNPATH at the venv's torch/lib; the bundle must never reach back
# there, so the binary finds its libraries next to itself and nowhere else. The
# libraries keep their own RUNPATH ($ORIGIN first), which now finds their siblings.
"$patchelf" --set-rpath '$ORIGIN/../lib' "$out/bin/stereo-recon"
cp "$model" "$sidecar" "$out/models/"
cp -R static data "$out/"

# Everything resolves inside the bundle (or is a system library)?
missing="$(env -i LD_LIBRARY_PATH="$out/lib" ldd "$out/bin/stereo-recon" | grep 'not found' || true)"
if [[ -n "$missing" ]]; then
    echo "bundle: unresolved libraries:" >&2
    echo "$missing" >&2
    exit 1
fi
for name in "${!chosen[@]}"; do
    missing="$(env -i LD_LIBRARY_PATH="$out/lib" ldd "$out/lib/$name" | grep 'not found' | grep -v 'libcuda.so.1' || true)"
    if [[ -n "$missing" ]]; then
        echo "bundle: $name has unresolved libraries:" >&2
        echo "$missing" >&2
        exit 1
    fi
done

(cd "$out" && find . -type f -printf '%s\t%p\n' | sort -k2 > MANIFEST)
total="$(du -sh --apparent-size "$out" | cut -f1)"
echo "bundle: $out ($total; ${#chosen[@]} libraries from torch $torch_version)"
