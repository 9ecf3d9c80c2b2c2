"""Typed config of `lsmfm compare TASK`: the arms, one data split and one shots x seeds protocol for all.

The keys other than `arms` are those of `lsmfm finetune TASK` (data, shots, seeds, train, keep,
prediction_format, device, the task's own section), so a finetune config becomes a comparison by
replacing `init`/`pretrained` with a list of arms. `compare_config_class(task)` is the class of one
task: `CompareConfig` plus that task's section (`segment:`, ...), taken from its finetune config class.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from lsmfm.baselines2d.config import ModelConfig as Model2DConfig
from lsmfm.baselines2d.config import PeftConfig, check_method
from lsmfm.data.normalize import NormalizeConfig
from lsmfm.errors import ConfigError
from lsmfm.models.backbones.registry import BackboneConfig, default_backbone_config
from lsmfm.tasks.config import DataConfig, TrainConfig, check_protocol

ArmKind = Literal["pretrained", "scratch", "baseline2d"]
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RESERVED = ("tb",)  # RUN_DIR/tb holds the TensorBoard logs
NOT_OPTIONS = ("source", "map_location")  # load_pretrained parameters an arm sets itself


@dataclass
class ArmConfig:
    """One arm of a comparison: a model family trained and scored under the same protocol.

    Args:
        name: the arm's label in results.csv, tables, plots and folder names (letters, digits, `_.-`).
        kind: "pretrained" (a 3D backbone from `source`, finetuned), "scratch" (the same 3D
            architecture from random weights), "baseline2d" (a 2D foundation model adapted with a
            PEFT method, trained on the slices of the same volumes).
        source: pretrained: a `lsmfm.load_pretrained` source (release name, folder, file, Hub id).
        options: pretrained: keyword options of `load_pretrained` (e.g. `{which: student}`; any
            option it accepts, passed through).
        bn_stats: pretrained: "keep" the pretrained BatchNorm statistics or "reestimate" them on windows
            of the training images before any run (as `lsmfm finetune`'s `bn_stats`).
        scale: pretrained: "native" or "pretraining" (the network resizes its inputs as its pretraining
            did; as `lsmfm finetune`'s `scale`; a scratch arm like it gets the same scale).
        like: scratch: the pretrained arm whose architecture, patch size and normalisation it copies
            (default: the first pretrained arm; without one: `backbone` and `data.patch_size`).
        model, peft: baseline2d: the `model:` and `peft:` sections of `lsmfm baseline2d`.
        normalize: baseline2d: percentile normalisation of each volume (default 0.5 / 99.5 %).
        train: this arm's overrides of the `train:` section (e.g. `{lr: 1.0e-4}` for a 2D arm).
    """

    name: str = ""
    kind: ArmKind = "pretrained"
    source: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    bn_stats: Literal["keep", "reestimate"] = "keep"
    scale: Literal["native", "pretraining"] = "native"
    like: str = ""
    model: Model2DConfig | None = None
    peft: PeftConfig | None = None
    normalize: NormalizeConfig | None = None
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not NAME.match(self.name) or self.name in RESERVED:
            raise ValueError(f"arm name {self.name!r} must be letters, digits, '_', '.' or '-' (it names "
                             f"folders), and not {' or '.join(RESERVED)}")
        allowed = {"pretrained": {"source", "options"}, "scratch": {"like"},
                   "baseline2d": {"model", "peft", "normalize"}}[self.kind]
        for key in ("source", "options", "like", "model", "peft", "normalize"):
            if key not in allowed and getattr(self, key):
                raise ValueError(f"arm {self.name!r}: `{key}` does not apply to kind {self.kind}")
        if self.kind != "pretrained" and (self.bn_stats, self.scale) != ("keep", "native"):
            raise ValueError(f"arm {self.name!r}: `bn_stats` and `scale` do not apply to kind {self.kind}")
        if self.kind == "pretrained":
            if not self.source:
                raise ValueError(f"arm {self.name!r}: kind pretrained needs `source` (a load_pretrained "
                                 "source)")
            check_options(self.options, self.name)
        if self.kind == "baseline2d":
            self.model = self.model or Model2DConfig()
            self.peft = self.peft or PeftConfig()
            check_method(self.model, self.peft)

    @property
    def dims(self) -> str:
        """"2d" or "3d": the results.csv `kind` column."""
        return "2d" if self.kind == "baseline2d" else "3d"


def check_options(options: dict[str, Any], arm: str) -> None:
    """Every option must be a keyword parameter of `lsmfm.load_pretrained` (whatever it accepts now)."""
    from lsmfm.weights.load import load_pretrained

    params = inspect.signature(load_pretrained).parameters
    known = [n for n, p in params.items() if n not in NOT_OPTIONS
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"arm {arm!r}: unknown load_pretrained option(s) {unknown}; it accepts {known}")


@dataclass
class CompareConfig:
    """Keys shared by every task's comparison (see `lsmfm.tasks.config.FinetuneConfig` for data,
    shots, seeds, train, keep, prediction_format and device).

    Args:
        arms: the arms (at least one); each (shots, seed) trains every arm on the same volumes.
        backbone: architecture of scratch arms when there is no pretrained arm to copy.
        normalize: normalisation of scratch arms without a pretrained arm (default 0.5 / 99.5 %).
    """

    arms: list[ArmConfig] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    backbone: BackboneConfig = field(default_factory=default_backbone_config)
    normalize: NormalizeConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    keep: Literal["best", "all"] = "best"
    prediction_format: Literal["nifti", "zarr"] = "nifti"
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.arms:
            raise ValueError("arms must list at least one arm (kinds: pretrained, scratch, baseline2d)")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        pretrained = [a.name for a in self.arms if a.kind == "pretrained"]
        for arm in self.arms:
            if arm.like and arm.like not in pretrained:
                raise ValueError(f"arm {arm.name!r}: like={arm.like!r} is not a pretrained arm "
                                 f"({pretrained})")
        check_protocol(self.shots, self.seeds, self.device)
        for i, arm in enumerate(self.arms):
            arm_train(self, arm, f"arms[{i}].train")

    def reference(self, arm: ArmConfig) -> ArmConfig | None:
        """The pretrained arm a scratch arm copies (None: the config's backbone)."""
        name = arm.like or next((a.name for a in self.arms if a.kind == "pretrained"), "")
        return next((a for a in self.arms if a.name == name), None)


def arm_train(cfg: CompareConfig, arm: ArmConfig, where: str = "train") -> TrainConfig:
    """The arm's training settings: the shared `train:` section with the arm's overrides, validated."""
    from lsmfm.config import from_dict, to_dict

    if not arm.train:
        return cfg.train
    return from_dict(TrainConfig, {**to_dict(cfg.train), **arm.train}, source=f"arm {arm.name!r}",
                     prefix=f"{where}.")


_CLASSES: dict[str, type] = {}


def compare_config_class(task: str) -> type[CompareConfig]:
    """`CompareConfig` plus the task's section (`segment:`, `classify:`, `deblur:`), made once per task."""
    from lsmfm.tasks.registry import task_class

    if task not in _CLASSES:
        base = task_class(task).config_class
        section = next((f for f in dataclasses.fields(base) if f.name == task), None)
        if section is None:
            raise ConfigError(f"task {task!r} has no `{task}:` section in its finetune config")
        name = f"{task.capitalize()}CompareConfig"
        _CLASSES[task] = dataclasses.make_dataclass(
            name, [(task, typing.get_type_hints(base)[task],
                    field(default_factory=section.default_factory))],
            bases=(CompareConfig,), namespace={"__module__": __name__, "__doc__": CompareConfig.__doc__})
    return _CLASSES[task]
