"""onnxruntime backend: the export's ONNX graphs on TensorRT EP, CUDA EP or CPU, in that order
of preference (configurable); :meth:`OrtBackend.info` reports which providers each session got."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compir.errors import ContractError
from compir.manifest import GraphSpec
from compir.runtime.backends.base import check_io

DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_ALIASES = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
            "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
# ONNX Runtime type strings -> manifest dtype names.
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def resolve_providers(requested: Sequence[str] | None) -> list[str]:
    """Requested providers (full names or tensorrt/cuda/cpu) that this onnxruntime build has, in order.

    ``None`` means TensorRT EP, CUDA EP, CPU. Asking only for unavailable ones is an error.
    """
    import onnxruntime

    available = set(onnxruntime.get_available_providers())
    wanted = [_ALIASES.get(name.lower(), name) for name in (requested or DEFAULT_PROVIDERS)]
    chosen = [name for name in wanted if name in available]
    if not chosen:
        raise ContractError(f"none of the providers {wanted} is available in this onnxruntime (it has {sorted(available)})")
    return chosen


def open_session(
    path: Path, *, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0, spinning: bool = True, what: str = "graph"
) -> Any:
    """An onnxruntime InferenceSession of the graph at ``path``: compir's one session factory
    (the runtime's sessions, export parity / accuracy / calibration and the benchmarks).

    ``threads=0``: onnxruntime's default pool size. ``spinning=False`` stops idle pool threads from
    busy-waiting (they would starve other compute sharing the cores). ContractError if it cannot load.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # TensorRT EP fallbacks are reported through info(), not stderr
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise ContractError(f"{what} {path} cannot be loaded by onnxruntime ({exc}); re-export it") from exc


class OrtSession:
    """One InferenceSession whose I/O was checked against the manifest."""

    def __init__(self, path: Path, spec: GraphSpec, *, providers: Sequence[str], threads: int = 0, spinning: bool = True) -> None:
        self._session = open_session(path, providers=providers, threads=threads, spinning=spinning, what=f"{spec.role} graph")
        self.spec = spec
        self.providers: list[str] = list(self._session.get_providers())
        check_io(
            spec,
            inputs=[(i.name, _ORT_TYPES.get(i.type, i.type), i.shape) for i in self._session.get_inputs()],
            outputs=[(o.name, _ORT_TYPES.get(o.type, o.type), o.shape) for o in self._session.get_outputs()],
        )

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs is not None else [o.name for o in self.spec.outputs]
        values = self._session.run(names, dict(feeds))
        return {name: np.asarray(value) for name, value in zip(names, values, strict=True)}


class OrtBackend:
    """Opens the graphs of one export folder with onnxruntime."""

    name = "onnxruntime"

    def __init__(self, export_dir: str | Path, *, providers: Sequence[str] | None = None, threads: int = 0, spinning: bool = True) -> None:
        self.export_dir = Path(export_dir)
        self.providers = resolve_providers(providers)
        self.threads = threads
        # Busy-waiting pool threads answer a single query sooner (~7 % at batch 1) but starve the
        # image-decoding threads of a bulk job: index builds turn it off (+34 % images/s).
        self.spinning = spinning
        self._sessions: dict[str, OrtSession] = {}

    def open(self, graph: GraphSpec) -> OrtSession:
        session = OrtSession(self.export_dir / graph.file, graph, providers=self.providers, threads=self.threads, spinning=self.spinning)
        self._sessions[graph.role] = session
        return session

    def info(self) -> dict[str, Any]:
        import onnxruntime

        return {
            "backend": self.name,
            "onnxruntime": onnxruntime.__version__,
            "requested_providers": list(self.providers),
            "providers": {role: session.providers for role, session in self._sessions.items()},
        }
