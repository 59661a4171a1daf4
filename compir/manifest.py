"""The export manifest: the only place the runtime learns graph names, shapes, preprocessing and
tokenizer settings (``manifest.json`` in an export folder).

Written by :mod:`compir.export`, read by :mod:`compir.runtime`. Pure Python: no torch, no onnx.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compir.composition import CompositionSpec
from compir.contracts import (
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MANIFEST_SCHEMA,
    MANIFEST_SCHEMA_COMPOSER,
    read_contract,
    sha256_bytes,
    sha256_file,
    verify_sha256,
    write_contract,
)
from compir.errors import ContractError, InputError

# Graph roles, in the fixed vocabulary shared by every stage.
IMAGE_ENCODER = "image_encoder"  # pixel_values -> image_embeds, image_features[, patch_features]
TEXT_ENCODER = "text_encoder"  # input_ids -> text_embeds, text_features[, token_features]
COMPOSER = "composer"  # image_features, text_features -> query_embeds
QUERY_ENCODER = "query_encoder"  # pixel_values, input_ids -> query_embeds (fused, single call)
RERANKER = "reranker"  # token_features, attention_mask, candidate patch features -> scores
# Zero-shot composition (textual inversion, compir.composition) in place of the composer:
TOKEN_MAPPER = "token_mapper"  # image_features -> pseudo_tokens (the reference as one pseudo-word token)
PROMPT_ENCODER = "prompt_encoder"  # input_ids (a prompt holding the placeholder once), pseudo_tokens -> query_embeds
GRAPH_ROLES = (IMAGE_ENCODER, TEXT_ENCODER, COMPOSER, TOKEN_MAPPER, PROMPT_ENCODER, QUERY_ENCODER, RERANKER)
REQUIRED_ROLES = (IMAGE_ENCODER, TEXT_ENCODER, COMPOSER)
ZERO_SHOT_ROLES = (IMAGE_ENCODER, TEXT_ENCODER, TOKEN_MAPPER, PROMPT_ENCODER)
# The named dynamic axis of every graph input and output (axis 0). Export writes it, TensorRT
# profiles and onnxruntime's TensorRT provider size it.
BATCH_AXIS = "batch"
# Axis 1 of the text graphs' ``input_ids`` and ``token_features`` where the text tower allows running
# a batch cut after its longest text (open_clip's causal towers pooling the end-of-text token); the
# runtime then cuts, and pads to the fixed context where the axis is a number (other towers, older
# exports). Every other axis is fixed.
SEQUENCE_AXIS = "sequence"
# Graphs whose weights exceed this keep them in one ONNX external data file beside the graph
# (``<role>.onnx.data``): well under the 2 GiB a protobuf message holds, so that the tools which copy
# or extend a graph (quantizers, optimizers) stay under it too. ``compir export onnx --external-data-mb``.
EXTERNAL_DATA_BYTES = 1 << 30


def external_data_path(graph: Path) -> Path:
    """Where the export writes the external data of the graph file ``graph``: ``<file name>.data`` beside it."""
    return graph.with_name(f"{graph.name}.data")

_DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. A ``str`` entry in ``shape`` is a named dynamic axis."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str) -> TensorSpec:
        try:
            spec = cls(name=str(raw["name"]), dtype=str(raw["dtype"]), shape=tuple(raw["shape"]))
        except (KeyError, TypeError) as exc:
            raise ContractError(f"{source}: malformed tensor spec {raw!r}") from exc
        if spec.dtype not in _DTYPES:
            raise ContractError(f"{source}: tensor {spec.name!r} has unknown dtype {spec.dtype!r}")
        return spec


@dataclass(frozen=True)
class DataFileSpec:
    """An ONNX external data file (a big graph's weights; beside its graph, where onnxruntime looks)."""

    file: str
    sha256: str


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph file of an export variant, with its I/O contract and checksum; ``external_data``
    lists the files holding its weights when they do not fit in the graph file (past 2 GiB)."""

    role: str
    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: tuple[DataFileSpec, ...] = ()

    @property
    def content_sha256(self) -> str:
        """Checksum of the whole graph: the file's, or, with external data, one over every file's."""
        if not self.external_data:
            return self.sha256
        return sha256_bytes(" ".join([self.sha256, *(data.sha256 for data in self.external_data)]).encode("ascii"))

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name, what=f"{self.role} input")

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name, what=f"{self.role} output")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str) -> GraphSpec:
        try:
            return cls(
                role=str(raw["role"]),
                file=str(raw["file"]),
                sha256=str(raw["sha256"]),
                inputs=tuple(TensorSpec.from_dict(t, source=source) for t in raw["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t, source=source) for t in raw["outputs"]),
                external_data=tuple(DataFileSpec(file=str(d["file"]), sha256=str(d["sha256"])) for d in raw.get("external_data", ())),
            )
        except (KeyError, TypeError) as exc:
            raise ContractError(f"{source}: malformed graph entry ({exc})") from exc


@dataclass(frozen=True)
class VariantSpec:
    """A set of graphs at one precision (``fp32``, ``fp16``, ``int8-dynamic``, ``int8-static``).

    ``parity`` holds the figures measured at export time per graph role (max abs diff against
    torch for fp32; cosine to fp32 for the others); ``accuracy`` the recall cost on the
    evaluation split (``recall_at_10_drop``, ``mean_cosine_to_fp32``, ...); ``quantization`` how
    the variant was made (recipe name and the quantizer's options, e.g. ``reduce_range``), so a
    reader knows which CPU classes it was chosen for.
    """

    name: str
    graphs: dict[str, GraphSpec]
    parity: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)

    def graph(self, role: str) -> GraphSpec:
        if role not in self.graphs:
            raise ContractError(f"export variant {self.name!r} has no {role!r} graph (it has {sorted(self.graphs)})")
        return self.graphs[role]


RESIZE_MODES = ("shortest", "squash", "longest", "targetpad")
INTERPOLATIONS = ("bicubic", "bilinear")
CLIP4CIR_TARGET_RATIO = 1.25  # the ratio of CLIP4Cir's released models (their --target-ratio)


@dataclass(frozen=True)
class PreprocessSpec:
    """Image preprocessing, identical to the training transform (open_clip's eval transform)."""

    image_size: int
    # "shortest": resize the short side then center-crop; "squash": resize both sides; "longest": fit
    # the long side and pad; "targetpad": CLIP4Cir's (pad to ``target_ratio``, then as "shortest")
    resize_mode: str
    interpolation: str  # "bicubic" | "bilinear"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # "targetpad" only: an image whose long/short side ratio is at least this is zero-padded (centred,
    # black) to long / target_ratio on both sides first. None for every other mode (and omitted from
    # fingerprints, so indexes built before this field existed stay valid).
    target_ratio: float | None = None

    def problem(self) -> str | None:
        """What makes this spec unusable (one line), or None."""
        if self.interpolation not in INTERPOLATIONS:
            return f"interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}"
        if self.resize_mode not in RESIZE_MODES:
            return f"resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}"
        if self.image_size <= 0 or len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            return f"invalid size/mean/std in {self}"
        if (self.resize_mode == "targetpad") != (self.target_ratio is not None):
            return f"target_ratio is set for, and only for, resize_mode 'targetpad' (got {self.resize_mode!r}, {self.target_ratio})"
        if self.target_ratio is not None and not self.target_ratio >= 1.0:
            return f"target_ratio must be >= 1 (long side / short side), got {self.target_ratio}"
        return None

    def target_padding(self, width: int, height: int) -> tuple[int, int]:
        """"targetpad": the black border (left = right, top = bottom) CLIP4Cir's TargetPad adds to a
        ``width`` x ``height`` image: none below ``target_ratio``, else towards long / target_ratio on
        each axis (only the short axis grows; truncated with int() as theirs)."""
        ratio = self.target_ratio
        if ratio is None or max(width, height) / min(width, height) < ratio:
            return 0, 0
        scaled = max(width, height) / ratio
        return max(int((scaled - width) / 2), 0), max(int((scaled - height) / 2), 0)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values; ``target_ratio`` only where it is set."""
        fields = asdict(self)
        if self.target_ratio is None:
            del fields["target_ratio"]
        return fields


def rgb_values(values: Any, *, field_name: str) -> tuple[float, float, float]:
    """Per-channel (R, G, B) floats from a JSON list, e.g. a normalization mean."""
    floats = [float(x) for x in values]
    if len(floats) != 3:
        raise InputError(f"preprocess {field_name}: expected 3 values (R, G, B), got {len(floats)}")
    return floats[0], floats[1], floats[2]


@dataclass(frozen=True)
class TokenizerSpec:
    """Tokenizer settings; ``vocab_file`` is copied into the export folder.

    ``kind``: ``clip_bpe`` (CLIP's BPE, ``vocab_file`` its gzipped merges) or ``hf`` (a Hugging Face
    ``tokenizer.json`` run by the ``tokenizers`` library, padding and truncation included; open_clip's
    ``HFTokenizer``). An id of -1 means the tokenizer has no such token.
    """

    kind: str  # "clip_bpe" | "hf"
    vocab_file: str
    vocab_sha256: str
    context_length: int
    sot_id: int
    eot_id: int
    pad_id: int
    clean: str = "lower"  # open_clip's text cleaning: "lower" | "whitespace" | "canonicalize"
    strip_sep_id: int = -1  # hf: this id is replaced by 0 after tokenizing (open_clip's strip_sep_token)


@dataclass(frozen=True)
class ArtifactSpec:
    """A non-graph file of the export (e.g. MMRef's reference matrix ``references.npy``)."""

    file: str
    sha256: str
    description: str = ""


@dataclass(frozen=True)
class EncoderFingerprint:
    """What determines a gallery index's vectors and cached features: the image-encoder graph
    (by checksum), the preprocessing that feeds it, the embedding size and the metric.

    An index is bound to this, not to the manifest's bytes: re-exporting the same checkpoint
    (byte-identical graphs) keeps every index valid, and the text encoder or composer may change
    without touching the gallery side. The fp32 image encoder stands for every variant (each is
    derived from it and checked against it), so switching variant keeps the index too.
    """

    image_encoder_sha256: str
    preprocess: PreprocessSpec
    embed_dim: int
    metric: str

    @property
    def digest(self) -> str:
        """sha256 of the fields in canonical JSON: what ``index.json`` compares."""
        return sha256_bytes(json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8"))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "preprocess": self.preprocess.to_dict()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str) -> EncoderFingerprint:
        try:
            return cls(
                image_encoder_sha256=str(raw["image_encoder_sha256"]),
                preprocess=_preprocess_from_dict(raw["preprocess"]),
                embed_dim=int(raw["embed_dim"]),
                metric=str(raw["metric"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(f"{source}: malformed encoder fingerprint ({type(exc).__name__}: {exc})") from exc

    def differences(self, other: EncoderFingerprint) -> list[str]:
        """Human-readable list of the fields in which ``other`` differs from this one."""
        found = []
        if self.image_encoder_sha256 != other.image_encoder_sha256:
            found.append(f"image encoder graph sha256 {self.image_encoder_sha256[:12]}... vs {other.image_encoder_sha256[:12]}...")
        if self.preprocess != other.preprocess:
            found.append(f"preprocessing {self.preprocess.to_dict()} vs {other.preprocess.to_dict()}")
        if self.embed_dim != other.embed_dim:
            found.append(f"embed_dim {self.embed_dim} vs {other.embed_dim}")
        if self.metric != other.metric:
            found.append(f"metric {self.metric!r} vs {other.metric!r}")
        return found


@dataclass(frozen=True)
class ExportManifest:
    model_config: dict[str, Any]
    head: str
    embed_dim: int
    metric: str
    preprocess: PreprocessSpec
    tokenizer: TokenizerSpec
    variants: dict[str, VariantSpec]
    default_variant: str = "fp32"
    artifacts: dict[str, ArtifactSpec] = field(default_factory=dict)
    source_checkpoint_sha256: str = ""
    opset: int = 17
    compir_version: str = ""
    # How queries compose (a learned composer, or zero-shot with a prompt template); None: the head's composer
    composition: CompositionSpec | None = None

    @property
    def composition_spec(self) -> CompositionSpec:
        return self.composition or CompositionSpec(kind=self.head)

    @property
    def zero_shot(self) -> bool:
        """True for a zero-shot export (token_mapper + prompt_encoder graphs instead of a composer)."""
        return self.composition_spec.zero_shot

    @property
    def schema_version(self) -> int:
        """The manifest schema this export needs: zero-shot ones the current, the others the one older runtimes read."""
        return MANIFEST_SCHEMA if self.zero_shot else MANIFEST_SCHEMA_COMPOSER

    def variant(self, name: str | None = None) -> VariantSpec:
        key = name or self.default_variant
        if key not in self.variants:
            raise ContractError(f"this export has no {key!r} variant; it has {sorted(self.variants)}")
        return self.variants[key]

    def graph(self, role: str, variant: str | None = None) -> GraphSpec:
        return self.variant(variant).graph(role)

    def encoder_fingerprint(self) -> EncoderFingerprint:
        """What an index built with this export is bound to (see :class:`EncoderFingerprint`)."""
        reference = self.variants.get("fp32") or self.variant()
        return EncoderFingerprint(
            image_encoder_sha256=reference.graph(IMAGE_ENCODER).content_sha256,
            preprocess=self.preprocess,
            embed_dim=self.embed_dim,
            metric=self.metric,
        )

    # ---- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "preprocess": self.preprocess.to_dict()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = MANIFEST_FILE) -> ExportManifest:
        try:
            pre = raw["preprocess"]
            tok = raw["tokenizer"]
            variants = {
                name: VariantSpec(
                    name=name,
                    graphs={
                        role: GraphSpec.from_dict(g, source=f"{source} [{name}.{role}]")
                        for role, g in v["graphs"].items()
                    },
                    parity={k: float(x) for k, x in v.get("parity", {}).items()},
                    accuracy={k: float(x) for k, x in v.get("accuracy", {}).items()},
                    quantization=dict(v.get("quantization", {})),
                )
                for name, v in raw["variants"].items()
            }
            manifest = cls(
                model_config=dict(raw["model_config"]),
                head=str(raw["head"]),
                embed_dim=int(raw["embed_dim"]),
                metric=str(raw["metric"]),
                preprocess=_preprocess_from_dict(pre),
                tokenizer=TokenizerSpec(**tok),
                variants=variants,
                default_variant=str(raw.get("default_variant", "fp32")),
                artifacts={k: ArtifactSpec(**a) for k, a in raw.get("artifacts", {}).items()},
                source_checkpoint_sha256=str(raw.get("source_checkpoint_sha256", "")),
                opset=int(raw.get("opset", 17)),
                compir_version=str(raw.get("compir_version", "")),
                composition=CompositionSpec.from_dict(raw["composition"], source=source) if raw.get("composition") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(f"{source}: malformed manifest ({type(exc).__name__}: {exc})") from exc
        manifest._validate(source)
        return manifest

    def _validate(self, source: str) -> None:
        if self.default_variant not in self.variants:
            raise ContractError(f"{source}: default variant {self.default_variant!r} is not among {sorted(self.variants)}")
        problem = self.composition_spec.problem()
        if problem:
            raise ContractError(f"{source}: {problem}")
        required = ZERO_SHOT_ROLES if self.zero_shot else REQUIRED_ROLES
        for variant in self.variants.values():
            missing = [role for role in required if role not in variant.graphs]
            if missing:
                raise ContractError(f"{source}: variant {variant.name!r} lacks graph(s) {missing}")
        if self.metric != "cos":
            raise ContractError(f"{source}: metric {self.metric!r} is not supported (only 'cos')")
        if self.embed_dim <= 0:
            raise ContractError(f"{source}: embed_dim must be positive")


def save_manifest(export_dir: str | Path, manifest: ExportManifest) -> Path:
    """Atomically write ``manifest.json`` into ``export_dir``; returns its path."""
    path = Path(export_dir) / MANIFEST_FILE
    body = manifest.to_dict()
    write_contract(path, fmt=MANIFEST_FORMAT, schema_version=manifest.schema_version, body=body)
    return path


def load_manifest(export_dir: str | Path, *, verify_files: bool = True) -> ExportManifest:
    """Read ``manifest.json`` and (by default) check every graph and artifact checksum.

    Raises ContractError naming the file and what is wrong: missing, damaged, mismatched.
    """
    folder = Path(export_dir)
    if not folder.is_dir():
        raise ContractError(f"export folder {folder} does not exist; run `compir export onnx` first")
    path = folder / MANIFEST_FILE
    raw = read_contract(path, fmt=MANIFEST_FORMAT, schema_version=MANIFEST_SCHEMA)
    manifest = ExportManifest.from_dict(raw, source=str(path))
    if verify_files:
        for variant in manifest.variants.values():
            for graph in variant.graphs.values():
                verify_sha256(folder / graph.file, graph.sha256, what=f"{variant.name} {graph.role} graph")
                for data in graph.external_data:
                    verify_sha256(folder / data.file, data.sha256, what=f"{variant.name} {graph.role} graph's external data")
        for name, artifact in manifest.artifacts.items():
            verify_sha256(folder / artifact.file, artifact.sha256, what=f"artifact {name!r}")
        verify_sha256(folder / manifest.tokenizer.vocab_file, manifest.tokenizer.vocab_sha256, what="tokenizer vocab")
    return manifest


def manifest_sha256(export_dir: str | Path) -> str:
    """Checksum of ``manifest.json``: what ``engines.json`` records to bind engines to their export
    (index folders of schema 1 recorded it too; newer ones record an :class:`EncoderFingerprint`)."""
    return sha256_file(Path(export_dir) / MANIFEST_FILE)


def _preprocess_from_dict(raw: dict[str, Any]) -> PreprocessSpec:
    ratio = raw.get("target_ratio")
    return PreprocessSpec(
        image_size=int(raw["image_size"]),
        resize_mode=str(raw["resize_mode"]),
        interpolation=str(raw["interpolation"]),
        mean=rgb_values(raw["mean"], field_name="mean"),
        std=rgb_values(raw["std"], field_name="std"),
        target_ratio=None if ratio is None else float(ratio),
    )


def _by_name(specs: tuple[TensorSpec, ...], name: str, *, what: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise ContractError(f"no {what} named {name!r} (have {[s.name for s in specs]})")
