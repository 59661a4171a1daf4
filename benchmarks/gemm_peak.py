"""This CPU's multiply-accumulate rate on one thread, per data type: a large square GEMM.

- fp32: numpy's BLAS (OpenBLAS) and onnxruntime's MatMul (MLAS, what the fp32 graphs run);
- u8s8: onnxruntime's ``MatMulInteger`` (uint8 activations x int8 weights, int32 sums: what the
  int8-dynamic variant's ``DynamicQuantizeMatMul`` / ``MatMulInteger`` nodes run).

Measured in a child process with every BLAS / OpenMP pool at one thread (a pool's size is fixed
when numpy loads). The rate an encoder reaches is judged against these, on the same machine in the
same run. On AVX2 without VNNI, u8s8 runs ``vpmaddubsw`` + ``vpmaddwd`` (about 2x fp32's FMA rate
at best); AVX-512 VNNI's ``vpdpbusd`` does it in one instruction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

SIZE = 2048
ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def gemm_peaks(*, size: int = SIZE, repeats: int = 5) -> dict[str, float]:
    """{"fp32 numpy": G MAC/s, "fp32 onnxruntime": ..., "u8s8 onnxruntime": ...}: best of ``repeats``, one thread."""
    code = f"from benchmarks.gemm_peak import _measure; _measure({size}, {repeats})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                            env={**os.environ, **ONE_THREAD}, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"the GEMM peak measurement failed ({result.returncode}): {result.stderr[-1500:]}")
    peaks: dict[str, float] = json.loads(result.stdout.splitlines()[-1])
    return peaks


def _measure(size: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((size, size), dtype=np.float32), rng.standard_normal((size, size), dtype=np.float32)
    a8 = rng.integers(0, 256, (size, size), dtype=np.uint8)
    fp32, u8s8 = _ort_matmul(b, integer=False), _ort_matmul(rng.integers(-128, 128, (size, size), dtype=np.int8), integer=True)
    calls: dict[str, Callable[[], object]] = {
        "fp32 numpy": lambda: a @ b,
        "fp32 onnxruntime": lambda: fp32.run(None, {"a": a}),
        "u8s8 onnxruntime": lambda: u8s8.run(None, {"a": a8}),
    }
    macs = size**3
    print(json.dumps({name: macs / _best(call, repeats) / 1e9 for name, call in calls.items()}))


def _best(call: Callable[[], object], repeats: int) -> float:
    call()  # first-run allocations
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        runs.append(time.perf_counter() - start)
    return min(runs)  # the peak: the run least disturbed by other processes


def _ort_matmul(weights: np.ndarray, *, integer: bool) -> Any:
    """A one-node session ``a @ weights`` (MatMul, or MatMulInteger with uint8 ``a``) on one thread."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    op, a_type, out_type = (("MatMulInteger", TensorProto.UINT8, TensorProto.INT32) if integer
                            else ("MatMul", TensorProto.FLOAT, TensorProto.FLOAT))
    size = weights.shape[0]
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info("a", a_type, [size, size])],
        [helper.make_tensor_value_info("c", out_type, [size, size])],
        initializer=[numpy_helper.from_array(weights, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
