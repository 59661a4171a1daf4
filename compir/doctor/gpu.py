"""The accelerator side of ``compir doctor``: onnxruntime's providers, the NVIDIA GPU with its driver
and CUDA versions, and TensorRT with whether compir supports its version.

The GPU is read through the CUDA driver library (:mod:`compir.cuda_driver`: name, compute
capability, the CUDA version the driver supports) and ``nvidia-smi`` where present (driver
version, memory); the TensorRT range is :func:`compir.engines.check_tensorrt_version`'s.
"""

from __future__ import annotations

from typing import Any

from compir.doctor.machine import installed_version
from compir.doctor.report import Section, run_checked
from compir.errors import ContractError

GPU_INSTALL = "pip install 'compir[gpu]' (CUDA 12; 'compir[gpu-cu13]' for CUDA 13 drivers >= 580)"


def onnxruntime_section(*, has_gpu: bool) -> Section:
    try:
        import onnxruntime
    except ImportError:
        return Section("onnxruntime", "not installed: the runtime cannot run exports",
                       {"installed": False}, (f"onnxruntime: pip install 'compir[cpu]'; with an NVIDIA GPU, {GPU_INSTALL}",))
    providers = list(onnxruntime.get_available_providers())
    builds = [name for name in ("onnxruntime", "onnxruntime-gpu") if installed_version(name)]
    missing = []
    if len(builds) > 1:  # both ship the module `onnxruntime`: the last installed wins, silently
        missing.append("onnxruntime and onnxruntime-gpu are both installed (one module, two builds): pip uninstall -y onnxruntime "
                       "onnxruntime-gpu, then install one extra")
    if has_gpu and "CUDAExecutionProvider" not in providers:
        missing.append(f"this onnxruntime has no CUDA provider, so exports run on the CPU: {GPU_INSTALL}")
    return Section(
        "onnxruntime", f"{onnxruntime.__version__} ({' + '.join(builds) or 'unknown build'}), providers: {', '.join(providers)}",
        {"installed": True, "version": str(onnxruntime.__version__), "builds": builds, "providers": providers}, tuple(missing),
    )


def gpu_section() -> Section:
    """The NVIDIA GPUs: through the CUDA driver, and nvidia-smi where present."""
    listed = []  # nvidia-smi's rows: name, driver version, memory
    smi = run_checked(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    for line in (smi or "").splitlines():
        fields = [part.strip() for part in (line.split(",") + ["", ""])[:3]]
        listed.append({"name": fields[0], "driver": fields[1], "memory": fields[2]})
    found: list[dict[str, str]] = []
    cuda_version, driver_error = None, ""
    try:
        from compir.cuda_driver import load_driver

        cuda = load_driver()
        cuda_version = cuda.version()
        for index in range(cuda.device_count()):
            device = cuda.device(index)
            found.append({"name": cuda.device_name(device), "compute_capability": cuda.compute_capability(device)})
    except ContractError as exc:
        driver_error = str(exc)
    # The CUDA driver's devices (in CUDA's order, which may differ from nvidia-smi's PCI order); nvidia-smi's without a driver library.
    gpus = found or listed
    driver = listed[0]["driver"] if listed else None
    details: dict[str, Any] = {"gpus": gpus, "nvidia_smi": listed, "driver": driver, "cuda_driver": cuda_version}
    if not gpus:
        return Section("gpu", "no NVIDIA GPU found", {**details, "reason": driver_error or "the CUDA driver reports no device"},
                       ("an NVIDIA GPU (without one the runtime uses the CPU): on a GPU machine, the NVIDIA driver, then "
                        + GPU_INSTALL,))
    names = "; ".join(gpu["name"] + (f" (SM {gpu['compute_capability']})" if "compute_capability" in gpu else "") for gpu in gpus)
    versions = [f"driver {driver}"] if driver else []
    versions += [f"CUDA {cuda_version} (the driver's)"] if cuda_version else []
    missing = (f"the CUDA driver library does not load ({driver_error})",) if driver_error else ()
    return Section("gpu", f"{names}; {', '.join(versions) or 'versions unknown'}", details, missing)


def tensorrt_section(*, has_gpu: bool) -> Section:
    from compir.engines import TENSORRT_MAJORS, check_tensorrt_version

    supported = f">= {TENSORRT_MAJORS.start}, < {TENSORRT_MAJORS.stop}"
    try:
        import tensorrt
    except ImportError:
        hint = (f"TensorRT: {GPU_INSTALL}; on a Jetson it comes with JetPack 6.1+" if has_gpu
                else f"TensorRT (NVIDIA GPUs only): on a GPU machine, {GPU_INSTALL}")
        return Section("tensorrt", f"not installed (compir supports {supported})", {"installed": False, "supported": supported}, (hint,))
    version = str(tensorrt.__version__)
    try:
        check_tensorrt_version(version)
        problem = ""
    except ContractError as exc:
        problem = str(exc)
    verdict = "supported" if not problem else "NOT supported"
    return Section("tensorrt", f"{version}, {verdict} (compir supports {supported})",
                   {"installed": True, "version": version, "supported": supported, "in_range": not problem},
                   (problem,) if problem else ())
