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
from compir.train.hub import hub_access, load_failure
from compir.train.inversion import check_text_tower, encode_prompt, placeholder_id, train_prompt_ids
from compir.train.losses import symmetric_contrastive_loss
from compir.train.text import TextTokenizer
from compir.train.towers import encode_vision, onednn_unsafe, region_tokens, tower_kernels, vision_family, vision_token_width
from compir.train.weights import resolve_activation, weights_file

_MAX_LOGIT_SCALE = 100.0  # CLIP clamps its learned temperature at this


class CIRModel(nn.Module):
    """Composed image retrieval model.

    ``pretrained``: an open_clip pretrained tag (downloads, for open_clip-named configs) or a
    local weights file (open_clip's format, or OpenAI's TorchScript release); None trains from
    scratch. The activation follows the weights (:func:`resolve_activation`). The head is always fresh.
    """

    def __init__(self, config: ModelConfig, *, pretrained: str | None = None) -> None:
        super().__init__()
        config, self.activation_note = resolve_activation(config, pretrained)
        backbone, preprocess = _create_backbone(config, pretrained=pretrained)
        # open_clip's CustomTextCLIP: .text returns (pooled, tokens); .visual through encode_vision.
        self.backbone: Any = backbone
        # Record the backbone's final preprocessing (a pretrained tag may set mean/std; the
        # config's own entries were passed to open_clip as overrides and win).
        self.config: ModelConfig = dataclasses.replace(config, preprocess=preprocess)
        self.tokenizer = TextTokenizer.of(config.clip_cfg, context_length=config.context_length)
        # Token ids that are padding for the heads (CLIP pads with 0, Hugging Face tokenizers their own id).
        self.pad_id = int(self.tokenizer.settings()["pad_id"])
        self.text_width = _text_width(self.backbone.text)  # width of the text tower's token states
        self.head: CompositionHead = build_head(
            config.head,
            embed_dim=config.embed_dim,
            image_width=vision_token_width(backbone.visual),  # the built tower's token width (ResNet, timm: not vision_cfg's)
            text_width=self.text_width,
            options=dict(config.head_options),
        )
        if self.head.frozen_backbone:  # e.g. CLIP4Cir's second stage: the head learns on fixed features
            self.backbone.requires_grad_(False)
        self.region_grid = 0  # image regions beside a vector head's features (use_image_regions); 0: none
        # Textual inversion (Pic2Word): the placeholder word's token id in the prompts (None: a head that composes features)
        self.placeholder_id: int | None = None
        if self.head.textual_inversion:
            check_text_tower(self.backbone.text)
            self.placeholder_id = placeholder_id(self.tokenizer)

    def train(self, mode: bool = True) -> CIRModel:
        """nn.Module.train, except that a frozen backbone stays in eval mode (fixed features: no
        dropout, no batch-norm statistics updates)."""
        super().train(mode)
        if self.head.frozen_backbone:
            self.backbone.eval()
        return self

    def use_image_regions(self, grid: int) -> int:
        """Give a head without local tokens image regions (NEUCORE attends over them); returns the grid used.

        With ``grid`` > 0 and vector image features (B, D) (the combiner), ``image_features`` becomes
        (B, 1 + grid * grid, D): the head's vector, then the backbone's tokens pooled to a grid x grid
        grid and mapped into its space (:func:`compir.train.towers.region_tokens`), L2-normalised.
        ``compose`` and the gallery vector read row 0 only, so retrieval is unchanged and an index
        caches the regions with the features. A head with local tokens (TG-CIR) keeps its own: 0.
        Not a training setting: NEUCORE's sidecar records the grid and the export sets it.
        """
        self.region_grid = 0
        if grid <= 0:
            return 0
        size = self.config.image_size
        with torch.no_grad():
            _, features, _ = self.encode_image(torch.zeros(1, 3, size, size, device=self.backbone.logit_scale.device))
        self.region_grid = int(grid) if features.dim() == 2 else 0
        return self.region_grid

    def describe_backbone(self) -> str:
        """One line for ``compir train``'s header: the vision tower family, its tokens and activation."""
        visual = self.backbone.visual
        tokens = {"vit": "patch tokens", "resnet": "the attention pool's input grid", "timm": "the trunk's final features"}
        family = vision_family(visual)
        activation = "QuickGELU" if self.config.clip_cfg.get("quick_gelu") else "GELU"
        note = f" ({self.activation_note})" if self.activation_note else ""
        note += "; FastViT: oneDNN off on the CPU (its kernels abort now and then there)" if onednn_unsafe(visual) else ""
        return f"vision tower {family} (tokens: {tokens[family]}, width {vision_token_width(visual)}), activation {activation}{note}"

    @property
    def preprocess(self) -> PreprocessSpec:
        return self.config.preprocess_spec()

    @property
    def context_length(self) -> int:
        return self.config.context_length

    @property
    def embed_dim(self) -> int:
        return self.head.output_dim

    @property
    def text_length_cuttable(self) -> bool:
        """Whether ``encode_text`` on ``input_ids`` cut after the batch's last non-padding position
        gives the same outputs (``token_features`` up to that position): open_clip's TextTransformer
        with its causal mask (no position sees a later one), pooling the end-of-text token (``argmax``,
        ``eos``) and no appended class token. Towers pooling the last or first position over
        bidirectional attention (SigLIP's) and Hugging Face towers keep their fixed length."""
        from open_clip.transformer import TextTransformer

        text = self.backbone.text
        return (
            isinstance(text, TextTransformer)
            and text.attn_mask is not None
            and text.cls_emb is None
            and text.pool_type in ("argmax", "eos")
        )

    def logit_scale(self) -> torch.Tensor:
        """The learned (exponentiated, clamped) softmax temperature of the losses."""
        return self.backbone.logit_scale.exp().clamp(max=_MAX_LOGIT_SCALE)

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> image_embeds (B, D), image_features (head-defined), patch_features (B, P, Wi)."""
        if self.head.wants_raw_image_tokens and vision_family(self.backbone.visual) == "vit":
            # TG-CIR as its authors: the ViT's tokens before the final LayerNorm, class token first
            pooled, raw, patches = _visual_with_raw_tokens(self.backbone.visual, pixel_values)
            features = self.head.image_features(pooled, raw)
        else:  # every other tower: its own token grid (compir.train.towers)
            with tower_kernels(self.backbone.visual, pixel_values.device):
                pooled, patches = encode_vision(self.backbone.visual, pixel_values)  # (B, E), (B, P, Wi)
            features = self.head.image_features(pooled, patches)
        embeds = self.head.gallery_embeds(features)
        if self.region_grid:
            regions = torch.nn.functional.normalize(region_tokens(self.backbone.visual, patches, self.region_grid), dim=-1)
            features = torch.cat([features.unsqueeze(1), regions.to(features.dtype)], dim=1)  # (B, 1 + R, D)
        return embeds, features, patches

    def encode_text(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L) int64 -> text_embeds (B, D), text_features (head-defined), token_features (B, L, Wt)."""
        pooled, tokens = self.backbone.text(input_ids)  # (B, E), (B, L, Wt); (B, L - 1, Wt) for a HF CLS pooler
        padding = input_ids[:, input_ids.shape[1] - tokens.shape[1] :] == self.pad_id  # (B, L) aligned with tokens
        features = self.head.text_features(pooled, tokens, padding)
        return self.head.text_embeds(features), features, tokens

    def compose(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Head-defined features of a reference image and a modification text -> (B, D) query."""
        if self.region_grid:  # the head's own vector is row 0; the rest are image regions
            image_features = image_features[:, 0]
        return self.head.compose(image_features, text_features)

    def map_image(self, image_features: torch.Tensor) -> torch.Tensor:
        """Textual inversion: (B, E) image features -> (B, Wt) pseudo-word tokens (the ``token_mapper`` graph)."""
        return self.head.map_image(image_features)  # type: ignore[operator]

    def encode_prompt(self, input_ids: torch.Tensor, pseudo_tokens: torch.Tensor) -> torch.Tensor:
        """Textual inversion: (B, L) prompt ids with the placeholder once, (B, Wt) tokens -> (B, D) query
        (the ``prompt_encoder`` graph): the text tower reads each token in its placeholder's place."""
        assert self.placeholder_id is not None, "encode_prompt needs a textual-inversion head (pic2word)"
        pooled = encode_prompt(self.backbone.text, input_ids, pseudo_tokens, self.placeholder_id)
        return self.head.text_embeds(pooled)

    def inversion_losses(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pic2Word's training loss on a batch of images (nothing else): their embeddings vs ``a photo of *``
        read with each image's own pseudo token. The towers are frozen (the head's ``frozen_backbone``)."""
        _, image_features, _ = self.encode_image(pixel_values)
        ids = train_prompt_ids(self.tokenizer, image_features.shape[0], image_features.device)
        prompt = encode_prompt(self.backbone.text, ids, self.map_image(image_features), self.placeholder_id or 0)
        return {"inversion": self.head.inversion_loss(image_features, prompt, self.logit_scale())}  # type: ignore[operator]

    def encode_query(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Fused query path (the ``query_encoder`` graph): reference pixels + text -> (B, D)."""
        _, image_features, _ = self.encode_image(pixel_values)
        _, text_features, _ = self.encode_text(input_ids)
        return self.compose(image_features, text_features)

    def clip_losses(self, pixel_values: torch.Tensor, caption_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """CLIP's own objective on B image-caption pairs (no triplet): the symmetric InfoNCE between the images'
        gallery vectors and their captions' text vectors, at the learned temperature (``--objective clip``)."""
        gallery, _, _ = self.encode_image(pixel_values)
        text, _, _ = self.encode_text(caption_ids)
        return {"clip": symmetric_contrastive_loss(gallery, text, self.logit_scale())}

    def forward(
        self,
        reference_pixels: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        target_pixels: torch.Tensor | None = None,
        caption_ids: torch.Tensor | None = None,
        reference_index: torch.Tensor | None = None,
        *,
        objective: str = "cir",
    ) -> dict[str, torch.Tensor]:
        """Training losses of a batch (named, unweighted; see ``config.loss_weights``); the loop calls this
        through DDP. ``objective`` "clip": ``reference_pixels`` are images and ``caption_ids`` their captions
        (:meth:`clip_losses`); "inversion": images alone (:meth:`inversion_losses`); "cir": B triplets, below.

        reference_pixels (R, 3, S, S), input_ids (B, L), target_pixels (B, 3, S, S); triplet i's
        reference is row ``reference_index[i]`` (default: row i, R = B), so sibling queries of
        one reference encode it once. Terms: the head's, plus ``caption`` (CLIP's contrastive
        loss between the targets' gallery vectors and their descriptions, so text-only search
        works) where captions are given and weighted.
        """
        if objective == "clip" and caption_ids is not None:
            return self.clip_losses(reference_pixels, caption_ids)
        if objective == "inversion":
            return self.inversion_losses(reference_pixels)
        assert objective == "cir" and input_ids is not None and target_pixels is not None, f"objective {objective!r}: missing inputs"
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
    if "multimodal_cfg" in arch:
        raise InputError(
            f"{config.name}: CoCa models (towers plus a captioning decoder) are not supported; "
            "use a CLIP model of the same size (e.g. ViT-B-32, ViT-L-14)"
        )
    vision_cfg = {**arch["vision_cfg"], "output_tokens": True}
    text_cfg = {**arch["text_cfg"], "output_tokens": True}
    quick_gelu = bool(arch.get("quick_gelu", False))
    if "hf_model_name" in text_cfg:  # a HF text tower is built from its config alone: no HF weights download
        text_cfg["hf_model_pretrained"] = False
    name = config.clip_name or _register_architecture(arch)
    tower = str(text_cfg.get("hf_model_name", ""))
    with _quiet_open_clip(pretrained is None), weights_file(pretrained) as weights, hub_access(tower) as online:
        try:
            model = open_clip.create_model(
                name,
                pretrained=weights,
                force_custom_text=True,  # text tower as a module that can return its token states
                force_quick_gelu=quick_gelu,
                force_preprocess_cfg=dict(config.preprocess) or None,
                vision_cfg=vision_cfg,
                text_cfg=text_cfg,
                quick_gelu=quick_gelu,  # also off where the open_clip name says -quickgelu but the weights do not
            )
        except RuntimeError as exc:
            raise InputError(f"cannot build open_clip model {config.name!r} (pretrained={pretrained!r}): {exc}") from exc
        except OSError as exc:  # transformers cannot find a HF text tower's config (offline, or no such folder), or no weights
            why = load_failure("its Hugging Face text tower", tower, setting="hf_model_name", loader="AutoConfig", online=online,
                               error=exc) if tower else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            raise InputError(f"cannot build open_clip model {config.name!r} (pretrained={pretrained!r}): {why}") from exc
    final = open_clip.get_model_preprocess_cfg(model)
    preprocess = {key: final[key] for key in ("mean", "std", "interpolation", "resize_mode") if key in final}
    if "target_ratio" in config.preprocess:  # compir's own key ("targetpad"), which open_clip does not keep
        preprocess["target_ratio"] = float(config.preprocess["target_ratio"])
    return model, {k: [float(x) for x in v] if isinstance(v, (tuple, list)) else v for k, v in preprocess.items()}


def _text_width(text_tower: Any) -> int:
    """Width of the text tower's token states: a HF tower's config width (open_clip's HF configs
    have no text_cfg.width), else open_clip's TextTransformer width."""
    hf_config = getattr(text_tower, "config", None)
    if hf_config is not None:
        from open_clip.hf_configs import arch_dict

        return int(getattr(hf_config, arch_dict[hf_config.model_type]["config_names"]["width"]))
    return int(text_tower.width)


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
