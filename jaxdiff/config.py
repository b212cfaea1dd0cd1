"""The experiment config: every field with its DDPM default, and one check of the whole thing.

`default_config()` is the schema: an experiment file starts from it and overrides fields, and
`validate` rejects any key it does not hold. `validate` runs before anything is compiled and
raises one ValueError that lists every wrong field, its value and what is allowed.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from jaxdiff import consistency as cm
from jaxdiff import samplers
from jaxdiff.data import (
    DATASETS,
    DIGITS_SIZE,
    TOY_DISTRIBUTIONS,
    dataset_channels,
    dataset_classes,
)
from jaxdiff.diffusion import DEFAULT_MODEL_VAR_TYPE, LEARNED_VAR_TYPES, MODEL_VAR_TYPES
from jaxdiff.losses import LOSS_TYPES, WEIGHTINGS
from jaxdiff.models import DTYPES, create_model
from jaxdiff.models.classifier import POOLS
from jaxdiff.parameterisations import CONSISTENCY_SIGMA_MIN, PARAMETERISATIONS
from jaxdiff.processes import PROCESSES, SPACINGS, make_process
from jaxdiff.samplers import ODE_STEPS
from jaxdiff.schedules import BETA_SCHEDULES, LINEAR_END, LINEAR_START

MODEL_NAMES = ("unet", "mlp", "classifier")
# consistency.method: 'none' (diffusion training) and the keys of `jaxdiff.train.OBJECTIVES`.
CONSISTENCY_METHODS = ("none", "cd", "ct", "ict")
OPTIMIZERS = ("adam", "adamw")


def default_config() -> ml_collections.ConfigDict:
    """DDPM on CIFAR-10 (arXiv 2006.11239, Sec. 4 and App. B); every field an experiment may set."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # True: a multi-host run; `jax.distributed.initialize()` joins its processes (see train.py).
    config.distributed = False

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "cifar10"
    data.image_size = 32
    data.channels = 3
    data.num_classes = 10
    data.random_flip = True
    data.toy_distribution = "gmm"
    data.data_dir = ml_collections.config_dict.placeholder(str)

    config.model = model = ml_collections.ConfigDict()
    model.name = "unet"
    model.ch = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.num_heads = 1
    model.num_head_channels = -1
    model.resblock_updown = False
    model.use_scale_shift_norm = False
    model.resamp_with_conv = True
    model.class_cond = False
    model.dtype = "float32"
    model.pool = "attention"
    model.hidden = 256
    model.depth = 4

    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.process = "ddpm"  # "edm", "flow_matching" (jaxdiff.processes.PROCESSES)
    diffusion.beta_schedule = "linear"
    diffusion.num_timesteps = 1000
    # Beta end points (schedules.beta_schedule): `linear` scales them by 1000 / T, `quad`,
    # `sqrt_linear`, `sqrt` and `sigmoid` use them as given, `cosine` has none.
    diffusion.linear_start = LINEAR_START
    diffusion.linear_end = LINEAR_END
    diffusion.model_output = "eps"  # jaxdiff.parameterisations.PARAMETERISATIONS
    diffusion.model_var_type = DEFAULT_MODEL_VAR_TYPE
    diffusion.loss_type = "simple"
    diffusion.hybrid_lambda = 0.001
    diffusion.loss_weighting = "none"  # jaxdiff.losses.WEIGHTINGS, for loss_type 'simple'
    diffusion.min_snr_gamma = 5.0  # min-SNR-gamma (arXiv 2303.09556)
    diffusion.p2_gamma = 1.0  # P2 (arXiv 2204.00227): 1 / (k + SNR)^gamma
    diffusion.p2_k = 1.0
    # The "edm" process (EDM arXiv 2206.00364 Table 1) and its preconditioning ("edm" output).
    diffusion.sigma_min = 0.002
    diffusion.sigma_max = 80.0
    diffusion.sigma_data = 0.5
    diffusion.p_mean = -1.2
    diffusion.p_std = 1.2
    # The "flow_matching" process (rectified flow, arXiv 2209.03003): SD3's logit-normal
    # training times (arXiv 2403.03206 Eq. 19) and timestep shift (Sec. 5.3.2).
    diffusion.logit_mean = 0.0
    diffusion.logit_std = 1.0
    diffusion.shift = 1.0

    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128
    training.num_steps = 800_000
    training.log_every = 100
    training.checkpoint_every = 10_000
    training.sample_every = 50_000
    training.keep_checkpoints = 3
    training.ema_decay = 0.9999
    training.label_dropout = 0.0
    training.steps_per_call = 1
    training.skip_nonfinite = False  # True: skip an update whose loss or gradient is not finite

    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = "adam"
    optim.lr = 2e-4
    optim.warmup_steps = 5000
    optim.grad_clip = 1.0
    optim.b1 = 0.9
    optim.b2 = 0.999
    optim.eps = 1e-8
    optim.weight_decay = 0.0

    # Sample grids during training and `jaxdiff.evaluate`'s default sampler. `eta`, `spacing` and
    # `s_churn` are passed to the methods that take them (`jaxdiff.samplers.SAMPLERS`).
    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.method = "ddpm"
    sampling.num_steps = 1000
    sampling.eta = 1.0
    sampling.num_samples = 64
    sampling.guidance_scale = 0.0
    sampling.spacing = ml_collections.config_dict.placeholder(str)  # None: the method's own
    sampling.s_churn = 0.0
    # The levels of CM's multistep sampler (method 'consistency'); None: one step from sigma_max.
    sampling.sigmas = ml_collections.config_dict.placeholder(tuple)

    # Distillation: the workdir of the trained model to distil (consistency.method 'cd'), and
    # whether the student (and its target) start from the teacher's weights, as in the CM code
    # (`scripts/cm_train.py`); that needs the teacher's network to be the student's.
    config.distill = distill = ml_collections.ConfigDict()
    distill.teacher = ml_collections.config_dict.placeholder(str)
    distill.init_from_teacher = True

    # Consistency models (CM arXiv 2303.01469; iCT arXiv 2310.14189): 'none' trains the diffusion
    # model above; 'cd', 'ct' and 'ict' train a one-step generator (diffusion.process 'edm',
    # diffusion.model_output 'consistency'). Defaults are CM's CIFAR-10 CT settings (App. C).
    config.consistency = consistency = ml_collections.ConfigDict()
    consistency.method = "none"  # or one of CONSISTENCY_METHODS
    consistency.solver = "heun"  # CD's teacher ODE step (jaxdiff.samplers.ODE_STEPS)
    consistency.distance = "l2"  # jaxdiff.consistency.DISTANCES
    consistency.num_scales = 18  # CD's N
    consistency.target_ema = 0.95  # CD's fixed target rate mu
    consistency.start_scales = 2  # CT / iCT curricula: s0, s1 and CT's mu0
    consistency.end_scales = 150
    consistency.start_ema = 0.9
    # K, the length the curricula are stretched over; None: training.num_steps.
    consistency.curriculum_steps = ml_collections.config_dict.placeholder(int)
    consistency.p_mean = -1.1  # iCT's discretised lognormal over the levels (Sec. 3.5)
    consistency.p_std = 2.0
    consistency.huber_c = ml_collections.config_dict.placeholder(float)  # None: 0.00054 sqrt(d)
    # distance 'lpips': the `lpips` package's vgg.pth heads and a torchvision VGG-16 state dict.
    consistency.lpips_heads = ml_collections.config_dict.placeholder(str)
    consistency.lpips_vgg = ml_collections.config_dict.placeholder(str)
    return config


