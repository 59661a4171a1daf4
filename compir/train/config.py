"""Model configurations: architecture as data, like open_clip's ``model_configs``.

A compir model config is a JSON file (the built-in ones live in ``compir/model_configs/``)::

    {"description": "...",
     "open_clip": {"embed_dim": 128, "vision_cfg": {...}, "text_cfg": {...}}   # or "ViT-B-32"
     "head": {"name": "combiner", ...head options...},
     "loss_weights": {"composed": 1.0, "caption": 0.5},
     "preprocess": {"mean": [...], "std": [...]},                            # optional overrides
                 # (also "resize_mode": shortest | squash | longest | targetpad, "target_ratio")
     "train": {"lr": 1e-4, "backbone_lr_scale": 0.1, "weight_decay": 0.01, "batch_size": 64}}  # optional

``train`` holds the recipe's optimizer settings: ``compir train`` uses them where its flag is not
given (a paper's recipe, e.g. ``tgcir-fashioniq``); the keys are :data:`TRAIN_SETTINGS`.

``open_clip`` is either an inline open_clip architecture or the name of one open_clip knows
(then ``--pretrained TAG`` can download its weights). :func:`resolve_model_config` accepts a
built-in config name, a path to such a JSON file, or any open_clip model name (which gets the
default combiner head). The resolved config is stored whole in every checkpoint.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from compir.errors import InputError
from compir.manifest import CLIP4CIR_TARGET_RATIO, PreprocessSpec, rgb_values

# The tiny backbone with the TG-CIR composer: at the same step budget it beats the combiner
# (`tiny`) by ~9 R@1 on the synthetic benchmark (README, methods ablation).
DEFAULT_MODEL = "tiny-tgcir"
# The loss term CIRModel adds to its head's (text-only search: captions vs gallery vectors).
CAPTION_LOSS = "caption"
# The training options a model config's "train" entry may set (compir train's flags of the same name).
TRAIN_SETTINGS = ("lr", "backbone_lr_scale", "weight_decay", "batch_size", "warmup_steps", "grad_clip")
# open_clip's defaults (OPENAI_DATASET_MEAN / STD); pretrained tags may override them.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that rebuilds a CIRModel's architecture (weights come separately)."""

    name: str
    clip_cfg: dict[str, Any]  # open_clip architecture: embed_dim, vision_cfg, text_cfg[, quick_gelu]
    clip_name: str = ""  # open_clip model name the architecture came from ("" = inline)
    head: str = "combiner"
    head_options: dict[str, Any] = field(default_factory=dict)
    # Weight of each named loss term: the head's terms plus CAPTION_LOSS (checked by loss_terms()).
    loss_weights: dict[str, float] = field(default_factory=lambda: {"composed": 1.0})
    preprocess: dict[str, Any] = field(default_factory=dict)  # overrides of open_clip's defaults
    description: str = ""
    train: dict[str, float] = field(default_factory=dict)  # the recipe's optimizer settings (TRAIN_SETTINGS)

    @property
    def embed_dim(self) -> int:
        return int(self.clip_cfg["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self.clip_cfg["vision_cfg"].get("image_size", 224)
        return int(size if isinstance(size, int) else size[0])

    @property
    def context_length(self) -> int:
        return int(self.clip_cfg["text_cfg"].get("context_length", 77))

    def preprocess_spec(self) -> PreprocessSpec:
        """The eval-time image preprocessing this model expects."""
        pre = self.preprocess
        mode = str(pre.get("resize_mode", "shortest"))
        ratio = pre.get("target_ratio", CLIP4CIR_TARGET_RATIO if mode == "targetpad" else None)
        return PreprocessSpec(
            image_size=self.image_size,
            resize_mode=mode,
            interpolation=str(pre.get("interpolation", "bicubic")),
            mean=rgb_values(pre.get("mean", _CLIP_MEAN), field_name="mean"),
            std=rgb_values(pre.get("std", _CLIP_STD), field_name="std"),
            target_ratio=None if ratio is None else float(ratio),
        )

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "model config") -> ModelConfig:
        """Inverse of :meth:`to_dict` (as stored in checkpoints)."""
        try:
            config = cls(
                name=str(raw["name"]),
                clip_cfg=copy.deepcopy(dict(raw["clip_cfg"])),
                clip_name=str(raw.get("clip_name", "")),
                head=str(raw.get("head", "combiner")),
                head_options=dict(raw.get("head_options", {})),
                loss_weights={str(k): float(v) for k, v in raw.get("loss_weights", {"composed": 1.0}).items()},
                preprocess=dict(raw.get("preprocess", {})),
                description=str(raw.get("description", "")),
                train={str(k): float(v) for k, v in raw.get("train", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{source}: malformed model config ({type(exc).__name__}: {exc})") from exc
        _validate(config, source)
        return config


def list_model_configs() -> list[str]:
    """Names of the built-in compir model configs (``compir/model_configs/*.json``)."""
    folder = resources.files("compir") / "model_configs"
    return sorted(entry.name[: -len(".json")] for entry in folder.iterdir() if entry.name.endswith(".json"))


def resolve_model_config(spec: str | Path = DEFAULT_MODEL) -> ModelConfig:
    """A config from a built-in name (``tiny``), a JSON file path, or an open_clip model name.

    Raises InputError listing the choices when ``spec`` is none of these.
    """
    text = str(spec)
    path = Path(text)
    if text.endswith(".json") or path.is_file():
        if not path.is_file():
            raise InputError(f"model config file {path} does not exist")
        return _from_file_record(_read_json(path), name=path.stem, source=str(path))
    if text in list_model_configs():
        builtin = resources.files("compir") / "model_configs" / f"{text}.json"
        return _from_file_record(json.loads(builtin.read_text(encoding="utf-8")), name=text, source=f"built-in {text}")
    clip_cfg = _open_clip_architecture(text)
    if clip_cfg is None:
        raise InputError(
            f"unknown model {text!r}: use a compir config ({', '.join(list_model_configs())}), "
            f"a config JSON file, or an open_clip model name (open_clip.list_models())"
        )
    return ModelConfig(
        name=text,
        clip_cfg=clip_cfg,
        clip_name=text,
        head_options=_default_head_options(int(clip_cfg["embed_dim"])),
        loss_weights={"composed": 1.0},
    )


def _from_file_record(record: Any, *, name: str, source: str) -> ModelConfig:
    if not isinstance(record, dict) or "open_clip" not in record:
        raise InputError(f"{source}: a model config needs an 'open_clip' entry (architecture or open_clip name)")
    arch = record["open_clip"]
    clip_name = ""
    if isinstance(arch, str):
        clip_name = arch
        arch = _open_clip_architecture(arch)
        if arch is None:
            raise InputError(f"{source}: open_clip does not know the model {record['open_clip']!r}")
    head = dict(record.get("head", {"name": "combiner"}))
    head_name = str(head.pop("name", "combiner"))
    return ModelConfig.from_dict(
        {
            "name": str(record.get("name", name)),
            "clip_cfg": arch,
            "clip_name": clip_name,
            "head": head_name,
            "head_options": head,
            "loss_weights": record.get("loss_weights", {"composed": 1.0}),
            "preprocess": record.get("preprocess", {}),
            "description": record.get("description", ""),
            "train": record.get("train", {}),
        },
        source=source,
    )


def _open_clip_architecture(name: str) -> dict[str, Any] | None:
    import open_clip

    found = open_clip.get_model_config(name)
    return dict(found) if found else None


def _default_head_options(embed_dim: int) -> dict[str, Any]:
    # CLIP4Cir's proportions: projection 4x and hidden layer 8x the embedding width.
    return {"projection_dim": 4 * embed_dim, "hidden_dim": 8 * embed_dim, "dropout": 0.5}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"model config {path} is not valid JSON ({exc})") from exc


def _validate(config: ModelConfig, source: str) -> None:
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in config.clip_cfg:
            raise InputError(f"{source}: open_clip architecture lacks {key!r}")
    if config.embed_dim <= 0:
        raise InputError(f"{source}: embed_dim must be positive")
    if not config.loss_weights or all(w <= 0 for w in config.loss_weights.values()):
        raise InputError(f"{source}: loss_weights must give at least one term a positive weight")
    terms = loss_terms(config.head)
    unknown = sorted(set(config.loss_weights) - set(terms))
    if unknown:
        raise InputError(f"{source}: loss_weights names unknown term(s) {unknown}; head {config.head!r} trains {list(terms)}")
    unknown_settings = sorted(set(config.train) - set(TRAIN_SETTINGS))
    if unknown_settings:
        raise InputError(f"{source}: 'train' names unknown setting(s) {unknown_settings}; known: {list(TRAIN_SETTINGS)}")
    try:
        problem = config.preprocess_spec().problem()
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from exc
    except (TypeError, ValueError) as exc:  # e.g. a target_ratio that is not a number
        raise InputError(f"{source}: preprocess: {exc}") from exc
    if problem is not None:
        raise InputError(f"{source}: preprocess: {problem}")


def loss_terms(head: str) -> tuple[str, ...]:
    """The loss terms a model with composition head ``head`` trains: the head's plus :data:`CAPTION_LOSS`."""
    from compir.train.heads import head_class  # torch: only once a config is resolved, never for `--help`

    return (*head_class(head).loss_terms, CAPTION_LOSS)


def configure_model(
    config: ModelConfig,
    *,
    head: str | None = None,
    head_options: Sequence[str] = (),
    resize_mode: str | None = None,
) -> ModelConfig:
    """``config`` with another composition head and/or head options and/or image resize mode
    (``compir train --head tgcir --head-option local_tokens=8 --resize-mode targetpad``).

    A new ``head`` starts from its defaults for this backbone (the combiner's CLIP4Cir proportions
    on an open_clip model) and the head's default loss weights (plus the config's caption weight);
    ``head_options`` are ``KEY=VALUE`` strings (values read as JSON where they parse: 8, 0.5, true),
    checked against the head's constructor. Raises InputError naming an unknown head or option.
    """
    from compir.train.heads import head_class  # torch: only once a config is resolved, never for `--help`

    changes: dict[str, Any] = {}
    if head is not None and head != config.head:
        cls = head_class(head)
        defaults = _default_head_options(config.embed_dim) if head == "combiner" and config.clip_name else {}
        weights = dict(cls.default_loss_weights)
        if CAPTION_LOSS in config.loss_weights:
            weights[CAPTION_LOSS] = config.loss_weights[CAPTION_LOSS]
        changes.update(head=head, head_options=defaults, loss_weights=weights)
    name = str(changes.get("head", config.head))
    overrides = parse_head_options(head_options, head=name)
    if overrides:
        changes["head_options"] = {**changes.get("head_options", config.head_options), **overrides}
    if resize_mode is not None and resize_mode != config.preprocess.get("resize_mode"):
        preprocess = {k: v for k, v in config.preprocess.items() if k != "target_ratio"}
        changes["preprocess"] = {**preprocess, "resize_mode": resize_mode}
    if not changes:
        return config
    return ModelConfig.from_dict({**config.to_dict(), **changes}, source=f"model {config.name!r} with the given head/preprocess flags")


def parse_head_options(pairs: Sequence[str], *, head: str) -> dict[str, Any]:
    """``["local_tokens=8", "form=clip4cir"]`` -> ``{"local_tokens": 8, "form": "clip4cir"}``, each key
    checked against the options ``head``'s constructor takes."""
    from compir.train.heads import head_class

    accepted = head_options_of(head_class(head))
    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"--head-option {pair!r}: expected KEY=VALUE (e.g. dropout=0.5)")
        if key not in accepted:
            raise InputError(f"--head-option {key!r}: the {head} head has no such option; it takes {', '.join(accepted)}")
        try:
            parsed[key] = json.loads(text)
        except json.JSONDecodeError:
            parsed[key] = text  # a plain word: form=clip4cir
    return parsed


def head_options_of(cls: type[Any]) -> list[str]:
    """The options (keyword parameters beyond the backbone's widths) a head class's constructor takes."""
    skip = {"self", "embed_dim", "image_width", "text_width"}
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name not in skip and p.kind is inspect.Parameter.KEYWORD_ONLY]
