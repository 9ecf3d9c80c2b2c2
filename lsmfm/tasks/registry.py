"""The one registry of finetuning tasks, by name (`lsmfm finetune NAME`, `task.name` in model folders).

Each task is one module with one `FinetuneTask` subclass that owns everything about it: its config
section and the `lsmfm finetune NAME` config class holding it, its head (config and module), how the
model's forward uses the head, loss, metrics, scoring, predictions, what `lsmfm predict` writes and
the model card's lines. Adding one is that module plus one line in `TASKS` (or a `register_task`
call). Entries are `module:Class` names, imported when first used (as `lsmfm.baselines2d.registry`
does for PEFT methods), so listing the tasks imports none of them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from lsmfm.registry import Registry

if TYPE_CHECKING:
    from lsmfm.tasks.base import FinetuneTask
    from lsmfm.tasks.config import FinetuneConfig

TASKS = Registry("task", {
    "segment": "lsmfm.tasks.segment:SegmentTask",
    "classify": "lsmfm.tasks.classify:ClassifyTask",
    "deblur": "lsmfm.tasks.deblur:DeblurTask",
})


def register_task(name: str, target: str, replace: bool = False) -> None:
    """Add a task: `target` is "module:TaskClass" (an existing name needs `replace=True`)."""
    TASKS.register(name, target, replace)


def task_class(name: str) -> type[FinetuneTask]:
    """The task class registered as `name`; an unknown name is a ConfigError listing the known ones."""
    cls = TASKS.load(name)
    if getattr(cls, "name", None) != name:
        raise TypeError(f"{TASKS[name]} is registered as task {name!r} but its name is "
                        f"{getattr(cls, 'name', None)!r}")
    return cls


def finetune_config_class(name: str) -> type[FinetuneConfig]:
    """The config class of `lsmfm finetune NAME`: the common keys plus the task's own section."""
    return task_class(name).config_class
