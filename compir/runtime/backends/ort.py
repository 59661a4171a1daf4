"""onnxruntime backend: the export's ONNX graphs on CUDA EP then CPU by default, or on the providers
asked for (TensorRT EP with caches and profiles: :mod:`.providers`); :meth:`OrtBackend.info`
reports which providers each session actually got, and a fallback past a GPU provider is warned about."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compir.errors import ContractError
from compir.manifest import GraphSpec
from compir.runtime.backends.base import check_io
from compir.runtime.backends.providers import (
    DEFAULT_PROVIDERS,
    ProviderEntry,
    fallback_message,
    missing_providers,
    prepare_providers,
    resolve_providers,
    session_providers,
)

__all__ = ["DEFAULT_PROVIDERS", "OrtBackend", "OrtSession", "open_session", "resolve_providers"]

# ONNX Runtime type strings -> manifest dtype names.
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def open_session(
    path: Path, *, providers: Sequence[ProviderEntry] = ("CPUExecutionProvider",), threads: int = 0, spinning: bool = False,
    what: str = "graph",
) -> Any:
    """An onnxruntime InferenceSession of the graph at ``path``: compir's one session factory
    (the runtime's sessions, export parity / accuracy / calibration and the benchmarks).

    ``threads=0``: onnxruntime's default pool size. ``spinning=False`` (the default) stops idle pool
    threads from busy-waiting: every session has its own pool, so a query's image, text and composer
    graphs would otherwise spin against each other (and against a server's event loop) on the same
    cores; ViT-B-32 queries ran 1.9x faster sleeping on 2 cores (docs/benchmarks.md, HTTP API).
    ``spinning=True`` for one session alone on a machine. ContractError if it cannot load.
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

    def __init__(self, path: Path, spec: GraphSpec, *, providers: Sequence[ProviderEntry], threads: int = 0,
                 spinning: bool = False) -> None:
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

    def __init__(self, export_dir: str | Path, *, providers: Sequence[str] | None = None, threads: int = 0, spinning: bool = False) -> None:
        self.export_dir = Path(export_dir)
        self.providers = resolve_providers(providers)
        self.tensorrt = prepare_providers(self.export_dir, self.providers)
        self.threads = threads
        # Idle pool threads sleep unless asked (see open_session): spinning ones answer one graph sooner
        # (~7 % at batch 1, one session alone), but a query's graphs each have a pool and would spin
        # against each other, and a bulk job's image-decoding threads lose 34 % images/s to them.
        self.spinning = spinning
        self._sessions: dict[str, OrtSession] = {}

    def open(self, graph: GraphSpec) -> OrtSession:
        providers = session_providers(self.providers, graph, tensorrt=self.tensorrt)
        session = OrtSession(self.export_dir / graph.file, graph, providers=providers, threads=self.threads, spinning=self.spinning)
        if missing_providers(self.providers, session.providers):
            warnings.warn(fallback_message(graph.role, self.providers, session.providers), RuntimeWarning, stacklevel=2)
        self._sessions[graph.role] = session
        return session

    def info(self) -> dict[str, Any]:
        import onnxruntime

        return {
            "backend": self.name,
            "onnxruntime": onnxruntime.__version__,
            "requested_providers": list(self.providers),
            "providers": {role: session.providers for role, session in self._sessions.items()},  # what actually loaded
            "missing_providers": {role: missing_providers(self.providers, s.providers) for role, s in self._sessions.items()},
        }
