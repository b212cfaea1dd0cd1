"""The experiment config: the schema, and one check of the whole thing.

`default_config()` is the schema: the fields every run reads, then those that the entries of
every registry declare (`CHOICES`: each config field that names an entry, and its registry). An
experiment file starts from it and overrides fields, and `validate` rejects any key it does not
hold. `validate` runs before anything is compiled: it checks every choice's name, the fields
every run reads, and runs the checks of the entries the config selects; it raises one
ValueError that lists every wrong field, its value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from jaxdiff import samplers
from jaxdiff.data import DATASETS, check_data_fields
from jaxdiff.diffusion import DEFAULT_MODEL_VAR_TYPE, MODEL_VAR_TYPES
from jaxdiff.losses import LOSS_TYPES, WEIGHTINGS
from jaxdiff.models import NETWORKS, create_model, get_network, label_classes
from jaxdiff.objectives import OBJECTIVES, of_config_name
from jaxdiff.optimizers import OPTIMIZERS
from jaxdiff.parameterisations import PARAMETERISATIONS
from jaxdiff.processes import PROCESSES, make_process
from jaxdiff.registry import Checker, Entry, is_int, is_number
from jaxdiff.registry import value as field_value
from jaxdiff.sharding import fsdp_dim


@dataclasses.dataclass(frozen=True)
class Choice:
    """A config field that names an entry of a registry: the field, the registry, the default
    name, which names the field accepts (`accepts(entry)`) and which entry a config selects
    (`selected(config)`; None: the one the field names)."""

    key: str
    registry: Mapping[str, Entry]
    default: str
    accepts: Callable[[Any], bool] = lambda entry: True
    selected: Callable[[ml_collections.ConfigDict], str] | None = None

    def names(self) -> tuple[str, ...]:
        return tuple(k for k, v in self.registry.items() if self.accepts(v))

    def entry(self, config: ml_collections.ConfigDict) -> Entry:
        name = field_value(config, self.key) if self.selected is None else self.selected(config)
        return self.registry[name]


# Every choice of the config; each entry of each registry declares the fields it reads.
CHOICES = (
    Choice("data.dataset", DATASETS, "cifar10"),
    Choice("model.name", NETWORKS, "unet"),
    Choice("diffusion.process", PROCESSES, "ddpm"),
    Choice("diffusion.model_output", PARAMETERISATIONS, "eps"),
    Choice("diffusion.model_var_type", MODEL_VAR_TYPES, DEFAULT_MODEL_VAR_TYPE),
    Choice("diffusion.loss_type", LOSS_TYPES, "simple"),
    Choice("diffusion.loss_weighting", WEIGHTINGS, "none"),
    Choice("optim.optimizer", OPTIMIZERS, "adam"),
    Choice("sampling.method", samplers.SAMPLERS, "ddpm"),
    # 'none' trains the diffusion model; a network with an objective of its own (the noisy
    # classifier) selects that one whatever this field says.
    Choice("consistency.method", OBJECTIVES, "none", accepts=lambda o: o.method,
           selected=of_config_name),
)


def _same_default(a: Any, b: Any) -> bool:
    if isinstance(a, ml_collections.FieldReference) or isinstance(b, ml_collections.FieldReference):
        return (isinstance(a, ml_collections.FieldReference)
                and isinstance(b, ml_collections.FieldReference)
                and a.get_type() is b.get_type() and a.get() == b.get())
    return type(a) is type(b) and a == b


def _declare(config: ml_collections.ConfigDict, declared: dict[str, Any], path: str,
             default: Any) -> None:
    if path in declared:
        if not _same_default(declared[path], default):
            raise ValueError(f"config.{path} is declared with two defaults, {declared[path]!r} "
                             f"and {default!r}")
        return
    declared[path] = default
    *sections, field = path.split(".")
    node = config
    for section in sections:
        if section not in node:
            node[section] = ml_collections.ConfigDict()
        node = node[section]
    if isinstance(default, ml_collections.FieldReference):  # a fresh one: configs share none
        default = ml_collections.FieldReference(default.get(), field_type=default.get_type())
    node[field] = default


def default_config() -> ml_collections.ConfigDict:
    """DDPM on CIFAR-10 (arXiv 2006.11239, Sec. 4 and App. B); every field an experiment may set:
    the fields every run reads, then those of every registry entry (`CHOICES`)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # True: a multi-host run; `jax.distributed.initialize()` joins its processes (see train.py).
    config.distributed = False

    config.data = data = ml_collections.ConfigDict()
    data.image_size = 32
    data.channels = 3
    data.num_classes = 10
    data.random_flip = True

    config.model = model = ml_collections.ConfigDict()
    model.dropout = 0.1
    model.class_cond = False

    config.diffusion = ml_collections.ConfigDict()

    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128
    training.num_steps = 800_000
    training.log_every = 100
    training.checkpoint_every = 10_000
    training.sample_every = 50_000
    training.keep_checkpoints = 3
    training.ema_decay = 0.9999
    # EDM's EMA (arXiv 2206.00364 App. F.3; NVlabs/edm training/training_loop.py) in place of the
    # fixed ema_decay: a half-life in thousands of images, capped at ema_rampup_ratio of the images
    # seen so far (None: no ramp-up). None: the fixed ema_decay.
    training.ema_halflife_kimg = ml_collections.config_dict.placeholder(float)
    training.ema_rampup_ratio = ml_collections.config_dict.placeholder(float)
    training.label_dropout = 0.0
    training.steps_per_call = 1
    training.skip_nonfinite = False  # True: skip an update whose loss or gradient is not finite
    # The step's device mesh ("data", "fsdp"): the batch split over both axes, the train state
    # sharded along "fsdp" (sharding.state_shardings). data = -1: the devices fsdp leaves.
    training.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})

    config.optim = optim = ml_collections.ConfigDict()
    optim.lr = 2e-4
    optim.warmup_steps = 5000
    optim.grad_clip = 1.0

    # Sample grids during training and `jaxdiff.evaluate`'s default sampler; each method declares
    # the `sampling.<option>` fields it takes (`jaxdiff.samplers.SAMPLERS`).
    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.num_steps = 1000
    sampling.num_samples = 64
    sampling.guidance_scale = 0.0

    config.consistency = ml_collections.ConfigDict()

    declared: dict[str, Any] = {}
    for choice in CHOICES:
        _declare(config, declared, choice.key, choice.default)
    for choice in CHOICES:
        for entry in choice.registry.values():
            for path, default in entry.fields.items():
                _declare(config, declared, path, default)
    return config


