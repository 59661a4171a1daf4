"""What a run trains on and validates with, from its objective and its head (``compir train``).

=====================  ==========================================  ================================================
objective / head       training batches                            validation each epoch
=====================  ==========================================  ================================================
``cir`` (supervised)   triplets (fresh synthetic, or a dataset's)   composed recall on --val-split, with baselines
``clip``               image-caption pairs: open_clip's CSV, or     text -> image R@1/5/10 on held-out pairs
                       fresh synthetic scenes + descriptions
textual inversion      images only: a photo folder (recursive),     composed zero-shot recall where the data has
(``--head pic2word``)  a dataset's train images, fresh scenes       triplets, else Pic2Word's loss on held-out images
=====================  ==========================================  ================================================

Held out where the data names no validation set (a CSV without ``--val-csv``, a photo folder): every
:data:`HELD_OUT_EVERY`-th item in file order, at most :data:`HELD_OUT_MAX`; the rest trains. Every input is
read and checked here, before the run writes anything.
"""

from __future__ import annotations

from pathlib import Path

from compir.data.load import detect_format, load_split
from compir.data.synthetic import is_synthetic, synth_config_of
from compir.data.unlabeled import CaptionedImages, dataset_train_images, find_caption_csv, list_photos, read_caption_csv
from compir.errors import DatasetError, InputError
from compir.train.config import ModelConfig
from compir.train.distributed import DistContext
from compir.train.model import CIRModel
from compir.train.options import OBJECTIVES, TrainOptions
from compir.train.sources import SplitSource, SyntheticSource, synthetic_steps_per_epoch
from compir.train.unlabeled_sources import FileSource, SceneSource
from compir.train.validation import InversionLoss, PairRecall, TripletValidation, Validation

HELD_OUT_EVERY = 20
HELD_OUT_MAX = 1000
_MIN_HELD_OUT = 2  # a contrastive validation needs two items


RunSource = FileSource | SceneSource | SyntheticSource | SplitSource


def check_objective(options: TrainOptions) -> None:
    """Flags that cannot go together with ``--objective`` (before anything is built)."""
    if options.objective not in OBJECTIVES:
        raise InputError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {options.objective!r}")
    if options.objective == "clip" and options.head == "pic2word":
        raise InputError("--objective clip trains the towers, which the pic2word head freezes: train the CLIP first "
                         "(--objective clip), then the mapping net (--init RUN/best.pt --head pic2word)")
    if options.val_csv is not None and options.objective != "clip":
        raise InputError("--val-csv is for --objective clip (image-caption pairs)")


def objective_head(config: ModelConfig, options: TrainOptions) -> str | None:
    """The head a new run's model gets: ``--head``, except that ``--objective clip`` needs a head whose vectors are the
    CLIP's own embeddings (a combiner's; TG-CIR projects them), and uses the combiner where the config's is not."""
    from compir.train.heads import head_class

    if options.objective != "clip" or head_class(options.head or config.head).clip_space:
        return options.head
    if options.head is not None:
        raise InputError(f"--objective clip trains the CLIP's own embeddings; the {options.head} head's gallery vectors are "
                         "its own projections: use --head combiner (or leave --head out)")
    print(f"objective clip: head combiner instead of {config.head} (its gallery and text vectors are the CLIP's own "
          "embeddings, which the objective trains; the head itself stays untrained)")
    return "combiner"


