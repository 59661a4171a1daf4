"""``compir doctor``: its report on this machine (text and JSON, checked against /proc/cpuinfo and
onnxruntime itself), the timing of an export's variants, and a run without torch."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from compir.cli import main
from compir.doctor.machine import cpu_info, installed_extras, jetpack_of_l4t, jetson_section


def _doctor_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["doctor", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _flags() -> set[str]:
    """This machine's CPU flags, read here independently of compir.doctor."""
    text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    key = "Features" if platform.machine() == "aarch64" else "flags"
    return set(next(line for line in text.splitlines() if line.startswith(key)).split(":", 1)[1].split())


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads /proc/cpuinfo (Linux)")
def test_doctor_reports_this_machine_in_json_and_text(capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime

    report = _doctor_json(capsys)
    assert set(report) == {"python", "extras", "cpu", "amp", "onnxruntime", "gpu", "tensorrt", "jetson"}
    flags = _flags()
    if platform.machine() == "x86_64":
        expected = [name for name, present in (("AVX2", "avx2" in flags), ("AVX-512", "avx512f" in flags),
                                               ("VNNI", bool({"avx512_vnni", "avx_vnni"} & flags)),
                                               ("bf16", bool({"avx512_bf16", "amx_bf16"} & flags)), ("AMX", "amx_tile" in flags))
                    if present]
        assert report["cpu"]["features"] == expected
        assert report["cpu"]["class"] == (expected[-1] if expected else "x86_64 (no AVX2)")
    assert report["onnxruntime"]["providers"] == onnxruntime.get_available_providers()
    assert report["python"]["version"] == platform.python_version()
    assert report["extras"]["extras"]["cpu"]["installed"]["onnxruntime"] == onnxruntime.__version__
    assert "fastapi" in report["extras"]["extras"]["demo"]["installed"]  # demo includes compir[serve]
    assert report["amp"]["device"] in ("cpu", "cuda") and report["amp"]["reason"].startswith("auto")
    if not report["gpu"]["gpus"]:  # every missing piece says how to get it
        assert any("pip install 'compir[gpu]'" in line for line in report["gpu"]["missing"])
        assert any("pip install 'compir[gpu]'" in line for line in report["tensorrt"]["missing"])

    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines if line and not line.startswith(" ")]
    assert names == list(report)
    cpu_line = next(line for line in lines if line.startswith("cpu "))
    assert report["cpu"]["class"] in cpu_line and report["cpu"]["model"] in cpu_line
    assert ", ".join(onnxruntime.get_available_providers()) in next(line for line in lines if line.startswith("onnxruntime "))


def test_doctor_times_each_variant_of_an_export(tiny_export: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _doctor_json(capsys, str(tiny_export), "--seconds", "1")
    export = report["export"]
    timings = {row["variant"]: row for row in export["variants"]}
    assert set(timings) == {"fp32", "int8-dynamic"}
    assert export["fastest"] == min(timings, key=lambda name: timings[name]["query_ms"])
    for row in timings.values():
        assert row["runs"] >= 3 and 0 < row["best_ms"] <= row["query_ms"]
        assert row["providers"] == ["CPUExecutionProvider"]
    assert f"--variant {export['fastest']}" in export["summary"]


def test_doctor_refuses_a_folder_that_is_no_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", str(tmp_path)]) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert main(["doctor", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err


# torch, open_clip and gradio made unimportable before anything of compir is imported (a runtime-only install).
_TORCH_FREE = """
import json, io, contextlib, sys

class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "open_clip", "gradio", "torchvision"):
            raise ImportError(f"{{name}} is blocked in this test")
        return None

sys.meta_path.insert(0, _Blocked())
from compir.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    assert main(["doctor", {export!r}, "--json", "--seconds", "0.5"]) == 0
report = json.loads(out.getvalue())
assert report["amp"]["torch"] is None, report["amp"]
assert report["amp"]["missing"] == ["training (and --amp): pip install 'compir[train]'"], report["amp"]
assert report["export"]["fastest"] in ("fp32", "int8-dynamic"), report["export"]
banned = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip", "gradio", "torchvision"))
assert not banned, banned
print("doctor ok without torch")
"""


def test_doctor_runs_without_torch(tiny_export: Path) -> None:
    code = _TORCH_FREE.format(export=str(tiny_export))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "doctor ok without torch" in result.stdout


_SAPPHIRE_RAPIDS = "fpu sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"
_ORIN = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp uscat ilrcpc flagm"


@pytest.mark.parametrize(("arch", "text", "cpu_class", "absent"), [
    ("x86_64", f"model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: {_SAPPHIRE_RAPIDS}\n", "AMX", []),
    ("x86_64", "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n", "AVX2", ["AVX-512", "VNNI", "bf16", "AMX"]),
    ("x86_64", "model name\t: Intel Core i7-1065G7\nflags\t\t: avx2 avx512f avx512_vnni\n", "VNNI", ["bf16", "AMX"]),
    ("aarch64", f"processor\t: 0\nFeatures\t: {_ORIN}\nCPU part\t: 0xd42\n", "aarch64 NEON + dot product", ["bf16", "i8mm", "SVE"]),
])
def test_cpu_class_from_cpuinfo(tmp_path: Path, arch: str, text: str, cpu_class: str, absent: list[str]) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text, encoding="utf-8")
    info = cpu_info(cpuinfo, arch=arch)
    assert (info.cpu_class, list(info.absent)) == (cpu_class, absent)


def test_cpu_class_without_cpuinfo(tmp_path: Path) -> None:
    assert cpu_info(tmp_path / "absent", arch="arm64").cpu_class == "aarch64 NEON"  # macOS: NEON is part of every aarch64 CPU
    assert cpu_info(tmp_path / "absent", arch="x86_64").source.startswith("platform (instruction sets unknown")


def test_jetpack_from_the_l4t_release(tmp_path: Path) -> None:
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13 2024\n")
    section = jetson_section(release)
    assert (section.details["l4t"], section.details["jetpack"], section.missing) == ("36.4.0", "6.1", ())
    release.write_text("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 2023\n")
    section = jetson_section(release)
    assert section.details["jetpack"] == "5.1.2"
    assert section.missing and "JetPack 6.1" in section.missing[0]  # TensorRT 8.5: too old for compir's engines
    assert jetpack_of_l4t("36.4.3") == "6.2" and jetpack_of_l4t("99.0") is None


def test_extras_come_from_the_installed_distribution() -> None:
    extras = installed_extras("compir")
    assert {"cpu", "gpu", "train", "serve", "demo", "all"} <= set(extras)
    gpu = extras["gpu"]
    assert {*gpu.installed, *gpu.missing} == {"onnxruntime-gpu", "tensorrt-cu12"}
    assert "open_clip_torch" in {*extras["all"].installed, *extras["all"].missing}  # through compir[...,train]
