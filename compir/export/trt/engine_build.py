"""Build TensorRT engines from an export folder with the ``tensorrt`` Python API (never trtexec).

One engine per graph role, written with ``engines.json`` (:mod:`compir.engines`) into
``<export>/engines/`` (the runtime's default), atomically. Engines only run where they were built:
build them on the device that serves (a Jetson builds its own).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from compir.contracts import atomic_output_dir, atomic_write_bytes, sha256_bytes
from compir.engines import (
    DEFAULT_BATCHES,
    PRECISIONS,
    DeviceInfo,
    EngineRecord,
    EngineSet,
    ShapeRange,
    check_tensorrt_version,
    detect_device,
    save_engines,
)
from compir.errors import ContractError
from compir.export.trt.profiles import calibration_batch, calibration_shapes, compute_profile, token_range
from compir.manifest import (
    COMPOSER,
    IMAGE_ENCODER,
    PROMPT_ENCODER,
    QUERY_ENCODER,
    TEXT_ENCODER,
    TOKEN_MAPPER,
    load_manifest,
    manifest_sha256,
)

DEFAULT_ENGINE_DIR = "engines"
# Every role the variant has: the fused query_encoder only when the export was made with --fused; a zero-shot
# export's token_mapper and prompt_encoder in place of the composer.
DEFAULT_ROLES = (IMAGE_ENCODER, TEXT_ENCODER, COMPOSER, TOKEN_MAPPER, PROMPT_ENCODER, QUERY_ENCODER)
CALIBRATION_BATCH = 8
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrecisionFlags:
    """The ``trt.BuilderFlag`` names a precision sets and clears on the builder config."""

    enable: tuple[str, ...]
    disable: tuple[str, ...] = ()


def precision_flags(precision: str) -> PrecisionFlags:
    """Builder flags for ``precision``. fp32 clears TF32, which TensorRT enables by default and which
    rounds matmul / convolution inputs to 10-bit mantissas on Ampere, Orin and Hopper; int8 engines
    also allow fp16 so that layers without an int8 kernel fall back to fp16, not fp32."""
    flags = {
        "fp32": PrecisionFlags(enable=(), disable=("TF32",)),
        "fp16": PrecisionFlags(enable=("FP16",)),
        "int8": PrecisionFlags(enable=("FP16", "INT8")),
    }
    if precision not in flags:
        raise ContractError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return flags[precision]


@dataclass(frozen=True)
class BuildOptions:
    """How to build: precision, the batch range of the optimization profile, memory, caches."""

    precision: str = "fp16"
    min_batch: int = DEFAULT_BATCHES[0]
    opt_batch: int = DEFAULT_BATCHES[1]
    max_batch: int = DEFAULT_BATCHES[2]
    workspace_gb: float = 4.0
    timing_cache: Path | None = None  # loaded if present, saved after each build (speeds rebuilds)
    calibration_batches: dict[str, list[dict[str, Any]]] | None = None  # role -> feeds, for int8 from fp32
    trt_lint: bool = True  # check the graphs against TensorRT's parser rules before TensorRT is loaded


def build_engines(
    export_dir: str | Path,
    *,
    options: BuildOptions,
    variant: str = "fp32",
    roles: Sequence[str] | None = None,
    calibration_data: str | Path | None = None,
    calibration_count: int = 64,
    out_dir: str | Path | None = None,
) -> EngineSet:
    """Build one engine per role from ``variant``'s ONNX graphs; write them and ``engines.json``.

    ``--precision int8`` from the fp32 graphs calibrates on ``calibration_data`` (gallery images
    and query texts; rendered scenes when None); from the ``int8-static`` variant the graph's own
    Q/DQ scales are used (TensorRT's explicit quantization, no calibrator).
    """
    if options.precision not in PRECISIONS:
        raise ContractError(f"unknown precision {options.precision!r}; choose from {', '.join(PRECISIONS)}")
    _check_variant(variant, options.precision)
    folder = Path(export_dir)
    manifest = load_manifest(folder)
    spec = manifest.variant(variant)
    roles = [role for role in DEFAULT_ROLES if role in spec.graphs] if roles is None else list(roles)
    graphs = {role: folder / spec.graph(role).file for role in roles}
    tokens = token_range(manifest.tokenizer.context_length)
    profiles = {
        role: compute_profile(spec.graph(role), min_batch=options.min_batch, opt_batch=options.opt_batch,
                              max_batch=options.max_batch, tokens=tokens)
        for role in roles
    }
    if options.trt_lint:
        _lint(graphs, profiles)
    device = detect_device()
    if options.precision == "int8" and variant != "int8-static" and options.calibration_batches is None:
        options = _with_calibration(options, folder, manifest, roles, calibration_data, calibration_count)
    target = Path(out_dir) if out_dir is not None else folder / DEFAULT_ENGINE_DIR
    records: dict[str, EngineRecord] = {}
    with atomic_output_dir(target, overwrite=True) as tmp:
        for role in tqdm(list(roles), desc=f"TensorRT {options.precision} engines", unit="engine"):
            graph, profile = spec.graph(role), profiles[role]
            started = time.perf_counter()
            plan = build_engine(graphs[role], profile=profile, options=options, role=role)
            atomic_write_bytes(tmp / f"{role}.plan", plan)
            records[role] = EngineRecord(
                role=role,
                file=f"{role}.plan",
                sha256=sha256_bytes(plan),
                onnx_file=graph.file,
                onnx_sha256=graph.content_sha256,
                precision=options.precision,
                profile=profile,
                device=device,
                build_seconds=round(time.perf_counter() - started, 2),
            )
        engines = EngineSet(manifest_sha256=manifest_sha256(folder), variant=variant, precision=options.precision, engines=records)
        save_engines(tmp, engines)
    return engines


def _lint(graphs: dict[str, Path], profiles: dict[str, dict[str, ShapeRange]]) -> None:
    """The parser lint for the TensorRT installed here (by package metadata), before it is imported."""
    try:
        from compir.export.trt.lint_export import check_graphs, installed_release
    except ImportError as exc:  # a Jetson may have TensorRT without the onnx package
        log.warning("TensorRT lint skipped: %s is not installed here (pip install onnx to run it)", exc.name)
        return
    check_graphs(graphs, profiles, release=installed_release())


def build_engine(onnx_path: Path, *, profile: dict[str, ShapeRange], options: BuildOptions, role: str = "") -> bytes:
    """Parse ``onnx_path`` and build a serialized engine; ContractError with every parser error."""
    import tensorrt as trt

    check_tensorrt_version(str(trt.__version__))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # always explicit batch from TensorRT 10 (EXPLICIT_BATCH is ignored)
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(onnx_path))
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    if not parsed or errors:
        listed = "; ".join(f"[{i}] {e}" for i, e in enumerate(errors)) or "no details reported"
        raise ContractError(f"TensorRT cannot parse {onnx_path} ({len(errors)} error(s)): {listed}")
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(inputs) != sorted(profile):
        raise ContractError(f"{onnx_path}: network inputs {inputs} differ from the manifest's {sorted(profile)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    optimization = builder.create_optimization_profile()
    for name, shape_range in profile.items():
        optimization.set_shape(name, shape_range.min, shape_range.opt, shape_range.max)
    config.add_optimization_profile(optimization)
    # Held here for the whole build: TensorRT calls back into it from build_serialized_network.
    calibrator = _set_precision(trt, builder, config, profile, options, role, onnx_path)
    _load_timing_cache(config, options.timing_cache)

    serialized = builder.build_serialized_network(network, config)
    failure = getattr(calibrator, "failure", None)
    if failure is not None:
        raise ContractError(f"int8 calibration of {onnx_path} failed: {failure}") from failure
    if serialized is None:
        raise ContractError(f"TensorRT failed to build an engine from {onnx_path} at {options.precision} (see its log above)")
    if options.timing_cache is not None:  # the config's cache now holds this build's timings too
        atomic_write_bytes(options.timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _set_precision(
    trt: Any, builder: Any, config: Any, profile: dict[str, ShapeRange], options: BuildOptions, role: str, onnx_path: Path
) -> Any:
    """Set the precision flags; returns the int8 calibrator where one is used (else None)."""
    flags = precision_flags(options.precision)
    for name in flags.disable:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    for name in flags.enable:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if options.precision != "int8" or options.calibration_batches is None:
        return None  # int8 from the int8-static variant: explicit quantization, the Q/DQ nodes carry the scales
    from compir.export.trt.calibrator import calibration_digest, check_batches, make_calibrator

    batches = options.calibration_batches[role]
    shapes = calibration_shapes(profile, batch=len(next(iter(batches[0].values()))))
    # TensorRT reads the calibration profile's batch of rows from every buffer get_batch returns.
    check_batches(batches, inputs=list(profile), batch=next(iter(shapes.values()))[0])
    calibration_profile = builder.create_optimization_profile()
    for name, shape in shapes.items():
        calibration_profile.set_shape(name, shape, shape, shape)
    config.set_calibration_profile(calibration_profile)
    cache_file = None
    if options.timing_cache is not None:
        cache_file = options.timing_cache.with_name(f"{role}.{calibration_digest(onnx_path, batches)}.int8-calibration.cache")
    calibrator = make_calibrator(batches, cache_file=cache_file)
    config.int8_calibrator = calibrator
    return calibrator


def _load_timing_cache(config: Any, path: Path | None) -> None:
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    # ignore_mismatch=False: a cache from another GPU or TensorRT is refused instead of misused.
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise ContractError(f"timing cache {path} does not match this GPU / TensorRT; delete it and rebuild")


def _check_variant(variant: str, precision: str) -> None:
    if variant == "int8-dynamic":
        raise ContractError(
            "TensorRT cannot build the int8-dynamic variant (onnxruntime's MatMulInteger / DynamicQuantizeLinear ops); "
            "use --variant fp32 with --precision int8 (calibrated) or --variant int8-static"
        )
    # The int8-static graph's Q/DQ nodes need the int8 build; the float graphs build at any precision
    # (--precision int8 from them calibrates).
    if variant == "int8-static" and precision != "int8":
        raise ContractError(f"--variant int8-static builds only at --precision int8 (got {precision})")


def _with_calibration(
    options: BuildOptions, folder: Path, manifest: Any, roles: Sequence[str], calibration_data: str | Path | None, count: int
) -> BuildOptions:
    from dataclasses import replace

    try:
        from compir.export.samples import load_samples
        from compir.export.trt.calibrator import calibration_feeds, split_batches
        from compir.runtime.tokenizer import load_tokenizer
    except ImportError as exc:  # torch (samples, CUDA copies) or onnx is missing on this machine
        raise ContractError(
            f"int8 calibration from the fp32 graphs needs torch with CUDA and onnx here ({exc}); build from the "
            f"int8-static variant instead (--variant int8-static: its Q/DQ scales come from the export machine)"
        ) from exc

    tokenizer = load_tokenizer(folder, manifest.tokenizer)
    samples = load_samples(preprocess=manifest.preprocess, tokenizer=tokenizer, data_dir=calibration_data, count=count)
    template = manifest.composition_spec.template() if manifest.zero_shot else None
    prompt_ids = tokenizer([template.fill(text) for text in samples.texts]) if template is not None else None
    fp32 = {role: folder / graph.file for role, graph in manifest.variant("fp32").graphs.items()}
    feeds = calibration_feeds(fp32, samples, roles=roles, prompt_ids=prompt_ids)
    # Split at the size the calibration profile will have (CALIBRATION_BATCH clamped into the profile).
    batch = calibration_batch(CALIBRATION_BATCH, min_batch=options.min_batch, max_batch=options.max_batch)
    return replace(options, calibration_batches={role: split_batches(feeds[role], batch=batch) for role in roles})


def device_summary(device: DeviceInfo) -> str:
    return f"{device.gpu_name} (SM {device.compute_capability}), TensorRT {device.tensorrt_version}"
