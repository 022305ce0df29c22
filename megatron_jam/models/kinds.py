"""One registry of model kinds: what a `model_config.json` can hold and what each kind answers.

Why one place: the trainer, the converter, the evaluator and the generator all need to know, per kind
(a single stack -- imported parent, JAM-Uniform, JAM-Width -- or JAM-Cross), its parents, the class that
builds it, the parallel layouts it accepts, how it describes itself, its parameter count and its FLOPs.
Asking the kind instead of `isinstance` / `hasattr` at each call site means a fourth fusion method touches
its own files and one entry here. Model classes are imported lazily: this module (and `--help`) does not
import Megatron-Core.
"""

import importlib
import json
import os
from dataclasses import dataclass
from typing import Callable

from megatron_jam.models import flops, param_count
from megatron_jam.models.config import (ConfigError, JamCrossConfig, JamGPTConfig, ParentConfig, validate_gpt_parallel,
                                        validate_parallel)

MODEL_CONFIG_FILE = "model_config.json"


@dataclass(frozen=True)
class ModelKind:
    """A model kind: its `model_type`, config class and answers (functions of a config of that class)."""

    model_type: str
    config_class: type
    model_class_path: str
    """`module:Class` of the Megatron-Core model (imported on first use)."""
    single_stack: bool
    """One decoder stack (can be a converter parent, exports to Hugging Face)."""
    parents: Callable[[object], dict]
    """Stream name -> ParentConfig ('' for a single stack)."""
    describe: Callable[[object], str]
    validate_parallel: Callable[..., None]
    params: Callable[[object], int]
    flops_per_token: Callable[[object, int], float]

    @property
    def model_class(self) -> type:
        module, _, name = self.model_class_path.partition(":")
        return getattr(importlib.import_module(module), name)


KINDS = {
    "gpt": ModelKind(
        model_type="gpt", config_class=JamGPTConfig, model_class_path="megatron_jam.models.jam_gpt:JamGPTModel",
        single_stack=True, parents=lambda cfg: {"": cfg.parent},
        describe=lambda cfg: f"single-stack GPT ({cfg.parent.family}, d={cfg.hidden_size})",
        validate_parallel=validate_gpt_parallel,
        params=lambda cfg: param_count.parent_params(cfg.parent, cfg.padded_vocab_size,
                                                     cfg.share_embeddings_and_output_weights),
        flops_per_token=lambda cfg, s: flops.parent_flops_per_token(cfg.parent, cfg.padded_vocab_size, s)),
    "jam_cross": ModelKind(
        model_type="jam_cross", config_class=JamCrossConfig,
        model_class_path="megatron_jam.models.jam_cross:JamCrossModel", single_stack=False,
        parents=lambda cfg: {"llm": cfg.llm, "img": cfg.img},
        describe=lambda cfg: f"JAM-Cross (k={cfg.cross_every})", validate_parallel=validate_parallel,
        params=param_count.jam_cross_params, flops_per_token=flops.jam_cross_flops_per_token),
}


def kind_of(cfg) -> ModelKind:
    """The kind of a model config object."""
    kind = KINDS.get(getattr(cfg, "MODEL_TYPE", None))
    if kind is None or not isinstance(cfg, kind.config_class):
        raise ConfigError(f"{type(cfg).__name__} is not a registered model kind ({sorted(KINDS)})")
    return kind


def model_config_from_dict(d: dict, where: str = "model config"):
    """The config a `to_dict()` came from, by its `model_type`."""
    kind = KINDS.get(d.get("model_type"))
    if kind is None:
        raise ConfigError(f"{where}: model_type={d.get('model_type')!r} is not one of {sorted(KINDS)}")
    return kind.config_class.from_dict(d)


def load_model_config(path: str):
    """Read a model-config JSON (a file, or a checkpoint folder holding model_config.json)."""
    if os.path.isdir(path):
        path = os.path.join(path, MODEL_CONFIG_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"model config {path}: no such file")
    with open(path) as f:
        return model_config_from_dict(json.load(f), where=f"model config {path}")


def model_class(cfg) -> type:
    """The model class that builds `cfg` (for `build_model_chunks`)."""
    return kind_of(cfg).model_class


def validate_model_parallel(cfg, **layout) -> None:
    """The kind's layout check (heads, groups, vocabulary vs TP; layers vs pipeline stages; ...)."""
    kind_of(cfg).validate_parallel(cfg, **layout)


def parents(cfg) -> list[ParentConfig]:
    """The parent stacks of a model (one for a single stack, two for JAM-Cross)."""
    return list(kind_of(cfg).parents(cfg).values())