def loss_weighting_params(config: ml_collections.ConfigDict) -> dict[str, float]:
    """The parameters of `diffusion.loss_weighting` (`jaxdiff.losses.WEIGHTINGS`)."""
    d = config.diffusion
    return {"none": {}, "min_snr": {"gamma": d.min_snr_gamma},
            "p2": {"gamma": d.p2_gamma, "k": d.p2_k}}[d.loss_weighting]


def sampling_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `sampling` fields that `config.sampling.method` takes, as `jaxdiff.sample` keywords."""
    taken = samplers.get(config.sampling.method).options
    return {name: config.sampling[name] for name in ("eta", "spacing", "s_churn", "sigmas")
            if name in taken and config.sampling[name] is not None}


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
    behaviour before it).
    """
    loaded = _to_tuples(json.loads(text))
    merged = default_config().to_dict()
    for key, value in loaded.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Checker:
    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.errors: list[str] = []

    def get(self, path: str) -> Any:
        node: Any = self.config
        for part in path.split("."):
            if part not in node:
                return _MISSING
            node = node[part]
        return node

    def fail(self, path: str, allowed: str) -> None:
        value = self.get(path)
        shown = "<missing>" if value is _MISSING else repr(value)
        self.errors.append(f"config.{path} = {shown}: {allowed}")

    def check(self, path: str, ok: Callable[[Any], bool], allowed: str) -> bool:
        """Records an error unless `ok(value)`; returns whether the value passed."""
        value = self.get(path)
        if value is _MISSING:
            return False  # reported once, as a missing key
        if ok(value):
            return True
        self.fail(path, allowed)
        return False

    def one_of(self, path: str, choices: tuple[str, ...]) -> bool:
        return self.check(path, lambda v: v in choices, f"must be one of {choices}")

    def integer(self, path: str, low: int) -> bool:
        return self.check(
            path, lambda v: _is_int(v) and v >= low, f"must be an integer >= {low}"
        )

    def number(self, path: str, low: float, high: float, *, low_open: bool = False,
               high_open: bool = True) -> bool:
        def ok(v: Any) -> bool:
            if not _is_number(v):
                return False
            above = v > low if low_open else v >= low
            below = v < high if high_open else v <= high
            return above and below

        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        return self.check(path, ok, f"must be a number in {left}{low}, {high}{right}")

    def boolean(self, path: str) -> bool:
        return self.check(path, lambda v: isinstance(v, bool), "must be True or False")


