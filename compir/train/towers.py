"""open_clip's vision towers, each as ``pixels -> (pooled (B, E), tokens (B, P, W))``.

Heads that attend over image tokens (TG-CIR's token learner) need a token grid from every tower
family open_clip ships; only its ViT returns one itself (``output_tokens``). Here:

- ``vit``: open_clip's VisionTransformer; its own patch tokens (after ``ln_post``).
- ``resnet``: ModifiedResNet (OpenAI's RN50, RN101, RN50x4, ...) has no patch tokens: the tokens are
  the attention pool's input grid, the last stage's (B, C, H, W) feature map as (B, H*W, C).
- ``timm``: a timm trunk (ConvNeXt, EVA, SigLIP's ViT, FastViT, ...): the trunk's final features,
  a feature map flattened like the ResNet's or a token sequence without its prefix (class /
  register) tokens.

The pooled output is exactly what the tower's own ``forward`` returns (a test checks it), so
pretrained weights keep their meaning. Functions, not wrapper modules: state-dict keys stay open_clip's.

FastViT towers (MobileCLIP-S1/-S2, MobileCLIP2-S0/-S2/...) run without oneDNN on the CPU
(:func:`tower_kernels`): shrunk ones aborted in 3 to 6 of 6 CPU training runs per name inside
torch's oneDNN kernels (``munmap_chunk(): invalid pointer``), 18 of 18 passed with it off.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from compir.errors import InputError

VISION_FAMILIES = ("vit", "resnet", "timm")


def vision_family(visual: Any) -> str:
    """Which of :data:`VISION_FAMILIES` the open_clip vision tower ``visual`` is."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        return "vit"
    if isinstance(visual, ModifiedResNet):
        return "resnet"
    if isinstance(visual, TimmModel):
        return "timm"
    raise InputError(f"open_clip vision tower {type(visual).__name__} is not supported (supported: {', '.join(VISION_FAMILIES)})")


def vision_token_width(visual: Any) -> int:
    """W, the width of the tokens :func:`encode_vision` returns for ``visual``."""
    family = vision_family(visual)
    if family == "vit":
        # The pooled-side width: the transformer's, or the attentional pooler's output (CoCa-style towers).
        return int(visual.proj.shape[0]) if visual.proj is not None else int(visual.transformer.width)
    if family == "resnet":
        return int(visual.attnpool.k_proj.in_features)  # ResNet feature channels (width * 32)
    return int(visual.trunk.num_features)


def encode_vision(visual: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, S, S) -> pooled (B, E) (the tower's own output) and tokens (B, P, W)."""
    family = vision_family(visual)
    if family == "vit":
        pooled, tokens = visual(pixels)  # built with output_tokens=True
        return pooled, tokens
    if family == "resnet":
        grid = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(pixels)))))  # (B, C, H, W)
        return visual.attnpool(grid), grid.flatten(2).transpose(1, 2)
    trunk = visual.trunk
    features = trunk.forward_features(pixels)
    pooled = visual.head(trunk.forward_head(features))  # = TimmModel.forward
    return pooled, _timm_tokens(trunk, features)


def onednn_unsafe(visual: Any) -> bool:
    """Whether ``visual`` is a FastViT-family timm tower, whose oneDNN CPU kernels abort now and then."""
    return vision_family(visual) == "timm" and type(visual.trunk).__module__.rsplit(".", 1)[-1] == "fastvit"


def tower_kernels(visual: Any, device: torch.device | str) -> contextlib.AbstractContextManager[None]:
    """Around a tower's forward, and its backward (kernels are picked when each op runs): oneDNN off on
    the CPU for :func:`onednn_unsafe` towers (torch's own convolution kernels), else nothing changes."""
    if torch.device(device).type == "cpu" and onednn_unsafe(visual):
        return _onednn_off()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _onednn_off() -> Iterator[None]:
    # torch.backends.mkldnn.enabled is a ContextProp: reading gives the global flag, assigning sets it (only it).
    saved = bool(torch.backends.mkldnn.enabled)
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = saved  # type: ignore[assignment]


def _timm_tokens(trunk: Any, features: torch.Tensor) -> torch.Tensor:
    if features.ndim == 4:
        if getattr(trunk, "output_fmt", "NCHW") == "NHWC":  # Swin and friends keep channels last
            return features.flatten(1, 2)
        return features.flatten(2).transpose(1, 2)
    if features.ndim == 3:
        return features[:, int(getattr(trunk, "num_prefix_tokens", 0)) :]
    raise InputError(f"timm tower {type(trunk).__name__} returns {features.ndim}-d features; compir needs a feature map or tokens")


def region_tokens(visual: Any, tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Image regions for heads without local tokens: the tokens of :func:`encode_vision` (B, P, W)
    average-pooled to a ``grid`` x ``grid`` grid and mapped into the pooled output's space, as the
    tower maps its pooled token: (B, grid * grid, E).

    - ``vit``: the pooled patch tokens (after ``ln_post``) times the tower's projection;
    - ``resnet``: the attention pool's value and output projections per region (the attention of a
      single token is its value);
    - ``timm``: the tower's extra head (a linear or MLP projection; none with attention pooling).
    """
    family = vision_family(visual)
    if family == "vit" and getattr(visual, "attn_pool", None) is not None:
        raise InputError("image regions: a ViT tower with an attentional pooler has no patch-token projection; use 0 regions")
    if family == "timm" and ("pool" in visual.head._modules or visual.trunk.get_classifier().__class__.__name__ != "Identity"):
        raise InputError("image regions: this timm tower pools or projects inside its own head; use 0 regions")
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise InputError(f"image regions: the tower's {tokens.shape[1]} tokens are not a square grid; use 0 regions")
    maps = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
    pooled = torch.nn.functional.adaptive_avg_pool2d(maps, grid).flatten(2).transpose(1, 2)  # (B, grid * grid, W)
    if family == "vit":
        return pooled @ visual.proj if visual.proj is not None else pooled
    if family == "resnet":
        return visual.attnpool.c_proj(visual.attnpool.v_proj(pooled))
    return visual.head(pooled)
