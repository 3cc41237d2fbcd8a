"""The constants of ``lwam experiment``, in a leaf module that imports nothing of lwam: the conditions (arms),
the evaluation controls and the MT10 task list. :mod:`lwam.experiment` (which runs them) and
:mod:`lwam.experiment_report` (which describes them) both import from here, so neither imports the other."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

#: The ten Meta-World MT10 tasks (metaworld.MT10's training classes, v3 names).
MT10_TASKS: tuple[str, ...] = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3",
                               "drawer-close-v3", "button-press-topdown-v3", "peg-insert-side-v3",
                               "window-open-v3", "window-close-v3")

#: The four tasks of the decisive video co-training experiment (issue 21): tasks on which the tiny policy
#: does not saturate, with objects that must be located in the image.
DECISIVE_TASKS: tuple[str, ...] = ("peg-insert-side-v3", "lever-pull-v3", "hammer-v3", "coffee-push-v3")


@dataclass(frozen=True)
class Condition:
    """One arm of the experiment: ``overrides(cfg)`` -> config overrides ("section.field": value)."""

    name: str
    label: str
    overrides: Callable[[Any], dict[str, Any]]


CONDITIONS: dict[str, Condition] = {c.name: c for c in (
    Condition("video", "video co-training (video loss weight 1, the paper's loss)",
              lambda cfg: {"train.video_loss_weight": 1.0}),
    Condition("no_video", "no video co-training (video loss weight 0: the video pass is skipped)",
              lambda cfg: {"train.video_loss_weight": 0.0}),
    Condition("full_res_video", "video co-training on full-resolution latents (no 2x2 downsampling)",
              lambda cfg: {"train.video_loss_weight": 1.0, "train.video_downsample": 1}),
    Condition("full_chunk_loss", "action loss on the whole chunk (not only the executed prefix)",
              lambda cfg: {"train.action_loss_steps": cfg.data.chunk_size}),
)}

#: Evaluation controls (``lwam.envs.evaluate.evaluate(image_control=...)``): what they feed the policy instead
#: of the episode's own images, as the report describes them.
CONTROLS: dict[str, str] = {
    "blind": "every image zeroed (a black frame: out of the training distribution)",
    "shuffled": "images of another evaluation episode of the same task, its arm driven by the same actions "
                "(in distribution: the scene's layout is the wrong one)",
}