_MISSING = object()


def _check_keys(c: _Checker, config: ml_collections.ConfigDict) -> None:
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


def data_errors(config: ml_collections.ConfigDict) -> list[str]:
    """Every problem of `config.data` alone (the rules of its data set), one line each."""
    c = _Checker(config)
    _check_data(c)
    return c.errors


def _check_data(c: _Checker) -> None:
    dataset_ok = c.one_of("data.dataset", DATASETS)
    dataset = c.get("data.dataset")
    c.integer("data.image_size", 1)
    if dataset_ok:
        channels = dataset_channels(dataset)
        what = "the point dimension" if dataset == "toy2d" else "the image channels"
        c.check("data.channels", lambda v: v == channels, f"{dataset} has {channels} ({what})")
        if dataset == "digits":
            c.check("data.image_size", lambda v: v == DIGITS_SIZE,
                    f"digits are {DIGITS_SIZE}x{DIGITS_SIZE}; set image_size = {DIGITS_SIZE}")
    elif c.get("data.channels") is not _MISSING:
        c.integer("data.channels", 1)
    c.boolean("data.random_flip")
    if dataset == "toy2d":
        c.one_of("data.toy_distribution", TOY_DISTRIBUTIONS)
        c.check("data.random_flip", lambda v: v is False, "toy2d points cannot be flipped")
    c.integer("data.num_classes", 0)
    num_classes = c.get("data.num_classes")
    if dataset_ok and _is_int(num_classes) and num_classes > 0:
        known = dataset_classes(dataset, c.get("data.toy_distribution"))
        c.check("data.num_classes", lambda v: v == known,
                f"{dataset} has {known} classes (or 0 to ignore the labels)")
    c.check("data.data_dir", lambda v: v is None or isinstance(v, str), "must be None or a path")


