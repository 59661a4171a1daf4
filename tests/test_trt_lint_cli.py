"""The lint where it runs: ``compir export onnx`` (warnings; ``--strict-trt``: exit 2 and nothing
written) and ``compir export engine`` (refused before TensorRT is imported). The finding used is a
real one: opset 21 graphs, which TensorRT 10.3 (JetPack 6.1/6.2) does not parse."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from compir.cli import main as compir_main


def test_strict_trt_writes_nothing_and_the_engine_build_refuses_before_tensorrt(
    micro_checkpoint: Path, synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "export"
    export = ["export", "onnx", str(micro_checkpoint), "--out", str(out), "--variants", "fp32", "--opset", "21",
              "--calibration-data", str(synth_data), "--calibration-count", "4"]
    assert compir_main([*export, "--strict-trt"]) == 2
    err = capsys.readouterr().err
    assert "--strict-trt: TensorRT's ONNX parser would refuse" in err and "nothing was written" in err
    assert "fp32/image_encoder: graph (-): [opset] opset 21 is outside the parsed range 9..20 (TensorRT 10.3; operators-10.0)" in err
    assert not out.exists()

    assert compir_main(export) == 0  # without --strict-trt: written, with a warning per finding
    err = capsys.readouterr().err
    assert "warning: TensorRT lint: fp32/text_encoder: graph (-): [opset] opset 21" in err and (out / "manifest.json").is_file()

    # The engine build lints first: the finding, not a missing TensorRT, is what stops it here.
    assert compir_main(["export", "engine", str(out), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT's ONNX parser would refuse" in err and "[opset] opset 21" in err and not (out / "engines").exists()


def test_engine_build_lints_the_variant_it_parses(tiny_export_all: Path) -> None:
    """int8-static-u8's Q/DQ nodes (u8, non-zero zero points) are refused by the lint, before TensorRT
    is touched; --no-trt-lint goes on to the builder (absent here: the TensorRT error follows)."""
    from compir.errors import ContractError
    from compir.export.trt.engine_build import BuildOptions, build_engines

    with pytest.raises(ContractError, match=r"(?s)would refuse \d+ node\(s\).*\[zero-point\] zero point .* holds"):
        build_engines(tiny_export_all, options=BuildOptions(precision="int8"), variant="int8-static-u8")
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(ContractError, match="TensorRT is not installed"):
            build_engines(tiny_export_all, options=BuildOptions(precision="int8", trt_lint=False), variant="int8-static-u8")
    assert not (tiny_export_all / "engines").exists()
