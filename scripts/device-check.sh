#!/usr/bin/env bash
# The device check (compir/devicecheck.py): one line per check and a JSON summary.
#
#   scripts/device-check.sh --dry-run                       # the plan, runs nothing
#   scripts/device-check.sh --device cpu --models micro --steps 4 --cpu-steps 2   # the CPU rehearsal
#   scripts/device-check.sh --device cuda --summary device-check.json            # on the GPU test machine
#
# On the GPU test machine (../shared/DEVICE.md) compir is not installed and nothing can be
# downloaded: the wheels scripts/device-wheels.sh put in .whl/ (carried with the working tree) are
# installed into /tmp/compir-site, and onnxruntime-gpu, once all its parts were carried, into its
# own folder ahead of the CPU onnxruntime.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
site=/tmp/compir-site
path="$root"

if compgen -G "$root/.whl/*.whl" > /dev/null; then
    if [ ! -f "$site/.installed" ]; then
        "$python" -m pip install --quiet --no-index --no-deps --target "$site" "$root"/.whl/*.whl
        touch "$site/.installed"
    fi
    path="$path:$site"
fi

# onnxruntime-gpu arrives in parts, one per call (.whl/ortgpu.part.* plus .whl/ortgpu.parts: count, wheel name):
# each call stages its part in /tmp/ortgpu/ (kept while the machine stays warm); once all are there
# the wheel is joined and installed. `--stage` stages and exits (the calls that only carry a part).
if compgen -G "$root/.whl/ortgpu.part.*" > /dev/null; then
    mkdir -p /tmp/ortgpu
    cp "$root"/.whl/ortgpu.part.* /tmp/ortgpu/
    [ -f "$root/.whl/ortgpu.parts" ] && cp "$root/.whl/ortgpu.parts" /tmp/ortgpu/
fi
if [ "${1:-}" = "--stage" ]; then
    echo "staged: $(ls /tmp/ortgpu 2>/dev/null | tr '\n' ' ')"
    exit 0
fi
if [ -f /tmp/ortgpu/ortgpu.parts ]; then
    read -r want name < /tmp/ortgpu/ortgpu.parts
    have="$(ls /tmp/ortgpu/ortgpu.part.* 2>/dev/null | wc -l)"
    ortgpu=/tmp/compir-ortgpu
    if [ "$have" -lt "$want" ]; then
        echo "onnxruntime-gpu: $have of $want parts staged; the ort-cuda checks will skip" >&2
    else
        if [ ! -f "$ortgpu/.installed" ]; then
            wheel="/tmp/ortgpu/$name"
            cat /tmp/ortgpu/ortgpu.part.* > "$wheel"
            "$python" -m pip install --quiet --no-index --no-deps --target "$ortgpu" "$wheel"
            touch "$ortgpu/.installed"
        fi
        path="$ortgpu:$path"  # ahead of the CPU onnxruntime: the two share the module name
    fi
fi

export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m compir.devicecheck "$@"