def sampling_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `sampling` fields that `config.sampling.method` takes and sets (None: its default),
    as `jaxdiff.sample` keywords."""
    return {name: config.sampling[name] for name in samplers.get(config.sampling.method).options
            if config.sampling[name] is not None}


def _to_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_tuples(v) for k, v in value.items()}
    return value


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as JSON (tuples become lists; `config_from_json` turns them back)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of `config_to_json`: JSON lists become tuples, as `default_config` writes them.

    A field the text lacks takes its `default_config` value: the config of a workdir written
    before that field existed reads as it trained (every field added since defaults to the
    behaviour before it). A sampler option that the workdir's method does not take reads as
    None: workdirs written before the methods declared their own fields hold every option, and
    their method never read the others.
    """
    loaded = _to_tuples(json.loads(text))
    merged = default_config().to_dict()
    for key, value in loaded.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    sampling = merged.get("sampling")
    if isinstance(sampling, dict) and sampling.get("method") in samplers.SAMPLERS:
        taken = samplers.SAMPLERS[sampling["method"]].options
        sampling.update({name: None for name in samplers.OPTIONS if name not in taken})
    return ml_collections.ConfigDict(merged)


# ---------------------------------------------------------------------------------------------
# The command line: `--config.<section>.<field>=<value>` overrides and `--help`.