def _check_model(c: _Checker) -> None:
    dataset = c.get("data.dataset")
    dataset_ok = dataset in DATASETS
    num_classes = c.get("data.num_classes")
    name_ok = c.one_of("model.name", MODEL_NAMES)
    name = c.get("model.name")
    if name_ok and dataset_ok:
        if dataset == "toy2d":
            c.check("model.name", lambda v: v == "mlp", "toy2d (points) needs model.name 'mlp'")
        else:
            c.check("model.name", lambda v: v != "mlp",
                    f"'mlp' takes points, not {dataset} images; use 'unet' or 'classifier'")
    c.boolean("model.class_cond")
    c.number("model.dropout", 0.0, 1.0)
    c.one_of("model.dtype", DTYPES)
    labelled = _is_int(num_classes) and num_classes > 0
    if c.get("model.class_cond") is True and _is_int(num_classes):
        c.check("data.num_classes", lambda v: v > 0,
                "a class-conditional model (model.class_cond=True) needs num_classes > 0")
    if name == "classifier" and _is_int(num_classes) and not labelled:
        c.check("data.num_classes", lambda v: v > 0, "a classifier needs num_classes > 0")

    if name == "mlp":
        c.integer("model.hidden", 1)
        c.integer("model.depth", 1)
        return
    if name not in ("unet", "classifier"):
        return
    c.integer("model.ch", 1)
    c.integer("model.num_res_blocks", 1)
    c.integer("model.num_heads", 1)
    c.check("model.num_head_channels", lambda v: _is_int(v) and (v == -1 or v >= 1),
            "must be -1 (use num_heads) or a positive integer")
    c.boolean("model.resblock_updown")
    c.boolean("model.use_scale_shift_norm")
    c.boolean("model.resamp_with_conv")
    if name == "classifier":
        c.one_of("model.pool", POOLS)
    mult_ok = c.check(
        "model.ch_mult",
        lambda v: isinstance(v, (tuple, list)) and len(v) > 0
        and all(_is_int(m) and m >= 1 for m in v),
        "must be a non-empty tuple of positive integers",
    )
    size = c.get("data.image_size")
    if not (mult_ok and _is_int(size) and size >= 1):
        return
    levels = len(c.get("model.ch_mult"))
    factor = 2 ** (levels - 1)
    if c.check("data.image_size", lambda v: v % factor == 0,
               f"model.ch_mult has {levels} levels, so the U-Net halves the image "
               f"{levels - 1} times: image_size must be divisible by {factor}"):
        resolutions = tuple(size // 2**i for i in range(levels))
        c.check(
            "model.attn_resolutions",
            lambda v: isinstance(v, (tuple, list)) and all(r in resolutions for r in v),
            f"must be a tuple of resolutions the U-Net reaches: {resolutions}",
        )


def _check_diffusion(c: _Checker) -> None:
    process_ok = c.one_of("diffusion.process", tuple(PROCESSES))
    c.one_of("diffusion.beta_schedule", BETA_SCHEDULES)
    c.integer("diffusion.num_timesteps", 1)
    start_ok = c.number("diffusion.linear_start", 0.0, 1.0, low_open=True)
    if c.number("diffusion.linear_end", 0.0, 1.0, low_open=True) and start_ok:
        start = c.get("diffusion.linear_start")
        c.check("diffusion.linear_end", lambda v: v > start,
                f"must be above diffusion.linear_start = {start!r}")
    c.one_of("diffusion.model_output", tuple(PARAMETERISATIONS))
    var_ok = c.one_of("diffusion.model_var_type", MODEL_VAR_TYPES)
    loss_ok = c.one_of("diffusion.loss_type", LOSS_TYPES)
    c.number("diffusion.hybrid_lambda", 0.0, math.inf)
    if c.one_of("diffusion.loss_weighting", tuple(WEIGHTINGS)) and loss_ok:
        c.check("diffusion.loss_weighting",
                lambda v: v == "none" or c.get("diffusion.loss_type") == "simple",
                f"a loss weighting reweights diffusion.loss_type 'simple' only, not "
                f"{c.get('diffusion.loss_type')!r} (the other losses carry their own weights)")
    c.number("diffusion.min_snr_gamma", 0.0, math.inf, low_open=True)
    c.number("diffusion.p2_gamma", 0.0, math.inf)
    c.number("diffusion.p2_k", 0.0, math.inf, low_open=True)
    c.number("diffusion.sigma_data", 0.0, math.inf, low_open=True)
    c.number("diffusion.p_mean", -math.inf, math.inf)
    c.number("diffusion.p_std", 0.0, math.inf, low_open=True)
    if c.number("diffusion.sigma_min", 0.0, math.inf, low_open=True) and \
            c.number("diffusion.sigma_max", 0.0, math.inf, low_open=True):
        c.check("diffusion.sigma_max", lambda v: v > c.get("diffusion.sigma_min"),
                f"must be > diffusion.sigma_min = {c.get('diffusion.sigma_min')}")
    c.number("diffusion.logit_mean", -math.inf, math.inf)
    c.number("diffusion.logit_std", 0.0, math.inf, low_open=True)
    c.number("diffusion.shift", 0.0, math.inf, low_open=True)
    if process_ok and not c.errors and c.get("model.name") != "classifier" \
            and make_process(c.config.diffusion).num_timesteps is None:
        process = c.get("diffusion.process")
        c.check("diffusion.loss_type", lambda v: v == "simple",
                f"the {process!r} process trains with loss_type 'simple' (the variational bound "
                "is a chain's: diffusion.process 'ddpm')")
        c.check("diffusion.model_var_type", lambda v: v not in LEARNED_VAR_TYPES,
                f"a learned variance belongs to a chain's steps (diffusion.process 'ddpm'), "
                f"not the {process!r} process")
    if var_ok and loss_ok and c.get("model.name") != "classifier":
        learned = c.get("diffusion.model_var_type") in LEARNED_VAR_TYPES
        if learned:
            c.check("diffusion.loss_type", lambda v: v in ("vlb", "hybrid"),
                    f"a learned variance (diffusion.model_var_type "
                    f"{c.get('diffusion.model_var_type')!r}) is trained only by the 'vlb' or "
                    "'hybrid' loss")
        else:
            c.check("diffusion.loss_type", lambda v: v != "hybrid",
                    "'hybrid' trains a learned variance; set diffusion.model_var_type to "
                    "'learned' or 'learned_range'")


def _check_training(c: _Checker, num_devices: int) -> None:
    if c.integer("training.batch_size", 1):
        c.check("training.batch_size", lambda v: v % num_devices == 0,
                f"must be divisible by the {num_devices} local devices")
    c.integer("training.num_steps", 1)
    c.integer("training.log_every", 1)
    c.integer("training.checkpoint_every", 1)
    c.integer("training.sample_every", 0)
    c.integer("training.keep_checkpoints", 1)
    c.number("training.ema_decay", 0.0, 1.0)
    if c.number("training.label_dropout", 0.0, 1.0):
        if c.get("model.class_cond") is not True and c.get("model.name") != "classifier":
            c.check("training.label_dropout", lambda v: v == 0.0,
                    "label dropout (classifier-free guidance) needs model.class_cond=True")
    c.boolean("training.skip_nonfinite")
    if c.integer("training.steps_per_call", 1):
        k = c.get("training.steps_per_call")
        for field in ("num_steps", "log_every", "checkpoint_every", "sample_every"):
            c.check(f"training.{field}", lambda v: not _is_int(v) or v % k == 0,
                    f"must be a multiple of training.steps_per_call = {k}")


def _check_optim(c: _Checker) -> None:
    c.one_of("optim.optimizer", OPTIMIZERS)
    c.number("optim.lr", 0.0, math.inf, low_open=True)
    c.integer("optim.warmup_steps", 0)
    c.number("optim.grad_clip", 0.0, math.inf)
    c.number("optim.b1", 0.0, 1.0)
    c.number("optim.b2", 0.0, 1.0)
    c.number("optim.eps", 0.0, math.inf, low_open=True)
    c.number("optim.weight_decay", 0.0, math.inf)


def _check_sampling(c: _Checker) -> None:
    method_ok = c.one_of("sampling.method", tuple(samplers.SAMPLERS))
    c.integer("sampling.num_steps", 1)  # the process's limits: the grid check below
    c.number("sampling.eta", 0.0, 1.0, high_open=False)
    c.integer("sampling.num_samples", 1)
    c.number("sampling.s_churn", 0.0, math.inf)
    if c.number("sampling.guidance_scale", 0.0, math.inf):
        if c.get("model.class_cond") is not True:
            c.check("sampling.guidance_scale", lambda v: v == 0.0,
                    "classifier-free guidance needs model.class_cond=True")
    c.check("sampling.sigmas", lambda v: v is None or c.get("sampling.method") == "consistency",
            "the levels of method 'consistency' (None for the others)")
    c.check("sampling.spacing", lambda v: v is None or v in SPACINGS,
            f"must be one of {SPACINGS} or None (the method's own)")
    if c.errors or not method_ok or c.get("model.name") == "classifier":
        return
    # The sampler's own checks of the grid and its options, against this config's process.
    try:
        samplers.check_grid(make_process(c.config.diffusion), c.get("sampling.method"),
                            c.get("sampling.num_steps"), **sampling_options(c.config))
    except ValueError as e:
        c.errors.append(f"config.sampling: {e}")


def _check_consistency(c: _Checker) -> None:
    if not c.one_of("consistency.method", CONSISTENCY_METHODS):
        return
    method = c.get("consistency.method")
    if method != "cd":
        c.check("distill.teacher", lambda v: v is None,
                f"only consistency.method 'cd' distils a teacher; this config's is {method!r}")
    if method == "none":
        c.check("diffusion.model_output", lambda v: v != "consistency",
                "a consistency model is trained by consistency.method 'cd', 'ct' or 'ict'")
        return
    c.check("diffusion.process", lambda v: v == "edm",
            f"consistency.method {method!r} trains on the 'edm' process (x = x0 + sigma n)")
    c.check("diffusion.model_output", lambda v: v == "consistency",
            f"consistency.method {method!r} trains the 'consistency' parameterisation")
    c.check("diffusion.sigma_min", lambda v: v == CONSISTENCY_SIGMA_MIN,
            f"a consistency model meets the identity at sigma_min = {CONSISTENCY_SIGMA_MIN}")
    c.check("model.name", lambda v: v != "classifier", "a classifier is not a consistency model")
    c.one_of("consistency.solver", tuple(ODE_STEPS))
    if c.one_of("consistency.distance", tuple(cm.DISTANCES)) and \
            c.get("consistency.distance") == "lpips":
        for field in ("lpips_heads", "lpips_vgg"):
            c.check(f"consistency.{field}", lambda v: isinstance(v, str) and os.path.isfile(v),
                    "distance 'lpips' needs the path of an existing weights file")
    c.integer("consistency.num_scales", 2)
    c.number("consistency.target_ema", 0.0, 1.0)
    if c.integer("consistency.start_scales", 1):
        low = c.get("consistency.start_scales")
        c.check("consistency.end_scales", lambda v: _is_int(v) and v >= low,
                f"must be an integer >= consistency.start_scales = {low}")
    c.number("consistency.start_ema", 0.0, 1.0, low_open=True)
    if c.check("consistency.curriculum_steps", lambda v: v is None or (_is_int(v) and v >= 1),
               "must be None (training.num_steps) or an integer >= 1") and method == "ict" \
            and not c.errors:
        try:
            cm.ict_num_scales(0, total_steps=c.get("consistency.curriculum_steps")
                              or c.get("training.num_steps"),
                              start_scales=c.get("consistency.start_scales"),
                              end_scales=c.get("consistency.end_scales"))
        except ValueError as e:
            c.fail("consistency.curriculum_steps", f"iCT's curriculum: {e}")
    c.number("consistency.p_mean", -math.inf, math.inf)
    c.number("consistency.p_std", 0.0, math.inf, low_open=True)
    c.check("consistency.huber_c", lambda v: v is None or (_is_number(v) and v > 0),
            "must be None (0.00054 sqrt(d), iCT Sec. 3.3) or a number > 0")
    if method == "cd":
        teacher = c.get("distill.teacher")
        if not isinstance(teacher, str):
            c.fail("distill.teacher", "consistency distillation ('cd') needs the workdir of a "
                   "trained model: --config.distill.teacher=<workdir>")
        else:
            from jaxdiff.distill import teacher_problem

            problem = teacher_problem(teacher, c.config)
            if problem:
                c.fail("distill.teacher", problem)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises one ValueError naming every invalid field of `config`; returns None when it is valid.

    `num_devices` (default: `jax.local_device_count()`) must divide the global batch size.
    """
    if num_devices is None:
        import jax

        num_devices = jax.local_device_count()
    c = _Checker(config)
    _check_keys(c, config)
    c.check("seed", _is_int, "must be an integer")
    c.boolean("distill.init_from_teacher")
    c.boolean("distributed")
    _check_data(c)
    _check_model(c)
    _check_diffusion(c)
    _check_training(c, num_devices)
    _check_optim(c)
    _check_sampling(c)
    _check_consistency(c)
    if not c.errors:
        # The network's own checks (GroupNorm widths, attention heads, ...), in the same list.
        try:
            create_model(config)
        except ValueError as e:
            c.errors.append(f"config.model: {e}")
    if c.errors:
        lines = "\n".join(f"  - {e}" for e in c.errors)
        raise ValueError(f"invalid config ({len(c.errors)} problem(s)):\n{lines}")
