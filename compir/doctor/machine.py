"""The machine's side of ``compir doctor``: Python, compir's installed extras, the CPU class.

The extras are read from the installed ``compir`` distribution's own requirements (pyproject's
optional-dependencies), so this file lists none; the CPU class from ``/proc/cpuinfo`` (x86-64
``flags``, aarch64 ``Features``), with :mod:`platform` where there is no such file.
"""

from __future__ import annotations

import platform
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from compir.doctor.report import Section, run_checked

# The instruction sets that decide compir's speed on a CPU, in rising order: (label, any of these flags).
# onnxruntime's int8 kernels add u8 x s8 products with VNNI (else in saturating int16 pairs); bf16
# autocast is fast only where bf16 is native (AVX-512 BF16 or AMX), emulated ~50x slower elsewhere.
X86_FEATURES = (
    ("AVX2", ("avx2",)),
    ("AVX-512", ("avx512f",)),
    ("VNNI", ("avx512_vnni", "avx_vnni")),
    ("bf16", ("avx512_bf16", "amx_bf16")),
    ("AMX", ("amx_tile",)),
)
ARM_FEATURES = (
    ("NEON", ("asimd",)),
    ("dot product", ("asimddp",)),
    ("bf16", ("bf16",)),
    ("i8mm", ("i8mm",)),
    ("SVE", ("sve",)),
)
CPUINFO = Path("/proc/cpuinfo")
TEGRA_RELEASE = Path("/etc/nv_tegra_release")  # L4T's release line on a Jetson: "# R36 (release), REVISION: 4.0, ..."
# Installing one of these excludes the others: each ships the same `onnxruntime` module.
RUNTIME_EXTRAS = ("cpu", "gpu", "gpu-cu13")
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


@dataclass(frozen=True)
class CpuInfo:
    """``features``: the labels of :data:`X86_FEATURES` / :data:`ARM_FEATURES` present; ``absent``: the others."""

    model: str
    arch: str
    features: tuple[str, ...]
    absent: tuple[str, ...]
    source: str  # where the flags came from

    @property
    def cpu_class(self) -> str:
        """The best instruction set present (``AVX2``, ``AVX-512``, ``VNNI``, ``bf16``, ``AMX``; ``aarch64 NEON``)."""
        if self.arch in ("aarch64", "arm64"):
            return "aarch64 NEON" + "".join(f" + {name}" for name in self.features if name != "NEON")
        return self.features[-1] if self.features else f"{self.arch} (no AVX2)"


def cpu_info(cpuinfo: Path = CPUINFO, *, arch: str | None = None) -> CpuInfo:
    """This CPU's model and instruction sets (``arch``: ``platform.machine()`` unless given)."""
    arch = (arch or platform.machine()).lower()
    fields = _cpuinfo_fields(cpuinfo)
    arm = arch in ("aarch64", "arm64")
    table = ARM_FEATURES if arm else X86_FEATURES
    key = "Features" if arm else "flags"
    if key in fields:
        flags, source = set(fields[key].split()), f"{cpuinfo} {key}"
    elif arm:  # NEON is part of every aarch64 CPU (macOS has no /proc/cpuinfo)
        flags, source = {"asimd"}, "platform (aarch64 implies NEON)"
    else:
        flags, source = set(), "platform (instruction sets unknown: no /proc/cpuinfo)"
    present = tuple(name for name, names in table if flags.intersection(names))
    absent = tuple(name for name, _ in table if name not in present)
    return CpuInfo(model=cpu_model(fields), arch=arch, features=present, absent=absent, source=source)


def cpu_model(fields: dict[str, str] | None = None) -> str:
    """The CPU's marketing name (``model name``; on aarch64 the board's, e.g. a Jetson's), else the platform's."""
    fields = _cpuinfo_fields(CPUINFO) if fields is None else fields
    if fields.get("model name"):
        return fields["model name"]
    board = Path("/proc/device-tree/model")
    if board.is_file():
        return board.read_text(encoding="utf-8", errors="replace").strip("\x00\n ")
    return platform.processor() or platform.machine()


