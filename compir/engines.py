"""The TensorRT engines record (``engines.json``): which engine file serves which graph, built from
which ONNX file, at which precision and optimization profile, by which TensorRT on which GPU.

Written by ``compir export engine`` and read by the runtime's TensorRT backend, so it is core code:
no torch, no onnx, and ``tensorrt`` only inside :func:`detect_device`. A serialized TensorRT engine
only runs on the TensorRT version and GPU architecture that built it, so :func:`check_compatible`
refuses a mismatch with a message that says to rebuild the engine on the device itself
(Jetson engines are built on the Jetson).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compir.contracts import ENGINES_FILE, ENGINES_FORMAT, ENGINES_SCHEMA, read_contract, require_keys, verify_sha256, write_contract
from compir.errors import ContractError
from compir.manifest import BATCH_AXIS, SEQUENCE_AXIS, GraphSpec

PRECISIONS = ("fp32", "fp16", "int8")
# The optimization profile's batch sizes (min, opt, max) unless told otherwise: `compir export engine`
# and onnxruntime's TensorRT provider build for the same range.
DEFAULT_BATCHES = (1, 8, 64)
# The token count a text graph with a dynamic ``sequence`` axis is tuned for (its profile's opt): a
# modification text ("is darker and has long sleeves") is 8-20 tokens with its start / end tokens.
TYPICAL_TEXT_TOKENS = 20
# The TensorRT majors compir builds and runs engines with (pyproject's gpu extra pins the same range).
TENSORRT_MAJORS = range(10, 11)


@dataclass(frozen=True)
class DeviceInfo:
    """What a serialized engine is bound to: the TensorRT version and the GPU (name, SM version)."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7" (Orin), "9.0" (H100)


@dataclass(frozen=True)
class ShapeRange:
    """One input's optimization profile: the smallest, most frequent and largest shapes."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise ContractError(f"profile shapes differ in rank: {self.min}, {self.opt}, {self.max}")
        for low, mid, high in zip(self.min, self.opt, self.max, strict=True):
            if not (1 <= low <= mid <= high):
                raise ContractError(f"profile needs 1 <= min <= opt <= max per axis, got {self.min}, {self.opt}, {self.max}")


@dataclass(frozen=True)
class EngineRecord:
    """One serialized engine (``<role>.plan``) and everything that decides whether it may run."""

    role: str
    file: str
    sha256: str
    onnx_file: str  # relative to the export folder
    onnx_sha256: str
    precision: str
    profile: dict[str, ShapeRange]
    device: DeviceInfo
    build_seconds: float = 0.0

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str) -> EngineRecord:
        require_keys(raw, ["role", "file", "sha256", "onnx_file", "onnx_sha256", "precision", "profile", "device"], source=source)
        try:
            record = cls(
                role=str(raw["role"]),
                file=str(raw["file"]),
                sha256=str(raw["sha256"]),
                onnx_file=str(raw["onnx_file"]),
                onnx_sha256=str(raw["onnx_sha256"]),
                precision=str(raw["precision"]),
                profile={
                    name: ShapeRange(min=tuple(r["min"]), opt=tuple(r["opt"]), max=tuple(r["max"]))
                    for name, r in raw["profile"].items()
                },
                device=DeviceInfo(**raw["device"]),
                build_seconds=float(raw.get("build_seconds", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(f"{source}: malformed engine entry ({type(exc).__name__}: {exc})") from exc
        if record.precision not in PRECISIONS:
            raise ContractError(f"{source}: engine {record.role!r} has unknown precision {record.precision!r}")
        return record


@dataclass(frozen=True)
class EngineSet:
    """The engines built from one export folder (bound to its ``manifest.json`` checksum)."""

    manifest_sha256: str
    variant: str  # the ONNX variant the engines were parsed from
    precision: str
    engines: dict[str, EngineRecord] = field(default_factory=dict)

    def engine(self, role: str) -> EngineRecord:
        if role not in self.engines:
            raise ContractError(f"no TensorRT engine for graph {role!r} (built: {sorted(self.engines)}); run `compir export engine`")
        return self.engines[role]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def save_engines(engine_dir: str | Path, engines: EngineSet) -> Path:
    """Atomically write ``engines.json`` into ``engine_dir``; returns its path."""
    path = Path(engine_dir) / ENGINES_FILE
    write_contract(path, fmt=ENGINES_FORMAT, schema_version=ENGINES_SCHEMA, body=engines.to_dict())
    return path


def load_engines(
    engine_dir: str | Path,
    *,
    manifest_sha256: str | None = None,
    device: DeviceInfo | None = None,
    verify_files: bool = True,
) -> EngineSet:
    """Read ``engines.json``; check engine checksums, the export it was built from and the device.

    ``manifest_sha256`` (from :func:`compir.manifest.manifest_sha256`) binds the engines to their
    export; ``device`` (from :func:`detect_device`) refuses engines built elsewhere.
    Raises ContractError naming the file and what to do.
    """
    folder = Path(engine_dir)
    path = folder / ENGINES_FILE
    raw = read_contract(path, fmt=ENGINES_FORMAT, schema_version=ENGINES_SCHEMA)
    require_keys(raw, ["manifest_sha256", "variant", "precision", "engines"], source=str(path))
    engines = EngineSet(
        manifest_sha256=str(raw["manifest_sha256"]),
        variant=str(raw["variant"]),
        precision=str(raw["precision"]),
        engines={
            role: EngineRecord.from_dict(entry, source=f"{path} [{role}]") for role, entry in dict(raw["engines"]).items()
        },
    )
    if manifest_sha256 is not None and engines.manifest_sha256 != manifest_sha256:
        raise ContractError(
            f"{path}: these engines were built from a different export (manifest sha256 "
            f"{engines.manifest_sha256[:12]}..., this export's is {manifest_sha256[:12]}...); rebuild them with "
            f"`compir export engine`"
        )
    for record in engines.engines.values():
        if device is not None:
            check_compatible(record, device=device, source=str(path))
        if verify_files:
            verify_sha256(folder / record.file, record.sha256, what=f"TensorRT engine {record.role!r}")
    return engines


def check_compatible(record: EngineRecord, *, device: DeviceInfo, source: str = ENGINES_FILE) -> None:
    """Raise ContractError unless ``record`` was built by this TensorRT version on this GPU architecture.

    TensorRT plans are not portable: a different TensorRT release or a different SM version (a plan
    built on an x86 workstation and copied to a Jetson, say) fails to deserialize or runs wrong
    kernels. The GPU name is informative only: two boards with the same SM version share plans.
    """
    built = record.device
    problems = []
    if built.tensorrt_version != device.tensorrt_version:
        problems.append(f"TensorRT {built.tensorrt_version} (this device has {device.tensorrt_version})")
    if built.compute_capability != device.compute_capability:
        problems.append(
            f"compute capability {built.compute_capability} on {built.gpu_name!r} "
            f"(this device: {device.compute_capability} on {device.gpu_name!r})"
        )
    if problems:
        raise ContractError(
            f"{source}: engine {record.role!r} was built for {' and '.join(problems)}; TensorRT engines only "
            f"run where they were built: rebuild it on this device with `compir export engine EXPORT_DIR "
            f"--precision {record.precision}` (Jetson engines are built on the Jetson)"
        )


def check_tensorrt_version(version: str) -> None:
    """ContractError unless ``version`` (``tensorrt.__version__``) is a TensorRT 10.x release.

    8.x and 9.x cannot build the text graphs (they cast int64 token ids to int32, and their ArgMax
    is fp32/fp16 only). 11.x removed the precision builder flags (``BuilderFlag.FP16/INT8``) and the
    int8 calibrators that fp16 and calibrated int8 builds use.
    """
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise ContractError(f"cannot read the TensorRT version {version!r}; compir needs TensorRT 10.x") from None
    if major in TENSORRT_MAJORS:
        return
    if major < TENSORRT_MAJORS.start:
        raise ContractError(
            f"TensorRT {version} is too old: compir's engines need TensorRT 10.x (int64 token ids, ArgMax over them). "
            f"On a Jetson, JetPack 6.0 ships TensorRT 8.6 and JetPack 5 TensorRT 8.5: flash JetPack 6.1 or 6.2 (TensorRT 10.3). "
            f"Elsewhere: pip install 'compir[gpu]' (tensorrt-cu12 >= 10, < 11)"
        )
    raise ContractError(
        f"TensorRT {version} is not supported: TensorRT 11 removed the precision builder flags and int8 calibrators "
        f"compir's builds use; install TensorRT 10.x: pip install 'compir[gpu]' (tensorrt-cu12 >= 10, < 11)"
    )


def token_range(context_length: int) -> tuple[int, int, int]:
    """(min, opt, max) token counts of a text graph's ``sequence`` axis: 1, a typical modification
    text (:data:`TYPICAL_TEXT_TOKENS`) and the tokenizer's context length."""
    return 1, min(TYPICAL_TEXT_TOKENS, context_length), context_length


