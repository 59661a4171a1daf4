"""onnxruntime execution providers: which to ask for, with which options, and what actually loaded.

The default is the CUDA provider, then CPU. onnxruntime's TensorRT provider is used only when asked
for (``--providers tensorrt cuda cpu``); it then gets an engine cache and a timing cache (without
them it rebuilds every engine at every start), fp16, and an optimization profile per graph from the
manifest's shapes, over the same batch and token ranges as ``compir export engine``
(:data:`DEFAULT_BATCHES`, :func:`compir.engines.token_range`).

onnxruntime silently runs a graph on the next provider when one fails to load (no driver, CUDA or
cuDNN libraries missing, TensorRT of another major version): :func:`missing_providers` says which
asked-for providers a session did not get, and the backend warns about it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from compir.engines import DEFAULT_BATCHES, ShapeRange, compute_profile, token_range
from compir.errors import ContractError
from compir.manifest import GraphSpec

TENSORRT_PROVIDER = "TensorrtExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
DEFAULT_PROVIDERS = (CUDA_PROVIDER, CPU_PROVIDER)
GPU_PROVIDERS = (TENSORRT_PROVIDER, CUDA_PROVIDER)
_ALIASES = {"tensorrt": TENSORRT_PROVIDER, "trt": TENSORRT_PROVIDER, "cuda": CUDA_PROVIDER, "cpu": CPU_PROVIDER}

ProviderEntry = str | tuple[str, dict[str, str]]


def canonical_provider(name: str) -> str:
    """onnxruntime's provider name for ``name`` (``cuda``, ``tensorrt`` / ``trt``, ``cpu``; full names unchanged)."""
    return _ALIASES.get(name.lower(), name)


@dataclass(frozen=True)
class TensorRTProviderSettings:
    """What onnxruntime's TensorRT provider is given: where its caches live, fp16, the batch range
    and the token range of text graphs with a ``sequence`` axis."""

    cache_dir: Path
    fp16: bool = True  # as `compir export engine` builds by default
    batches: tuple[int, int, int] = DEFAULT_BATCHES  # (min, opt, max) of the optimization profile
    tokens: tuple[int, int, int] | None = None  # (min, opt, max) token counts (token_range of the context length)


def resolve_providers(requested: Sequence[str] | None) -> list[str]:
    """Requested providers (full names or tensorrt/cuda/cpu) that this onnxruntime build has, in order.

    ``None`` means CUDA, then CPU. Asking only for unavailable ones is an error.
    """
    import onnxruntime

    available = set(onnxruntime.get_available_providers())
    wanted = [canonical_provider(name) for name in (requested or DEFAULT_PROVIDERS)]
    chosen = [name for name in wanted if name in available]
    if not chosen:
        raise ContractError(f"none of the providers {wanted} is available in this onnxruntime (it has {sorted(available)})")
    return chosen


def session_providers(providers: Sequence[str], graph: GraphSpec, *, tensorrt: TensorRTProviderSettings) -> list[ProviderEntry]:
    """The ``providers`` argument of ``InferenceSession`` for ``graph``: the TensorRT provider with
    its options, every other provider by name."""
    return [(name, tensorrt_options(graph, tensorrt)) if name == TENSORRT_PROVIDER else name for name in providers]


def tensorrt_options(graph: GraphSpec, settings: TensorRTProviderSettings) -> dict[str, str]:
    """onnxruntime TensorRT provider options for ``graph`` (its documented names; booleans as
    ``True``/``False``, shapes as ``name:1x3x224x224,...``)."""
    low, mid, high = settings.batches
    profile = compute_profile(graph, min_batch=low, opt_batch=mid, max_batch=high, tokens=settings.tokens)
    cache = str(settings.cache_dir)
    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": cache,
        "trt_fp16_enable": str(settings.fp16),
        "trt_profile_min_shapes": _shapes(profile, "min"),
        "trt_profile_opt_shapes": _shapes(profile, "opt"),
        "trt_profile_max_shapes": _shapes(profile, "max"),
    }


def _shapes(profile: dict[str, ShapeRange], which: str) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in getattr(shape_range, which))}" for name, shape_range in profile.items())


def missing_providers(requested: Sequence[str], loaded: Sequence[str]) -> list[str]:
    """The GPU providers asked for that the session did not get (onnxruntime fell back past them)."""
    return [name for name in requested if name in GPU_PROVIDERS and name not in loaded]


def fallback_message(role: str, requested: Sequence[str], loaded: Sequence[str]) -> str:
    """What to tell the user when :func:`missing_providers` is not empty."""
    missing = missing_providers(requested, loaded)
    where = "on the CPU" if list(loaded) == [CPU_PROVIDER] else f"on {', '.join(loaded)}"
    return (
        f"onnxruntime runs the {role} graph {where}: {', '.join(missing)} did not load (no NVIDIA driver or GPU, "
        f"CUDA / cuDNN libraries missing (pip install 'compir[gpu]'), or a TensorRT other than 10.x); "
        f"run with onnxruntime's log_severity_level=0 to see why"
    )


def tensorrt_cache_dir(export_dir: Path, *, versions: str) -> Path:
    """Where onnxruntime's TensorRT provider keeps engines and timings for this export: inside the
    export folder when it is writable, else in the user's cache folder. ``versions`` (e.g.
    ``ort-1.26.0-trt-10.16.1``) names a subfolder, since neither cache survives an upgrade."""
    if os.access(export_dir, os.W_OK):
        return export_dir / "onnxruntime-tensorrt-cache" / versions
    from compir.manifest import manifest_sha256

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "compir" / "onnxruntime-tensorrt" / manifest_sha256(export_dir)[:16] / versions


def load_gpu_libraries(providers: Sequence[str]) -> str:
    """Make the GPU providers' libraries loadable; returns the TensorRT version ("none" without it).

    pip's CUDA / cuDNN wheels (onnxruntime-gpu's ``[cuda,cudnn]`` extras) and TensorRT wheels keep
    their libraries off the loader path: ``onnxruntime.preload_dlls()`` loads the former, and
    importing ``tensorrt`` loads ``libnvinfer.so.10``, which the TensorRT provider then finds.
    """
    if not any(name in GPU_PROVIDERS for name in providers):
        return "none"
    import onnxruntime

    preload: Any = getattr(onnxruntime, "preload_dlls", None)  # onnxruntime-gpu >= 1.21; a no-op in CPU builds
    if preload is not None:
        preload()
    if TENSORRT_PROVIDER not in providers:
        return "none"
    try:
        import tensorrt
    except ImportError:
        return "none"  # a system-wide TensorRT (JetPack) is on the loader path already
    return str(tensorrt.__version__)


def prepare_providers(export_dir: Path, providers: Sequence[str]) -> TensorRTProviderSettings:
    """Load the GPU providers' libraries; the TensorRT provider's settings for this export (its cache
    folder, created when the TensorRT provider is asked for)."""
    import onnxruntime

    from compir.manifest import load_manifest

    trt_version = load_gpu_libraries(providers)
    versions = f"ort-{onnxruntime.__version__}-trt-{trt_version}"
    settings = TensorRTProviderSettings(cache_dir=tensorrt_cache_dir(export_dir, versions=versions))
    if TENSORRT_PROVIDER in providers:
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
        context = load_manifest(export_dir, verify_files=False).tokenizer.context_length
        settings = replace(settings, tokens=token_range(context))
    return settings
