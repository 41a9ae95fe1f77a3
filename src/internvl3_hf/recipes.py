"""Typed training recipes: one dataclass per YAML section, parsed with errors that name the dotted key.

A recipe has four sections. `model` (`ModelArgs`), `lora` (`LoraArgs`, optional: absent or empty means no LoRA),
`data` (`SFTDataArgs` or `DataArgs`, with `SourceArgs` per source) and `training`: the fields of
`transformers.TrainingArguments` (SFT) or `internvl3_hf.mpo.MPOConfig` (MPO), plus the recipe options of
`SFTTrainingOptions` / `TrainingOptions` (`vision_lr_scale`, `fused_lm_head`, `compile_blocks`), which configure the
trainer rather than its arguments.

`load_recipe(path, ["data.max_length=4096"])` reads the YAML and applies `--set` overrides (values parsed as YAML,
integer parts index lists: `data.sources.0.path=...`); `SFTRecipe.from_dict` / `MPORecipe.from_dict` check every
key and value against the dataclasses. An unknown key fails with its dotted path and the nearest valid name:
`unknown recipe key 'data.max_packed_token' (did you mean 'data.max_packed_tokens'?)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .errors import UserError

LLM_LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
VISION_LORA_TARGETS = r".*vision_tower\.encoder\.layer\.\d+\.(attention\.(q|k|v)_proj|attention\.projection_layer|mlp\.fc[12])"
LORA_TARGETS = {"llm": [LLM_LORA_TARGETS], "vision": [VISION_LORA_TARGETS], "both": [LLM_LORA_TARGETS, VISION_LORA_TARGETS]}
RECIPE_SECTIONS = ["model", "lora", "data", "training"]
QUANTIZATIONS = ("4bit", "8bit")
SOURCE_TYPES = ("official_meta", "official_jsonl", "hf", "synthetic")


class RecipeError(UserError):
    """A recipe that cannot be used: a missing file, an unknown key, a bad override or value."""


class RecipeTypeError(RecipeError, TypeError):
    """A recipe value of the wrong type (`training.fused_lm_head: "no"`)."""


# --------------------------------------------------------------------------------------------------- schema
@dataclass
class ModelArgs:
    """The `model` section: which model, how it is loaded, and which parts are frozen (official freeze flags)."""

    name_or_path: str = field(
        default="tiny",
        metadata={"help": "`tiny` (the embedded tiny model, random weights) or a checkpoint: a local directory in the "
                          "plugin, official or -hf format, or a Hub id."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the tiny model's random initialisation (`tiny` only)."})
    dtype: str = field(default="auto", metadata={"help": "`from_pretrained` dtype: auto, bfloat16, float16, float32."})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention backend (sdpa, flash_attention_2, eager); default: transformers'."}
    )
    quantization: str | None = field(
        default=None, metadata={"help": "Load the weights quantized with bitsandbytes, for QLoRA: 4bit (NF4) or 8bit."}
    )
    v2pe_mode: str | None = field(default=None, metadata={"help": "Override the checkpoint's V2PE mode."})
    v2pe_delta: float | None = field(default=None, metadata={"help": "Override the checkpoint's V2PE position step."})
    freeze_vision: bool = field(default=False, metadata={"help": "Freeze the ViT (official `freeze_backbone`)."})
    freeze_projector: bool = field(default=False, metadata={"help": "Freeze the MLP projector (official `freeze_mlp`)."})
    freeze_llm: bool = field(default=False, metadata={"help": "Freeze the LLM and its LM head (official `freeze_llm`)."})
    unfreeze_vision_last_layers: int = field(
        default=0, metadata={"help": "Train the last k ViT layers of a frozen ViT (official `unfreeze_vit_layers`)."}
    )

    def __post_init__(self):
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise RecipeError(f"model.quantization must be one of {QUANTIZATIONS} or null, got {self.quantization!r}.")
        if self.unfreeze_vision_last_layers < 0:
            raise RecipeError(f"model.unfreeze_vision_last_layers must be 0 or more, got {self.unfreeze_vision_last_layers}.")

    @property
    def config_overrides(self) -> dict[str, Any]:
        """The model-config fields the recipe sets (V2PE), applied on top of the checkpoint's."""
        return {key: getattr(self, key) for key in ("v2pe_mode", "v2pe_delta") if getattr(self, key) is not None}


