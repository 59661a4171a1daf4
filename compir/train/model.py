"""CIRModel: an open_clip backbone (both towers emit their tokens) plus a composition head.

The three encode methods are what the export stage traces into ONNX graphs, so they take and
return plain tensors (tuples of tensors); see ``docs`` in compir/manifest.py for graph names.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compir.contracts import atomic_write_bytes
from compir.errors import InputError
from compir.manifest import PreprocessSpec
from compir.train.config import CAPTION_LOSS, ModelConfig
from compir.train.heads import build_head
from compir.train.heads.base import CompositionHead
from compir.train.losses import symmetric_contrastive_loss

_MAX_LOGIT_SCALE = 100.0  # CLIP clamps its learned temperature at this


class CIRModel(nn.Module):
    """Composed image retrieval model.

    ``pretrained``: an open_clip pretrained tag (downloads, for open_clip-named configs) or a
    local file of open_clip weights; None trains from scratch. The head is always fresh.
    """

    def __init__(self, config: ModelConfig, *, pretrained: str | None = None) -> None:
        super().__init__()
        backbone, preprocess = _create_backbone(config, pretrained=pretrained)
        # open_clip's CustomTextCLIP: .visual and .text return (pooled, tokens) here.
        self.backbone: Any = backbone
        # Record the backbone's final preprocessing (a pretrained tag may set mean/std; the
        # config's own entries were passed to open_clip as overrides and win).
        self.config: ModelConfig = dataclasses.replace(config, preprocess=preprocess)
        self.head: CompositionHead = build_head(
            config.head,
            embed_dim=config.embed_dim,
            image_width=int(config.clip_cfg["vision_cfg"]["width"]),
            text_width=int(config.clip_cfg["text_cfg"]["width"]),
            options=dict(config.head_options),
        )

    @property
    def preprocess(self) -> PreprocessSpec:
        return self.config.preprocess_spec()

    @property
    def context_length(self) -> int:
        return self.config.context_length

    @property
    def embed_dim(self) -> int:
        return self.head.output_dim

    def logit_scale(self) -> torch.Tensor:
        """The learned (exponentiated, clamped) softmax temperature of the losses."""
        return self.backbone.logit_scale.exp().clamp(max=_MAX_LOGIT_SCALE)

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> image_embeds (B, D), image_features (head-defined), patch_features (B, P, Wi)."""
        if self.head.wants_raw_image_tokens:
            pooled, raw, patches = _visual_with_raw_tokens(self.backbone.visual, pixel_values)
            features = self.head.image_features(pooled, raw)
        else:
            pooled, patches = self.backbone.visual(pixel_values)  # (B, E), (B, P, Wi)
            features = self.head.image_features(pooled, patches)
        return self.head.gallery_embeds(features), features, patches

    def encode_text(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L) int64 -> text_embeds (B, D), text_features (head-defined), token_features (B, L, Wt)."""
        pooled, tokens = self.backbone.text(input_ids)  # (B, E), (B, L, Wt)
        features = self.head.text_features(pooled, tokens, input_ids)
        return self.head.text_embeds(features), features, tokens

    def compose(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Head-defined features of a reference image and a modification text -> (B, D) query."""
        return self.head.compose(image_features, text_features)

    def encode_query(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Fused query path (the ``query_encoder`` graph): reference pixels + text -> (B, D)."""
        _, image_features, _ = self.encode_image(pixel_values)
        _, text_features, _ = self.encode_text(input_ids)
        return self.compose(image_features, text_features)

    def forward(
        self,
        reference_pixels: torch.Tensor,
        input_ids: torch.Tensor,
        target_pixels: torch.Tensor,
        caption_ids: torch.Tensor | None = None,
        reference_index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training losses of a batch of B triplets (named, unweighted; see ``config.loss_weights``).

        reference_pixels (R, 3, S, S), input_ids (B, L), target_pixels (B, 3, S, S); triplet i's
        reference is row ``reference_index[i]`` (default: row i, R = B), so sibling queries of
        one reference encode it once. Terms: the head's, plus ``caption`` (CLIP's contrastive
        loss between the targets' gallery vectors and their descriptions, so text-only search
        works) where captions are given and weighted. The loop calls this through DDP.
        """
        refs = reference_pixels.shape[0]
        _, image_features, _ = self.encode_image(torch.cat([reference_pixels, target_pixels]))  # (R + B, ...)
        reference_features, target_features = image_features[:refs], image_features[refs:]
        if reference_index is not None:
            reference_features = reference_features[reference_index]
        batch = input_ids.shape[0]
        use_captions = caption_ids is not None and self.config.loss_weights.get(CAPTION_LOSS, 0.0) > 0
        texts = torch.cat([input_ids, caption_ids]) if use_captions and caption_ids is not None else input_ids
        text_embeds, text_features, _ = self.encode_text(texts)  # (B or 2B, ...)
        scale = self.logit_scale()
        losses = self.head.training_losses(
            reference=reference_features, text=text_features[:batch], target=target_features, logit_scale=scale
        )
        if use_captions:
            gallery = self.head.gallery_embeds(target_features)
            losses[CAPTION_LOSS] = symmetric_contrastive_loss(text_embeds[batch:], gallery, scale)
        return losses

    def freeze_towers(self, *, image: bool = False, text: bool = False) -> None:
        """Stop training the image and/or text tower (open_clip's lock: weights and norms)."""
        if image:
            self.backbone.lock_image_tower()
        if text:
            self.backbone.lock_text_tower()


def _visual_with_raw_tokens(visual: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """open_clip's VisionTransformer forward, also returning its tokens before the final LayerNorm.

    -> pooled (B, E), raw tokens (B, 1 + P, Wi) with the class token first, patch tokens (B, P, Wi)
    exactly as ``visual(pixel_values)`` returns them.
    """
    if not all(hasattr(visual, name) for name in ("_embeds", "transformer", "_pool")):
        raise InputError(f"this head needs a ViT image tower (open_clip VisionTransformer); got {type(visual).__name__}")
    raw = visual.transformer(visual._embeds(pixel_values))  # (B, 1 + P, Wi)
    pooled, patches = visual._pool(raw)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled, raw, patches


def _create_backbone(config: ModelConfig, *, pretrained: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """open_clip.create_model for ``config``'s architecture with token outputs on both towers.

    Returns the model and its preprocessing (open_clip's, e.g. a pretrained tag's mean/std).
    """
    import open_clip

    arch = copy.deepcopy(config.clip_cfg)
    vision_cfg = {**arch["vision_cfg"], "output_tokens": True}
    text_cfg = {**arch["text_cfg"], "output_tokens": True}
    name = config.clip_name or _register_architecture(arch)
    with _quiet_open_clip(pretrained is None):
        try:
            model = open_clip.create_model(
                name,
                pretrained=pretrained,
                force_custom_text=True,  # text tower as a module that can return its token states
                force_preprocess_cfg=dict(config.preprocess) or None,
                vision_cfg=vision_cfg,
                text_cfg=text_cfg,
            )
        except RuntimeError as exc:
            raise InputError(f"cannot build open_clip model {config.name!r} (pretrained={pretrained!r}): {exc}") from exc
    final = open_clip.get_model_preprocess_cfg(model)
    preprocess = {key: final[key] for key in ("mean", "std", "interpolation", "resize_mode") if key in final}
    return model, {k: [float(x) for x in v] if isinstance(v, (tuple, list)) else v for k, v in preprocess.items()}


_registered: set[str] = set()


def _register_architecture(arch: dict[str, Any]) -> str:
    """Make an inline architecture known to open_clip under a content-derived name.

    open_clip's registry reads JSON files (``open_clip.add_model_config``), so the architecture
    is written once per process to a file named after its hash.
    """
    text = json.dumps(arch, sort_keys=True)
    name = "compir-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    if name not in _registered:
        import open_clip

        path = Path(tempfile.gettempdir()) / "compir-open-clip-configs" / f"{name}.json"
        atomic_write_bytes(path, text.encode("utf-8"))
        open_clip.add_model_config(path)
        _registered.add(name)
    return name


@contextlib.contextmanager
def _quiet_open_clip(quiet: bool) -> Iterator[None]:
    # open_clip warns "Model initialized randomly" on every from-scratch build; for compir that
    # is the normal case (or weights follow from a checkpoint), so the warning is hidden.
    root = logging.getLogger()
    previous = root.level
    if quiet:
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(previous)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