def build_data(options: TrainOptions, model: CIRModel, ctx: DistContext) -> tuple[RunSource, Validation | None]:
    """The run's training batches and (on the main process) its validation; see the module's table."""
    o, data, main = options, Path(options.data), ctx.is_main
    files = dict(preprocess=model.preprocess, tokenizer=model.tokenizer, batch_size=o.batch_size, seed=o.seed, rank=ctx.rank,
                 world_size=ctx.world_size, workers=o.workers, steps_per_epoch=o.steps_per_epoch)
    if is_synthetic(data):
        synth = synth_config_of(data)
        steps = o.steps_per_epoch or synthetic_steps_per_epoch(synth, batch_size=o.batch_size, world_size=ctx.world_size)
        if o.objective == "clip" or model.head.textual_inversion:
            pairs = o.objective == "clip"
            source: RunSource = SceneSource(synth, preprocess=model.preprocess, tokenizer=model.tokenizer if pairs else None,
                                            batch_size=o.batch_size, steps_per_epoch=steps, seed=o.seed, rank=ctx.rank)
            return source, (_synthetic_pairs(o) if pairs else _triplets(o)) if main else None
        return SyntheticSource(synth, preprocess=model.preprocess, tokenizer=model.tokenizer, batch_size=o.batch_size,
                               steps_per_epoch=steps, seed=o.seed, rank=ctx.rank, siblings=o.siblings), _triplets(o) if main else None
    if o.objective == "clip":
        train, held = csv_pairs(o)
        source = FileSource(train.paths, where=[train.where(i) for i in range(len(train))], captions=train.captions, **files)  # type: ignore[arg-type]
        return source, PairRecall(held.paths, held.captions)
    if model.head.textual_inversion:
        photos, held_photos = train_photos(o)
        source = FileSource(photos, where=[str(p) for p in photos], captions=None, **files)  # type: ignore[arg-type]
        return source, (InversionLoss(tuple(held_photos), batch_size=o.batch_size) if held_photos else _triplets(o)) if main else None
    return SplitSource(load_split(data, split="train", fmt=o.data_format), **files), _triplets(o) if main else None  # type: ignore[arg-type]


def _triplets(options: TrainOptions) -> TripletValidation:
    return TripletValidation.first(load_split(options.data, split=options.val_split, fmt=options.data_format), options.val_queries)


def _synthetic_pairs(options: TrainOptions) -> PairRecall:
    """The val split's images and their descriptions (the first --val-queries of them, where given)."""
    split = load_split(options.data, split=options.val_split, fmt="synthetic")
    names = [name for name in split.gallery if split.captions.get(name)][: options.val_queries or None]
    return PairRecall(tuple(split.image_path(n) for n in names), tuple(split.captions[n][0] for n in names))


def csv_pairs(options: TrainOptions) -> tuple[CaptionedImages, CaptionedImages]:
    """(training pairs, validation pairs) of ``--objective clip`` on a CSV: --val-csv, or every 20th row held out."""
    keys = dict(img_key=options.csv_img_key, caption_key=options.csv_caption_key, separator=_separator(options.csv_separator))
    pairs = read_caption_csv(find_caption_csv(Path(options.data)), **keys)
    if options.val_csv is not None:
        return pairs, read_caption_csv(Path(options.val_csv), **keys)
    train, held = _hold_out(len(pairs), what=f"{pairs.source}: {len(pairs)} rows", hint="or give --val-csv")
    return pairs.subset(train), pairs.subset(held)


def train_photos(options: TrainOptions) -> tuple[list[Path], list[Path]]:
    """(training images, held-out images) of a textual-inversion head on files: a dataset's training images (its
    image list; validation then uses its --val-split), or a photo folder with every 20th image held out."""
    data = Path(options.data)
    if not _photo_folder(options):
        listed = dataset_train_images(data)
        if listed is None:  # FashionIQ, Shoes: their train split's images (read from its annotation files)
            listed = sorted(set(load_split(data, split="train", fmt=options.data_format).image_paths.values()))
        return listed, []
    photos = list_photos(data)
    train, held = _hold_out(len(photos), what=f"{data}: {len(photos)} images", hint="add images")
    return [photos[i] for i in train], [photos[i] for i in held]


def _photo_folder(options: TrainOptions) -> bool:
    """DATA is a plain folder of images (no dataset layout compir reads)."""
    if options.data_format != "auto":
        return False
    try:
        detect_format(Path(options.data))
    except DatasetError:
        return True
    return False


def _hold_out(count: int, *, what: str, hint: str) -> tuple[list[int], list[int]]:
    held = [i for i in range(HELD_OUT_EVERY - 1, count, HELD_OUT_EVERY)][:HELD_OUT_MAX]
    if len(held) < _MIN_HELD_OUT:
        raise DatasetError(f"{what}: too few to hold out {_MIN_HELD_OUT} for validation (every {HELD_OUT_EVERY}th is held "
                           f"out; {HELD_OUT_EVERY * _MIN_HELD_OUT} needed); {hint}")
    kept = set(held)
    return [i for i in range(count) if i not in kept], held


def _separator(value: str) -> str:
    """--csv-separator as typed: ``\\t`` (backslash, t) means a tab, as open_clip's default."""
    separator = {"\\t": "\t", "tab": "\t"}.get(value, value)
    if len(separator) != 1:
        raise InputError(f"--csv-separator must be one character (or \\t), got {value!r}")
    return separator