@dataclass
class LoraArgs:
    """The `lora` section: PEFT LoRA adapters (official defaults: alpha = 2r, dropout 0.05)."""

    r: int = field(default=16, metadata={"help": "Rank of the adapters."})
    alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (scale alpha / r); default 2r."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapters' input."})
    target: str = field(default="llm", metadata={"help": "Where the adapters go: llm, vision or both."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (PEFT's option)."}
    )

    def __post_init__(self):
        if self.target not in LORA_TARGETS:
            raise RecipeError(f"lora.target must be one of {sorted(LORA_TARGETS)}, got {self.target!r}.")


@dataclass
class SourceArgs:
    """One entry of `data.sources`. Which keys a type takes: `SOURCE_KEYS`."""

    type: str = field(metadata={"help": "official_meta, official_jsonl, hf or synthetic."})
    path: str | None = field(
        default=None, metadata={"help": "Meta JSON, JSONL annotation, or a dataset (Hub id or saved folder)."}
    )
    name: str | None = field(default=None, metadata={"help": "Name in logs (default: type[index])."})
    root: str = field(default=".", metadata={"help": "official_jsonl: folder the image paths are relative to."})
    split: str = field(default="train", metadata={"help": "hf: the split of a Hub dataset."})
    repeat_time: float = field(default=1.0, metadata={"help": "How often the source is drawn (official semantics)."})
    data_augment: bool = field(default=False, metadata={"help": "Random JPEG re-compression of the images (SFT)."})
    max_dynamic_patch: int | None = field(
        default=None, metadata={"help": "official_jsonl: tile budget of this source's images."}
    )
    count: int = field(default=8, metadata={"help": "synthetic: how many samples or pairs."})
    seed: int = field(default=0, metadata={"help": "synthetic: the generator's seed."})
    system: str | None = field(default=None, metadata={"help": "synthetic MPO pairs: a system prompt for every pair."})


# The keys each source type reads (beyond `type`); any other key is refused rather than ignored.
SOURCE_KEYS = {
    "official_meta": {"path"},
    "official_jsonl": {"path", "name", "root", "repeat_time", "data_augment", "max_dynamic_patch"},
    "hf": {"path", "name", "split", "repeat_time", "data_augment"},
    "synthetic": {"name", "repeat_time", "count", "seed", "system"},
}


@dataclass
class DataArgs:
    """The `data` section of an MPO recipe (and the part SFT shares)."""

    sources: list[SourceArgs] = field(default_factory=list, metadata={"help": "The datasets, mixed by repeat_time."})
    seed: int = field(default=0, metadata={"help": "Seed of the mixing and of the tiling randomness."})
    on_error: str = field(
        default="drop", metadata={"help": "An unusable sample: drop (logged and counted) or raise."}
    )


@dataclass
class SFTDataArgs(DataArgs):
    """The `data` section of an SFT recipe: lengths, packing and the loss weighting."""

    max_length: int | None = field(default=None, metadata={"help": "Longest sample in tokens; longer ones are dropped."})
    max_packed_tokens: int | None = field(
        default=None, metadata={"help": "Pack each micro-batch into one padding-free row of at most this many tokens."}
    )
    max_packed_tiles: int | None = field(default=None, metadata={"help": "Most image tiles in one packed row."})
    loss_weighting: str = field(
        default="square", metadata={"help": "Per-token loss weights: square (1/sqrt(l)), token or sample."}
    )


@dataclass
class TrainingOptions:
    """Keys of the `training` section that configure the trainer rather than its arguments (MPO and SFT)."""

    vision_lr_scale: float = field(
        default=1.0,
        metadata={"help": "The ViT trains at this multiple of learning_rate (the projector and LLM at learning_rate); "
                          "1 keeps the trainer's own optimizer groups."},
    )

    def __post_init__(self):
        if self.vision_lr_scale < 0:
            raise RecipeError(f"training.vision_lr_scale must be 0 or more, got {self.vision_lr_scale}.")


@dataclass
class SFTTrainingOptions(TrainingOptions):
    """The SFT trainer's recipe options."""

    fused_lm_head: bool = field(
        default=True,
        metadata={"help": "The loss through TRL's fused LM head, never materialising (batch, seq, vocab) logits; "
                          "false computes it from full logits."},
    )
    compile_blocks: bool | dict[str, Any] = field(
        default=False,
        metadata={"help": "torch.compile every LLM decoder and ViT encoder layer (dynamic shapes); a mapping passes "
                          "`language`/`vision` flags and torch.compile arguments, e.g. {backend: aot_eager}."},
    )


@dataclass
class Recipe:
    """A parsed recipe. `training` holds the checked keyword arguments of `arguments_class()`; build them with
    `training_arguments()` (not at parse time: under DeepSpeed they set up the distributed state)."""

    model: ModelArgs = field(default_factory=ModelArgs)
    lora: LoraArgs | None = None
    data: DataArgs = field(default_factory=DataArgs)
    training: dict[str, Any] = field(default_factory=dict)
    options: TrainingOptions = field(default_factory=TrainingOptions)

    data_class: ClassVar[type] = DataArgs
    options_class: ClassVar[type] = TrainingOptions
    training_defaults: ClassVar[dict[str, Any]] = {"report_to": []}

    @staticmethod
    def arguments_class() -> type:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, recipe: Mapping[str, Any]) -> Recipe:
        """Check every key and value of a recipe dict (as `load_recipe` returns) and build the typed recipe."""
        if isinstance(recipe, cls):
            return recipe
        recipe = _expect_mapping(recipe, "")
        _check_keys(recipe, RECIPE_SECTIONS, "")
        training = _expect_mapping(recipe.get("training") or {}, "training")
        options = {key: training[key] for key in _init_fields(cls.options_class) if key in training}
        return cls(
            model=parse_section(ModelArgs, recipe.get("model") or {}, "model"),
            lora=parse_section(LoraArgs, recipe["lora"], "lora") if recipe.get("lora") else None,
            data=_parse_data(cls.data_class, recipe.get("data") or {}),
            training=_parse_arguments(cls.arguments_class(), cls.options_class, training),
            options=parse_section(cls.options_class, options, "training"),
        )

    def training_arguments(self):
        """The trainer's arguments: the recipe's `training` keys over `training_defaults`."""
        return self.arguments_class()(**{**self.training_defaults, **self.training})


@dataclass
class SFTRecipe(Recipe):
    """An SFT / native pre-training recipe (`internvl3-hf train`)."""

    data: SFTDataArgs = field(default_factory=SFTDataArgs)
    options: SFTTrainingOptions = field(default_factory=SFTTrainingOptions)

    data_class: ClassVar[type] = SFTDataArgs
    options_class: ClassVar[type] = SFTTrainingOptions
    training_defaults: ClassVar[dict[str, Any]] = {"report_to": [], "remove_unused_columns": False}

    @staticmethod
    def arguments_class() -> type:
        from transformers import TrainingArguments

        return TrainingArguments


@dataclass
class MPORecipe(Recipe):
    """An MPO recipe (`internvl3-hf mpo`); `training` takes every `MPOConfig` field (w_p, w_q, w_g, beta, ...)."""

    @staticmethod
    def arguments_class() -> type:
        from .mpo.config import MPOConfig

        return MPOConfig


# --------------------------------------------------------------------------------------------------- loading
def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A recipe dict from YAML, with `a.b=value` overrides (values parsed as YAML; integer parts index lists).

    Only the section names are checked here; `SFTRecipe.from_dict` / `MPORecipe.from_dict` (which the builders call)
    check every key and value."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist; see recipes/ for examples.")
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {' '.join(str(error).split())}") from error
    recipe = _expect_mapping(recipe, "", f"recipe {str(path)!r}")
    for override in overrides:
        apply_override(recipe, override)
    _check_keys(recipe, RECIPE_SECTIONS, "")
    return recipe


