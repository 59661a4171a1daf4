"""``compir quickstart --zero-shot``: composed search without one labeled triplet, in one command.

The steps of :mod:`compir.quickstart` with training replaced by the two triplet-free stages of
zero-shot CIR: a CLIP trained on the synthetic benchmark's images and scene descriptions
(``compir train --objective clip``: the offline stand-in for a pretrained CLIP), then Pic2Word's
mapping net trained on images only with that CLIP frozen (``compir train --init CLIP --head pic2word``).
The test split is then evaluated beside the three training-free baselines a user tries first (image
only, text only, their normalised sum), and the export, index and query steps are the supervised
quickstart's own.
"""

from __future__ import annotations

from compir.quickstart import STEPS, QuickstartState, Step, evaluate_model

# The recipe: fixed step counts by default (``compir quickstart --zero-shot``: the README's 3-seed figures come
# from them; about 6 minutes on 2 idle CPU cores), or ``--minutes`` split between the CLIP and the mapping net.
# ``--steps N`` sets the CLIP's; the mapping net's keep the recipe's proportion.
CLIP_SHARE = 0.8
CLIP_RECIPE_STEPS = 800
MAPPING_RECIPE_STEPS = 300
CLIP_LR = 2e-3
MAPPING_LR = 1e-3
BATCH_SIZE = 64  # both stages (docs/training.md's recipe)


def train_clip(state: QuickstartState) -> None:
    from compir.train.loop import TrainOptions, train

    assert state.data_dir is not None
    steps = state.steps
    result = train(TrainOptions(
        data=state.data_dir, out_dir=state.out_dir / "clip", model=state.model or _default_model(), objective="clip",
        minutes=None if steps else state.minutes * CLIP_SHARE, steps=steps, amp=state.amp, lr=CLIP_LR, batch_size=BATCH_SIZE,
        expected_steps=None if steps else CLIP_RECIPE_STEPS, steps_per_epoch=50, val_queries=500, seed=state.seed,
        progress=state.progress,
    ))
    state.results["clip"] = {"run": str(result.out_dir), "best_checkpoint": str(result.best_checkpoint), "steps": result.steps,
                             "val": result.best_metrics}
    state.checkpoint = result.best_checkpoint


def train_mapping(state: QuickstartState) -> None:
    from compir.train.loop import TrainOptions, train

    assert state.data_dir is not None and state.checkpoint is not None
    steps = mapping_steps(state.steps)
    result = train(TrainOptions(
        data=state.data_dir, out_dir=state.out_dir / "run", init=state.checkpoint, head="pic2word",
        minutes=None if steps else state.minutes * (1 - CLIP_SHARE), steps=steps, amp=state.amp, lr=MAPPING_LR, batch_size=BATCH_SIZE,
        steps_per_epoch=50, val_queries=500, seed=state.seed, progress=state.progress,
    ))
    state.checkpoint = result.best_checkpoint
    state.results["train"] = {"run": str(result.out_dir), "best_checkpoint": str(result.best_checkpoint), "steps": result.steps,
                              "val": result.best_metrics}


def mapping_steps(clip_steps: int | None) -> int | None:
    """With a fixed CLIP step count, the mapping net's (the recipe's proportion, at least 1); None: time budget."""
    return None if clip_steps is None else max(1, round(clip_steps * MAPPING_RECIPE_STEPS / CLIP_RECIPE_STEPS))


def _default_model() -> str:
    from compir.train.config import DEFAULT_MODEL

    return DEFAULT_MODEL


_SHARED = {step.name: step for step in STEPS}  # the supervised quickstart's data, export, index and query steps
ZERO_SHOT_STEPS: list[Step] = [
    _SHARED["data"],
    Step("clip", "train a CLIP on the training images and their scene descriptions (no triplet)", train_clip),
    Step("mapping", "train Pic2Word's mapping net on images only, the CLIP frozen", train_mapping),
    Step("eval", "zero-shot test-split metrics beside image only, text only and their sum", evaluate_model),
    _SHARED["export"],
    _SHARED["index"],
    _SHARED["query"],
]