def _cpuinfo_fields(path: Path) -> dict[str, str]:
    """The first processor's ``key: value`` lines of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_section() -> Section:
    info = cpu_info()
    has = f"; has {', '.join(info.features)}" if info.features else ""
    lacks = f"; lacks {', '.join(info.absent)}" if info.absent else ""
    return Section(
        "cpu", f"{info.cpu_class}: {info.model} ({info.arch}){has}{lacks}",
        {"class": info.cpu_class, "model": info.model, "arch": info.arch, "features": list(info.features),
         "absent": list(info.absent), "source": info.source, "cores": _usable_cores()},
    )


def _usable_cores() -> int | None:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def python_section() -> Section:
    from compir import __version__

    version = platform.python_version()
    return Section("python", f"Python {version} ({sys.executable}), compir {__version__}, {platform.platform()}",
                   {"version": version, "executable": sys.executable, "compir": __version__, "platform": platform.platform()})


@dataclass(frozen=True)
class Extra:
    name: str
    installed: dict[str, str]  # distribution -> version
    missing: tuple[str, ...]  # distributions not installed

    @property
    def complete(self) -> bool:
        return not self.missing


def installed_extras(distribution: str = "compir") -> dict[str, Extra]:
    """Each optional-dependencies extra of the installed ``distribution``, with what of it is installed.
    An extra naming others (``compir[serve]``) includes their packages. PackageNotFoundError where
    ``distribution`` is not installed (a source folder on PYTHONPATH)."""
    requires = metadata.requires(distribution) or []
    packages: dict[str, list[str]] = {}
    includes: dict[str, list[str]] = {}
    for line in requires:
        marker = _EXTRA_MARKER.search(line.partition(";")[2])
        found = _REQUIREMENT.match(line)
        if marker is None or found is None:
            continue  # a base dependency
        name, extras = found.group(1), found.group(2) or ""
        if name == distribution:
            includes.setdefault(marker.group(1), []).extend(part.strip() for part in extras.split(","))
        else:
            packages.setdefault(marker.group(1), []).append(name)
    result = {}
    for extra in sorted(set(packages) | set(includes)):
        names = _expand(extra, packages, includes)
        versions = {name: version for name in names if (version := installed_version(name)) is not None}
        result[extra] = Extra(extra, versions, tuple(name for name in names if name not in versions))
    return result


def _expand(extra: str, packages: dict[str, list[str]], includes: dict[str, list[str]], seen: frozenset[str] = frozenset()) -> list[str]:
    names = list(packages.get(extra, []))
    for other in includes.get(extra, []):
        if other not in seen | {extra}:
            names += [name for name in _expand(other, packages, includes, seen | {extra}) if name not in names]
    return names


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def extras_section() -> Section:
    try:
        extras = installed_extras()
    except metadata.PackageNotFoundError:
        return Section("extras", "compir is not installed as a package (a source folder on PYTHONPATH): extras unknown",
                       missing=("pip install -e '.[cpu]' in the checkout (or '.[all]', the developer install)",))
    complete = [extra for extra in extras.values() if extra.complete and extra.name != "all"]
    runtime = [name for name in RUNTIME_EXTRAS if name in extras and extras[name].complete]
    missing = []
    for extra in extras.values():
        # The runtime extras exclude each other: none is missing once one is complete; an empty one is not worth a line.
        if extra.complete or extra.name == "all" or (extra.name in RUNTIME_EXTRAS and (runtime or not extra.installed)):
            continue
        partly = f" (has {', '.join(extra.installed)}; lacks {', '.join(extra.missing)})" if extra.installed else ""
        missing.append(f"extra {extra.name}{partly}: pip install 'compir[{extra.name}]'")
    if not any(extras[name].installed for name in RUNTIME_EXTRAS if name in extras):
        missing.append("the runtime's onnxruntime: pip install 'compir[cpu]' (NVIDIA GPU: 'compir[gpu]'; CUDA 13: 'compir[gpu-cu13]'; "
                       "one of the three)")
    return Section(
        "extras", f"installed: {', '.join(extra.name for extra in complete) or 'none'}",
        {"extras": {e.name: {"complete": e.complete, "installed": e.installed, "missing": list(e.missing)} for e in extras.values()}},
        tuple(missing),
        tuple(f"{e.name}: {', '.join(f'{name} {version}' for name, version in e.installed.items())}" for e in complete),
    )


def jetson_section(release: Path = TEGRA_RELEASE) -> Section:
    """The JetPack release on a Jetson (``/etc/nv_tegra_release``, else dpkg's nvidia-l4t-core / nvidia-jetpack)."""
    l4t = None
    if release.is_file():
        found = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release.read_text(encoding="utf-8", errors="replace"))
        l4t = f"{found.group(1)}.{found.group(2)}" if found else None
    jetpack = run_checked(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"])
    if l4t is None:
        core = run_checked(["dpkg-query", "-W", "-f=${Version}", "nvidia-l4t-core"])
        l4t = core.split("-")[0] if core else None
    if l4t is None and jetpack is None:
        return Section("jetson", "not a Jetson", {"jetson": False})
    named = jetpack.split("+")[0].split("-")[0] if jetpack else jetpack_of_l4t(l4t or "")
    summary = f"L4T {l4t or 'unknown'}, JetPack {named or 'unknown'}"
    missing: tuple[str, ...] = ()
    if l4t and _release(l4t) < (36, 4):  # JetPack 6.0 ships TensorRT 8.6, JetPack 5 TensorRT 8.5
        missing = ("compir's TensorRT engines need TensorRT 10, JetPack 6.1 or newer (L4T 36.4): flash JetPack 6.1 or 6.2",)
    return Section("jetson", summary, {"jetson": True, "l4t": l4t, "jetpack": named}, missing)


# L4T release -> JetPack (NVIDIA's JetPack archive); prefixes, most specific first.
_JETPACK_OF_L4T = (("36.4.4", "6.2.1"), ("36.4.3", "6.2"), ("36.4", "6.1"), ("36.3", "6.0"), ("36.2", "6.0 DP"), ("35.6", "5.1.4"),
                   ("35.5", "5.1.3"), ("35.4", "5.1.2"), ("35.3", "5.1.1"), ("35.2", "5.1"), ("35.1", "5.0.2"), ("32.7", "4.6.x"))


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def jetpack_of_l4t(l4t: str) -> str | None:
    """The JetPack release of an L4T version (``36.4.0`` -> ``6.1``); None for one not in the table."""
    for prefix, jetpack in _JETPACK_OF_L4T:
        if l4t == prefix or l4t.startswith(prefix + "."):
            return jetpack
    return None
