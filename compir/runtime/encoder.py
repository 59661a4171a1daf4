"""The export's graphs behind three calls: encode images, encode texts, compose.

A zero-shot export (:mod:`compir.composition`) composes without a composer graph: the token mapper
turns the reference's image features into a pseudo-word token and the prompt encoder reads the prompt
template filled with the modification, the token in the placeholder's place (:meth:`Encoder.compose_texts`).

Everything about the graphs (names, dtypes, feature shapes, preprocessing, tokenizer) comes from
the manifest; feeds are cast to the manifest's input dtypes and outputs come back as float32, so
fp32, fp16 and int8 variants look the same to callers.

Token ids are fitted to the text graph (:func:`fit_length`): where its ``input_ids`` have the
dynamic ``sequence`` axis, a batch runs cut after its longest text (the text tower's outputs are
the same, see :data:`compir.manifest.SEQUENCE_AXIS`); where the length is a number (a tower that
pools a fixed position, older exports), ids are padded or cut to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from compir.composition import check_prompt_ids
from compir.errors import ContractError
from compir.manifest import (
    COMPOSER,
    IMAGE_ENCODER,
    PROMPT_ENCODER,
    TEXT_ENCODER,
    TOKEN_MAPPER,
    ExportManifest,
    GraphSpec,
    TensorSpec,
    load_manifest,
    manifest_sha256,
)
from compir.runtime.backends import Backend, GraphSession, open_backend
from compir.runtime.backends.base import numpy_dtype
from compir.runtime.preprocess import check_spec, preprocess_batch
from compir.runtime.tokenizer import load_tokenizer


@dataclass(frozen=True)
class ImageEncoding:
    image_embeds: np.ndarray  # (B, D) unit vectors: what the gallery index stores
    image_features: np.ndarray  # (B, *F) head-defined: what the composer takes


@dataclass(frozen=True)
class TextEncoding:
    text_embeds: np.ndarray  # (B, D) unit vectors: text-only queries
    text_features: np.ndarray  # (B, *F) head-defined: what the composer takes


class Encoder:
    """Image encoder + text encoder + composer (or token mapper + prompt encoder) of one export variant on one backend.

    ``prompt_template``: a zero-shot export's template for this encoder's queries (default: the manifest's);
    an InputError with the reason when it is not a usable template or the export has a learned composer."""

    def __init__(self, export_dir: str | Path, manifest: ExportManifest, backend: Backend, *, variant: str | None = None,
                 prompt_template: str | None = None) -> None:
        self.export_dir = Path(export_dir)
        self.manifest = manifest
        self.backend = backend
        self.variant = manifest.variant(variant).name
        self.manifest_sha256 = manifest_sha256(export_dir)
        self.fingerprint = manifest.encoder_fingerprint()  # what an index built with this encoder is bound to
        check_spec(manifest.preprocess)
        self.composition = manifest.composition_spec
        self.zero_shot = self.composition.zero_shot
        # zero-shot: what queries are filled into; refused (InputError) for a learned composer or a bad template
        self.template = self.composition.template(prompt_template) if self.zero_shot or prompt_template is not None else None
        self.tokenizer = load_tokenizer(export_dir, manifest.tokenizer)
        self._image = backend.open(self._graph(IMAGE_ENCODER))
        self._text = backend.open(self._graph(TEXT_ENCODER))
        self.text_length = text_length(self._graph(TEXT_ENCODER))  # None: cut each batch after its longest text
        self._composer = None if self.zero_shot else backend.open(self._graph(COMPOSER))
        self._mapper = backend.open(self._graph(TOKEN_MAPPER)) if self.zero_shot else None
        self._prompt = backend.open(self._graph(PROMPT_ENCODER)) if self.zero_shot else None
        self.prompt_length = text_length(self._graph(PROMPT_ENCODER)) if self.zero_shot else None
        self.feature_shape = image_feature_shape(manifest, self.variant)
        self._check_dims()

    @classmethod
    def from_export(
        cls,
        export_dir: str | Path,
        *,
        backend: str = "onnxruntime",
        providers: Sequence[str] | None = None,
        variant: str | None = None,
        spinning: bool = False,
        threads: int = 0,
        prompt_template: str | None = None,
    ) -> Encoder:
        """Load and verify ``export_dir`` (manifest, checksums, graph I/O) and open its graphs.

        ``spinning=True`` lets onnxruntime's idle pool threads busy-wait (see ``open_session``);
        ``threads`` caps onnxruntime's pool per graph (0: its default, one per core)."""
        manifest = load_manifest(export_dir)
        opened = open_backend(backend, export_dir, providers=providers, spinning=spinning, threads=threads)
        # Engines are parsed from one ONNX variant: its graph specs describe them.
        engine_variant = getattr(opened, "variant", None)
        if engine_variant is not None and variant not in (None, engine_variant):
            raise ContractError(f"the TensorRT engines were built from variant {engine_variant!r}, not {variant!r}")
        return cls(export_dir, manifest, opened, variant=engine_variant or variant, prompt_template=prompt_template)

    @property
    def embed_dim(self) -> int:
        return self.manifest.embed_dim

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images -> ``pixel_values`` (B, 3, S, S) float32."""
        return preprocess_batch(images, self.manifest.preprocess)

    def encode_pixels(self, pixel_values: np.ndarray) -> ImageEncoding:
        out = _run(self._image, {"pixel_values": pixel_values}, ("image_embeds", "image_features"))
        return ImageEncoding(image_embeds=out["image_embeds"], image_features=out["image_features"])

    def encode_images(self, images: Sequence[Image.Image], *, batch_size: int = 32) -> ImageEncoding:
        parts = [self.encode_pixels(self.preprocess(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        if not parts:
            return ImageEncoding(np.zeros((0, self.embed_dim), np.float32), np.zeros((0, *self.feature_shape), np.float32))
        return ImageEncoding(
            image_embeds=np.concatenate([p.image_embeds for p in parts]),
            image_features=np.concatenate([p.image_features for p in parts]),
        )

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> ``input_ids`` (B, context_length) int64, exactly the tokenizer's (the training ids)."""
        return self.tokenizer(texts)

    def encode_input_ids(self, input_ids: np.ndarray) -> TextEncoding:
        """(B, L) ids (any L up to the context; padding after each text) -> the text graph's outputs."""
        ids = fit_length(np.asarray(input_ids), length=self.text_length, pad_id=self.tokenizer.spec.pad_id)
        out = _run(self._text, {"input_ids": ids}, ("text_embeds", "text_features"))
        return TextEncoding(text_embeds=out["text_embeds"], text_features=out["text_features"])

    def encode_texts(self, texts: Sequence[str]) -> TextEncoding:
        return self.encode_input_ids(self.tokenize(texts))

    def compose(self, image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
        """(B, *F) image features + (B, *F') text features -> ``query_embeds`` (B, D) unit vectors."""
        if self._composer is None:
            raise ContractError("a zero-shot export has no composer graph: compose with compose_texts (token mapper + prompt encoder)")
        feeds = {"image_features": image_features, "text_features": text_features}
        return _run(self._composer, feeds, ("query_embeds",))["query_embeds"]

    def compose_texts(self, image_features: np.ndarray, texts: Sequence[str], *, text_features: np.ndarray | None = None) -> np.ndarray:
        """(B, *F) reference image features + B modification texts -> ``query_embeds`` (B, D): the composer on the
        texts' features (``text_features`` when already encoded), or zero-shot the prompt encoder on their prompts."""
        if self.zero_shot:
            return self.encode_prompts(self.prompt_ids(texts), self.map_image(image_features))
        features = self.encode_texts(texts).text_features if text_features is None else text_features
        return self.compose(image_features, features)

    def map_image(self, image_features: np.ndarray) -> np.ndarray:
        """Zero-shot: (B, E) image features -> ``pseudo_tokens`` (B, Wt), the reference as a pseudo word."""
        if self._mapper is None:
            raise ContractError("this export composes with a learned composer; it has no token mapper")
        return _run(self._mapper, {"image_features": image_features}, ("pseudo_tokens",))["pseudo_tokens"]

    def prompt_ids(self, texts: Sequence[str]) -> np.ndarray:
        """Zero-shot: modification texts -> (B, L) ids of the template filled with each (the placeholder once)."""
        if self.template is None or self.composition.placeholder_id < 0:
            raise ContractError("this export composes with a learned composer; it has no prompt template")
        ids = self.tokenizer([self.template.fill(text) for text in texts])
        check_prompt_ids(ids, placeholder_id=self.composition.placeholder_id, texts=texts)
        return ids

    def encode_prompts(self, input_ids: np.ndarray, pseudo_tokens: np.ndarray) -> np.ndarray:
        """Zero-shot: (B, L) prompt ids + (B, Wt) pseudo tokens -> ``query_embeds`` (B, D) unit vectors."""
        if self._prompt is None:
            raise ContractError("this export composes with a learned composer; it has no prompt encoder")
        ids = fit_length(np.asarray(input_ids), length=self.prompt_length, pad_id=self.tokenizer.spec.pad_id)
        return _run(self._prompt, {"input_ids": ids, "pseudo_tokens": pseudo_tokens}, ("query_embeds",))["query_embeds"]

    def warmup(self) -> None:
        """One call per graph, so the first real query does not pay session initialisation."""
        size = self.manifest.preprocess.image_size
        image = self.encode_pixels(np.zeros((1, 3, size, size), np.float32))
        text = self.encode_input_ids(self.tokenize(["warm up"]))
        self.compose_texts(image.image_features, ["warm up"], text_features=text.text_features)

    def backend_info(self) -> dict[str, object]:
        return {**self.backend.info(), "variant": self.variant}

    def _graph(self, role: str) -> GraphSpec:
        return self.manifest.graph(role, self.variant)

    def _check_dims(self) -> None:
        query_role = PROMPT_ENCODER if self.zero_shot else COMPOSER
        for role, name in ((IMAGE_ENCODER, "image_embeds"), (TEXT_ENCODER, "text_embeds"), (query_role, "query_embeds")):
            tail = _static_tail(self._graph(role).output(name))
            if tail != (self.embed_dim,):
                raise ContractError(f"{role} output {name!r} has shape (batch, {tail}), the manifest's embed_dim is {self.embed_dim}")


def text_length(graph: GraphSpec) -> int | None:
    """The fixed token count of a text graph's ``input_ids``, or None where its axis 1 is dynamic."""
    axis = graph.input("input_ids").shape[1]
    return axis if isinstance(axis, int) else None


def fit_length(input_ids: np.ndarray, *, length: int | None, pad_id: int) -> np.ndarray:
    """(B, L) ids -> (B, L') for a text graph: ``length`` None cuts after the last position that is
    not ``pad_id`` in some row (at least 1); a fixed ``length`` pads with ``pad_id`` or cuts to it."""
    if input_ids.ndim != 2:
        raise ContractError(f"input_ids must be (batch, tokens), got shape {input_ids.shape}")
    if length is None:
        used = np.flatnonzero((input_ids != pad_id).any(axis=0))
        return input_ids[:, : max(int(used[-1]) + 1 if used.size else 0, 1)]
    if input_ids.shape[1] >= length:
        return input_ids[:, :length]
    return np.pad(input_ids, ((0, 0), (0, length - input_ids.shape[1])), constant_values=pad_id)


def image_feature_shape(manifest: ExportManifest, variant: str | None = None) -> tuple[int, ...]:
    """The per-image shape of ``image_features`` (what an index caches), read from the manifest alone."""
    return _static_tail(manifest.graph(IMAGE_ENCODER, variant).output("image_features"))


def _static_tail(spec: TensorSpec) -> tuple[int, ...]:
    tail = tuple(dim for dim in spec.shape[1:] if isinstance(dim, int))
    if len(tail) != len(spec.shape) - 1:
        raise ContractError(f"tensor {spec.name!r}: only the batch axis may be dynamic, got {list(spec.shape)}")
    return tail


def _run(session: GraphSession, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
    typed = {name: np.ascontiguousarray(value, dtype=numpy_dtype(session.spec.input(name).dtype)) for name, value in feeds.items()}
    return {name: np.asarray(value, dtype=np.float32) for name, value in session.run(typed, outputs).items()}