def compute_profile(
    graph: GraphSpec, *, min_batch: int, opt_batch: int, max_batch: int, tokens: tuple[int, int, int] | None = None
) -> dict[str, ShapeRange]:
    """One ShapeRange per graph input: the ``batch`` axis gets (min, opt, max), the ``sequence`` axis
    of token ids ``tokens`` (:func:`token_range`), every other axis its exported size; ContractError
    on an axis the profile cannot size."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ContractError(f"batch sizes must satisfy 1 <= min ({min_batch}) <= opt ({opt_batch}) <= max ({max_batch})")
    profile: dict[str, ShapeRange] = {}
    for spec in graph.inputs:
        sizes: list[tuple[int, int, int]] = []
        for axis, dim in enumerate(spec.shape):
            if dim == BATCH_AXIS:
                sizes.append((min_batch, opt_batch, max_batch))
            elif dim == SEQUENCE_AXIS and tokens is not None:
                sizes.append(tokens)
            elif isinstance(dim, int) and dim > 0:
                sizes.append((dim, dim, dim))
            else:
                raise ContractError(
                    f"{graph.role} input {spec.name!r} axis {axis} is dynamic ({dim!r}) but only {BATCH_AXIS!r} and "
                    f"{SEQUENCE_AXIS!r} (given the token range) can be given a TensorRT profile; re-export the graph"
                )
        low, mid, high = (tuple(size[i] for size in sizes) for i in range(3))
        profile[spec.name] = ShapeRange(min=low, opt=mid, max=high)
    return profile


def detect_device(*, device_index: int = 0) -> DeviceInfo:
    """Describe this machine's TensorRT and GPU through the CUDA driver library (no torch needed).

    Raises ContractError when TensorRT or a CUDA driver is missing, or TensorRT is not a 10.x release.
    """
    try:
        import tensorrt
    except ImportError as exc:
        raise ContractError("TensorRT is not installed; install compir[gpu] on the device that runs the engines") from exc
    check_tensorrt_version(str(tensorrt.__version__))
    name, capability = _cuda_device(device_index)
    return DeviceInfo(tensorrt_version=str(tensorrt.__version__), gpu_name=name, compute_capability=capability)


def _cuda_device(index: int) -> tuple[str, str]:
    from compir.cuda_driver import load_driver

    driver = load_driver()
    device = driver.device(index)
    return driver.device_name(device), driver.compute_capability(device)
