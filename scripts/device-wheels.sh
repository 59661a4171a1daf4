#!/usr/bin/env bash
# Prepare .whl/ here (with network) for the GPU test machine, which has Python 3.12 and torch 2.11
# but no open_clip, usearch or onnxruntime-gpu and cannot download (../shared/DEVICE.md). The small
# wheels travel with the working tree (at most 64 MiB per call); onnxruntime-gpu (~250 MB) is split
# into 60 MB parts, carried one per call to /tmp/ortgpu/ on the machine and joined by device-check.sh.
#
#   scripts/device-wheels.sh            # small wheels only
#   scripts/device-wheels.sh --ortgpu   # also download and split onnxruntime-gpu
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/.whl"
mkdir -p "$out"
target=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# --no-deps: torch and its CUDA libraries are on the machine already; these are what is missing.
# torchvision must match torch 2.11 (open_clip's transforms import it).
packages=(open_clip_torch ftfy wcwidth regex usearch tqdm "torchvision==${TORCHVISION_VERSION:-0.26.0}")
python3 -m pip download --quiet --no-deps "${target[@]}" --dest "$out" "${packages[@]}"
if [ "${1:-}" = "--ortgpu" ]; then
    scratch="$(mktemp -d)"
    python3 -m pip download --quiet --no-deps "${target[@]}" --dest "$scratch" "onnxruntime-gpu==${ORTGPU_VERSION:-1.30.0}"
    split -b 60M "$scratch"/onnxruntime_gpu-*.whl "$out/ortgpu.part."
    # The part count and the wheel's own name (pip checks a wheel's tags by its file name).
    echo "$(ls "$out"/ortgpu.part.* | wc -l) $(basename "$scratch"/onnxruntime_gpu-*.whl)" > "$out/ortgpu.parts"
    rm -rf "$scratch"
fi
du -sh "$out"/* | sort -h
