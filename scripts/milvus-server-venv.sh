#!/usr/bin/env bash
# A small virtual environment that only runs a Milvus server for the tests: PyPI's `milvus` package
# ("embedded Milvus", the real standalone binary with an embedded etcd), kept apart from the
# project's environment. The tests (tests/fixtures/milvus_server.py) find it at .milvus-venv/ or at
# $COMPIR_MILVUS_VENV, and skip with the reason where it is missing.
#
#   scripts/milvus-server-venv.sh              # into .milvus-venv/ (15-40 s, 330 MB)
#   COMPIR_MILVUS_VENV=/opt/mv scripts/milvus-server-venv.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${COMPIR_MILVUS_VENV:-$root/.milvus-venv}"
python3 -m venv --clear "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "milvus==${MILVUS_SERVER_VERSION:-2.3.5}"
# The package ships its binaries lzma-compressed and unpacks them at each start: unpack them once here.
"$venv/bin/python" "$root/tests/fixtures/milvus_launch.py" unpack "$venv/milvus"
echo "milvus server venv: $venv ($("$venv/bin/python" -c 'import milvus; print(milvus.__version__)'))"