def apply_override(recipe: dict, override: str) -> None:
    """Set `a.b.c=value` in `recipe` (the value parsed as YAML), creating missing mappings on the way."""
    key, equals, text = override.partition("=")
    if not equals or not key:
        raise RecipeError(f"override {override!r} must look like section.key=value.")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RecipeError(f"override {override!r}: the value is not valid YAML ({' '.join(str(error).split())}).")
    *parents, leaf = key.split(".")
    node: Any = recipe
    for depth, part in enumerate(parents):
        child = _child(node, part, ".".join(parents[: depth + 1]))
        if child is None:
            child = {}
            _set_child(node, part, child, ".".join(parents[: depth + 1]))
        node = child
    _set_child(node, leaf, value, key)


def _child(node: Any, part: str, path: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path)]
    if isinstance(node, dict):
        return node.get(part)
    raise RecipeError(f"override: recipe key '{_parent(path)}' is a value ({node!r}), not a mapping or a list.")


def _set_child(node: Any, part: str, value: Any, path: str) -> None:
    if isinstance(node, list):
        node[_index(node, part, path)] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise RecipeError(f"override: recipe key '{_parent(path)}' is a value ({node!r}), not a mapping or a list.")


def _index(items: list, part: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise RecipeError(f"override: '{path}' needs an index from 0 to {len(items) - 1} into '{_parent(path)}'.")
    return int(part)


def _parent(path: str) -> str:
    return path.rpartition(".")[0] or path


# --------------------------------------------------------------------------------------------------- parsing
def parse_section(cls: type, values: Any, path: str):
    """An instance of the dataclass `cls` from a mapping; keys and values checked, errors named by `path`."""
    values = _expect_mapping(values, path)
    names = _init_fields(cls)
    _check_keys(values, list(names), path)
    hints = typing.get_type_hints(cls)
    missing = [name for name, spec in names.items() if _required(spec) and name not in values]
    if missing:
        raise RecipeError(f"recipe key '{_join(path, missing[0])}' is required.")
    return cls(**{key: _coerce(value, hints[key], _join(path, key)) for key, value in values.items()})


def _parse_data(cls: type, values: Any) -> DataArgs:
    data = parse_section(cls, values, "data")
    for index, source in enumerate(data.sources):
        path = f"data.sources.{index}"
        if source.type not in SOURCE_KEYS:
            raise RecipeError(f"{path}.type must be one of {', '.join(SOURCE_TYPES)}, got {source.type!r}.")
        foreign = sorted(set(values["sources"][index]) - {"type"} - SOURCE_KEYS[source.type])
        if foreign:
            raise RecipeError(
                f"recipe key '{path}.{foreign[0]}' does not apply to a {source.type} source "
                f"(it takes {', '.join(sorted(SOURCE_KEYS[source.type]))})."
            )
        if source.type != "synthetic" and source.path is None:
            raise RecipeError(f"recipe key '{path}.path' is required for a {source.type} source.")
    return data


def _parse_arguments(arguments_class: type, options_class: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The `training` keys that are `arguments_class` fields, values checked against their annotations."""
    fields = _init_fields(arguments_class)
    options = _init_fields(options_class)
    _check_keys(values, [*fields, *options], "training", about=f"field of {arguments_class.__name__} nor a recipe option")
    hints = _type_hints(arguments_class)
    return {
        key: _coerce(value, hints.get(key, Any), f"training.{key}") for key, value in values.items() if key in fields
    }


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that does not resolve here: leave its check to the dataclass
        return {spec.name: spec.type for spec in dataclasses.fields(cls) if not isinstance(spec.type, str)}


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {spec.name: spec for spec in dataclasses.fields(cls) if spec.init}


def _required(spec: dataclasses.Field) -> bool:
    return spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING


def _check_keys(values: Mapping[str, Any], valid: list[str], path: str, about: str = "") -> None:
    for key in values:
        if key in valid:
            continue
        dotted = _join(path, str(key))
        close = difflib.get_close_matches(str(key), valid, n=1)
        if close:
            raise RecipeError(f"unknown recipe key '{dotted}' (did you mean '{_join(path, close[0])}'?)")
        hint = f"not a {about}" if about else f"valid keys: {', '.join(valid)}"
        raise RecipeError(f"unknown recipe key '{dotted}' ({hint})")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _expect_mapping(values: Any, path: str, name: str = "") -> dict:
    if not isinstance(values, Mapping):
        raise RecipeTypeError(f"{name or f'recipe key {path!r}'} must be a mapping of keys to values, got {values!r}.")
    return dict(values)


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    """`value` checked against a field annotation (bool, int, float, str, enums, lists, dicts, dataclasses,
    unions). A float field takes an int, and a string that reads as a number: YAML 1.1 reads `1e-5` (no dot) as a
    string."""
    origin, members = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any or isinstance(annotation, (str, typing.TypeVar)):
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in members:
            return None
        for member in members:
            if member is type(None):
                continue
            try:
                return _coerce(value, member, path)
            except RecipeTypeError:
                continue
        raise _wrong_type(value, annotation, path)
    if dataclasses.is_dataclass(annotation):
        return parse_section(annotation, value, path)
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(value, annotation, path)
        item = members[0] if members else Any
        return [_coerce(entry, item, f"{path}.{index}") for index, entry in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise _wrong_type(value, annotation, path)
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value  # an int stays an int (`warmup_steps: 0`), as the dataclass would receive it from YAML
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if isinstance(value, annotation) or value in {member.value for member in annotation}:
            return value
    else:
        return value  # a type the recipe does not check: the dataclass it belongs to does
    raise _wrong_type(value, annotation, path)


def _wrong_type(value: Any, annotation: Any, path: str) -> RecipeTypeError:
    return RecipeTypeError(f"recipe key '{path}' must be {_describe(annotation)}, got {value!r}.")


def _describe(annotation: Any) -> str:
    members = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_describe(member) for member in members)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(member.value) for member in annotation)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if annotation in names:
        return names[annotation]
    origin = typing.get_origin(annotation) or annotation
    return {list: "a list", tuple: "a list", dict: "a mapping"}.get(origin, getattr(annotation, "__name__", str(annotation)))


# --------------------------------------------------------------------------------------------------- builders' parts
def lora_config(settings: LoraArgs | Mapping[str, Any]):
    """The PEFT `LoraConfig` of a recipe's `lora` section (a `LoraArgs` or its dict)."""
    from peft import LoraConfig

    if not isinstance(settings, LoraArgs):
        settings = parse_section(LoraArgs, settings, "lora")
    return LoraConfig(
        r=settings.r,
        lora_alpha=2 * settings.r if settings.alpha is None else settings.alpha,
        lora_dropout=settings.dropout,
        target_modules="|".join(f"(?:{pattern})" for pattern in LORA_TARGETS[settings.target]),
        modules_to_save=settings.modules_to_save,
    )


__all__ = [
    "DataArgs",
    "LoraArgs",
    "MPORecipe",
    "ModelArgs",
    "Recipe",
    "RecipeError",
    "RecipeTypeError",
    "SFTDataArgs",
    "SFTRecipe",
    "SFTTrainingOptions",
    "SourceArgs",
    "TrainingOptions",
    "apply_override",
    "load_recipe",
    "lora_config",
    "parse_section",
]