def check_overrides(argv: Sequence[str]) -> None:
    """ValueError naming the first `--config.<path>` override in `argv` that is not a field of
    `default_config()`, with the nearest field's name or the fields there are.

    ml_collections raises such an override's KeyError from deep inside flag parsing.
    """
    schema = default_config()
    for arg in argv:
        name = arg.lstrip("-").split("=", 1)[0]
        if not name.startswith(("config.", "noconfig.")):
            continue
        node: Any = schema
        prefix = "config"
        for part in name.split(".")[1:]:
            if not isinstance(node, ml_collections.ConfigDict):
                raise ValueError(f"unknown config field {prefix}.{part} in {arg!r}: "
                                 f"{prefix} is a single value, not a section")
            if part not in node:
                close = difflib.get_close_matches(part, list(node), n=1)
                hint = (f"did you mean {prefix}.{close[0]}?" if close
                        else f"{prefix} has: {', '.join(node)}")
                raise ValueError(f"unknown config field {prefix}.{part} in {arg!r}; {hint}")
            node = node[part]
            prefix = f"{prefix}.{part}"


def describe_fields(section: str | None = None,
                    config: ml_collections.ConfigDict | None = None) -> str:
    """Every field of `default_config()` (or of one section) with its default (or its value in
    `config`, an experiment's), one a line."""
    schema = default_config() if config is None else config
    if section is not None and not isinstance(schema.get(section), ml_collections.ConfigDict):
        sections = [k for k, v in schema.items() if isinstance(v, ml_collections.ConfigDict)]
        raise ValueError(f"unknown config section {section!r}; the sections: "
                         f"{', '.join(sections)}")
    lines = []
    for key, value in schema.items():
        if isinstance(value, ml_collections.ConfigDict):
            if section in (None, key):
                lines.append(f"config.{key}:")
                lines += [f"  {field} = {v!r}" for field, v in value.items()]
        elif section is None:
            lines.append(f"config.{key} = {value!r}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Validation. Each check appends "config.<field> = <value>: <what is allowed>" to `errors`.


def _check_keys(c: Checker, config: ml_collections.ConfigDict) -> None:
    schema = default_config()
    for key in config:
        if key not in schema:
            c.errors.append(f"config.{key}: unknown key; allowed: {tuple(schema)}")
    for section in schema:
        if section not in config:
            c.errors.append(f"config.{section}: missing")
            continue
        expected = schema[section]
        given = config[section]
        if not isinstance(expected, ml_collections.ConfigDict):
            continue
        if not isinstance(given, (ml_collections.ConfigDict, dict)):
            c.errors.append(f"config.{section} = {given!r}: must be a ConfigDict of settings")
            continue
        for key in given:
            if key not in expected:
                c.errors.append(
                    f"config.{section}.{key}: unknown key; allowed: {tuple(expected)}"
                )
        for key in expected:
            if key not in given:
                c.errors.append(f"config.{section}.{key}: missing")


def _check_common(c: Checker, num_devices: int, known: bool) -> None:
    """The fields every run reads (no registry entry owns them); `known`: every choice names an
    entry, so the rules that read the entries run too."""
    c.check("seed", is_int, "must be an integer")
    c.boolean("distributed")
    if known:
        check_data_fields(c)
    c.boolean("model.class_cond")
    c.number("model.dropout", 0.0, 1.0)
    if c.get("model.class_cond") is True and is_int(c.get("data.num_classes")):
        c.check("data.num_classes", lambda v: v > 0,
                "a class-conditional model (model.class_cond=True) needs num_classes > 0")
    # Unknown (None) while a field it reads is wrong: then neither rule below is applied.
    conditional = None if c.errors or not known else label_classes(c.config) > 0

    if c.integer("training.mesh.fsdp", 1) and c.check(
            "training.mesh.data", lambda v: is_int(v) and (v == -1 or v >= 1),
            "must be -1 (the devices training.mesh.fsdp leaves) or an integer >= 1"):
        fsdp, data = c.get("training.mesh.fsdp"), c.get("training.mesh.data")
        c.check("training.mesh.fsdp" if data == -1 else "training.mesh.data",
                lambda v: data * fsdp == num_devices if data != -1 else num_devices % fsdp == 0,
                f"data x fsdp must equal the {num_devices} devices")
    if c.integer("training.batch_size", 1):
        c.check("training.batch_size", lambda v: v % num_devices == 0,
                f"must be divisible by the {num_devices} devices (training.mesh data x fsdp)")
    c.integer("training.num_steps", 1)
    c.integer("training.log_every", 1)
    c.integer("training.checkpoint_every", 1)
    c.integer("training.sample_every", 0)
    c.integer("training.keep_checkpoints", 1)
    c.number("training.ema_decay", 0.0, 1.0)
    c.check("training.ema_halflife_kimg", lambda v: v is None or (is_number(v) and v > 0),
            "must be None or a number > 0")
    if c.check("training.ema_rampup_ratio", lambda v: v is None or (is_number(v) and v > 0),
               "must be None or a number > 0"):
        c.check("training.ema_rampup_ratio",
                lambda v: v is None or c.get("training.ema_halflife_kimg") is not None,
                "ramps up training.ema_halflife_kimg, which is None")
    if c.number("training.label_dropout", 0.0, 1.0) and conditional is False:
        c.check("training.label_dropout", lambda v: v == 0.0,
                "label dropout (classifier-free guidance) needs model.class_cond=True")
    c.boolean("training.skip_nonfinite")
    if c.integer("training.steps_per_call", 1):
        k = c.get("training.steps_per_call")
        for field in ("num_steps", "log_every", "checkpoint_every", "sample_every"):
            c.check(f"training.{field}", lambda v: not is_int(v) or v % k == 0,
                    f"must be a multiple of training.steps_per_call = {k}")

    c.positive("optim.lr")
    c.integer("optim.warmup_steps", 0)
    c.number("optim.grad_clip", 0.0, math.inf)

    c.integer("sampling.num_steps", 1)  # the process's limits: the grid check below
    c.integer("sampling.num_samples", 1)
    if c.number("sampling.guidance_scale", 0.0, math.inf) and conditional is False:
        c.check("sampling.guidance_scale", lambda v: v == 0.0,
                "classifier-free guidance needs model.class_cond=True")


def _check_sampling_grid(c: Checker) -> None:
    """The sampler's own checks of the grid and its options, against this config's process."""
    if c.errors or not get_network(c.get("model.name")).denoises:
        return  # a network with its own objective (the classifier) is not sampled
    try:
        samplers.check_grid(make_process(c.config.diffusion), c.get("sampling.method"),
                            c.get("sampling.num_steps"), **sampling_options(c.config))
    except ValueError as e:
        c.errors.append(f"config.sampling: {e}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises one ValueError naming every invalid field of `config`; returns None when it is valid.

    The schema's keys, then every choice's name (`CHOICES`), then the fields every run reads and
    the checks of the entries the config selects (each refuses the combinations with the other
    selected entries that mean nothing), the sampler's grid and the network's own checks.
    `num_devices` (default: `jax.device_count()`, every process's) must equal the mesh's
    data x fsdp and divide the global batch size; fsdp > 1 needs a parameter to shard.
    """
    if num_devices is None:
        import jax

        num_devices = jax.device_count()
    c = Checker(config)
    _check_keys(c, config)
    known = all([c.one_of(choice.key, choice.names()) for choice in CHOICES])
    _check_common(c, num_devices, known)
    if known:
        for choice in CHOICES:
            check = choice.entry(config).check
            if check is not None:
                check(c)
        _check_sampling_grid(c)
    if not c.errors:
        # The network's own checks (GroupNorm widths, attention heads, ...), in the same list.
        try:
            create_model(config)
        except ValueError as e:
            c.errors.append(f"config.model: {e}")
    if not c.errors and config.training.mesh.fsdp > 1:
        _check_shardable(c, config)
    if c.errors:
        lines = "\n".join(f"  - {e}" for e in c.errors)
        raise ValueError(f"invalid config ({len(c.errors)} problem(s)):\n{lines}")


def _check_shardable(c: Checker, config: ml_collections.ConfigDict) -> None:
    """fsdp > 1 needs a parameter with a dimension it divides (shapes only: nothing runs)."""
    import jax

    from jaxdiff.bundle import image_shape
    from jaxdiff.models import init_params, label_classes

    fsdp = config.training.mesh.fsdp
    params = jax.eval_shape(lambda key: init_params(create_model(config), key,
                                                    image_shape(config), label_classes(config)),
                            jax.random.key(0))
    if all(fsdp_dim(x.shape, fsdp) is None for x in jax.tree.leaves(params)):
        c.fail("training.mesh.fsdp", f"no parameter of model {config.model.name!r} has a "
               "dimension it divides: nothing to shard")
