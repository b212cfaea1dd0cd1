"""Contract tests of every registry whose entries own config settings (`jaxdiff.config.CHOICES`),
parametrised over the entries: a new entry is tested the moment it is registered.

For each entry: the fields it declares are in `default_config` with its defaults; validation
accepts a config that selects it; and every function that takes a name refuses an unknown one.
"""

import importlib
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdiff import (
    checkpoint,
    data,
    diffusion,
    losses,
    models,
    objectives,
    optimizers,
    parameterisations,
    processes,
    samplers,
)
from jaxdiff import consistency as cm
from jaxdiff.config import CHOICES, default_config, sampling_options, validate
from jaxdiff.registry import value

ENTRIES = [(choice.key, name) for choice in CHOICES for name in choice.registry]
CHOICE = {choice.key: choice for choice in CHOICES}


def _experiment(name):
    return importlib.import_module(f"experiments.{name}").get_config()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A workdir holding the digits config and a stand-in checkpoint: what CD's check reads."""
    path = tmp_path_factory.mktemp("teacher") / "digits"
    return checkpoint.export(str(path), _experiment("digits"), {"w": np.zeros(1, np.float32)})


def _dataset(config, name):
    source = data.DATASETS[name]
    if source.points:
        return _experiment("toy2d")
    config.data.dataset = name
    config.data.channels = source.channels
    config.data.image_size = 8 if name == "digits" else 16
    config.data.num_classes = source.classes(config.data)
    config.data.random_flip = False
    config.model.attn_resolutions = (config.data.image_size // 2,)
    if not config.data.num_classes:  # unlabelled: no classifier-free guidance
        config.model.class_cond = False
        config.training.label_dropout = config.sampling.guidance_scale = 0.0
    return config


# What a config that selects an entry sets besides its name (the base is the digits DDPM).
SELECTING = {
    ("model.name", "mlp"): lambda config, teacher: _experiment("toy2d"),
    ("model.name", "classifier"): lambda config, teacher: _experiment("digits_classifier"),
    ("diffusion.process", "edm"): lambda config, teacher: _experiment("digits_edm"),
    ("diffusion.process", "flow_matching"): lambda config, teacher: _experiment("digits_fm"),
    ("diffusion.model_output", "consistency"): lambda config, teacher: _experiment("digits_ict"),
    ("diffusion.model_var_type", "learned"): lambda config, teacher: _set(
        config, model_var_type="learned", loss_type="hybrid"),
    ("diffusion.model_var_type", "learned_range"): lambda config, teacher: _set(
        config, model_var_type="learned_range", loss_type="hybrid"),
    ("diffusion.loss_type", "hybrid"): lambda config, teacher: _set(
        config, model_var_type="learned_range", loss_type="hybrid"),
    ("consistency.method", "ict"): lambda config, teacher: _experiment("digits_ict"),
    ("consistency.method", "ct"): lambda config, teacher: _method(_experiment("digits_ict"),
                                                                  "ct"),
    ("consistency.method", "cd"): lambda config, teacher: _teacher(_experiment("digits_cd"),
                                                                   teacher),
    ("sampling.method", "consistency"): lambda config, teacher: _experiment("digits_ict"),
    ("diffusion.process", "trigflow"): lambda config, teacher: _experiment("digits_sct"),
    ("diffusion.model_output", "trigflow_consistency"): lambda config, teacher:
        _experiment("digits_sct"),
    ("consistency.method", "sct"): lambda config, teacher: _experiment("digits_sct"),
    ("consistency.method", "scd"): lambda config, teacher: _teacher(_experiment("digits_scd"),
                                                                    teacher),
    ("consistency.method", "ect"): lambda config, teacher: _teacher(
        _experiment("digits_ect"), _edm_teacher(teacher)),
    ("consistency.method", "pd"): lambda config, teacher: _teacher(
        _experiment("digits_pd"), _edm_teacher(teacher)),
}


def _edm_teacher(teacher):
    """A digits_edm.py workdir beside `teacher` (ECT and PD start from an EDM model's weights)."""
    path = os.path.join(os.path.dirname(teacher), "digits_edm")
    if not os.path.exists(path):
        checkpoint.export(path, _experiment("digits_edm"), {"w": np.zeros(1, np.float32)})
    return path


def _set(config, **diffusion_fields):
    for field, v in diffusion_fields.items():
        config.diffusion[field] = v
    return config


def _method(config, name):
    config.consistency.method = name
    return config


def _teacher(config, teacher):
    config.distill.teacher = teacher
    return config


def _selecting(key, name, teacher):
    """A valid config whose `key` selects entry `name`."""
    config = _experiment("digits")
    if key == "data.dataset":
        config = _dataset(config, name)
    elif (key, name) in SELECTING:
        config = SELECTING[(key, name)](config, teacher)
    else:
        section, field = key.split(".")
        config[section][field] = name
    return config


@pytest.mark.parametrize(("key", "name"), ENTRIES)
def test_an_entrys_fields_are_in_the_default_config_with_its_defaults(key, name):
    schema = default_config()
    for path, default in CHOICE[key].registry[name].fields.items():
        if isinstance(default, ml_collections.FieldReference):
            default = default.get()
        assert value(schema, path) == default, path
        assert type(value(schema, path)) is type(default), path


@pytest.mark.parametrize(("key", "name"), ENTRIES)
def test_validation_accepts_a_config_selecting_each_entry(key, name, teacher):
    if not CHOICE[key].accepts(CHOICE[key].registry[name]):  # selected by its network instead
        key, name = "model.name", next(k for k, v in models.NETWORKS.items()
                                       if v.objective == name)
    config = _selecting(key, name, teacher)
    selected = CHOICE["consistency.method"].selected(config) if key == "consistency.method" \
        else value(config, key)
    assert selected == name
    validate(config, num_devices=1)


def test_every_choice_has_a_default_entry_and_every_field_one_default():
    schema = default_config()
    for choice in CHOICES:
        assert value(schema, choice.key) == choice.default
        assert choice.default in choice.names()


def _unknown(section, field):
    config = _experiment("digits")
    config[section][field] = "nonexistent"
    return config


# Every function that takes a registry's name, called with an unknown one.
_X = np.zeros((2, 4), np.float32)
_T = np.zeros((2,), np.int32)
_DDPM = processes.make_process(default_config().diffusion)
TAKERS = {
    "data.dataset": [lambda: data.get_dataset("nonexistent"),
                     lambda: data.create_dataset(_unknown("data", "dataset"))],
    "model.name": [lambda: models.get_network("nonexistent"),
                   lambda: models.create_model(_unknown("model", "name")),
                   lambda: models.label_classes(_unknown("model", "name"))],
    "diffusion.process": [lambda: processes.get("nonexistent"),
                          lambda: processes.make_process(_unknown("diffusion", "process")
                                                         .diffusion)],
    "diffusion.model_output": [
        lambda: parameterisations.get("nonexistent"),
        lambda: diffusion.p_mean_variance(_DDPM, _X, _X, _T, model_output_type="nonexistent")],
    "diffusion.model_var_type": [
        lambda: diffusion.check_model_var_type("nonexistent"),
        lambda: diffusion.p_variance(_DDPM, _T, None, "nonexistent", 2),
        lambda: diffusion.split_model_output(_X, "nonexistent")],
    "diffusion.loss_type": [
        lambda: losses.get_loss_type("nonexistent"),
        lambda: losses.training_losses(_DDPM, lambda x, t: x, _X, jax.random.key(0),
                                       loss_type="nonexistent")],
    "diffusion.loss_weighting": [
        lambda: losses.get_weighting("nonexistent"),
        lambda: losses.weighting_params(_unknown("diffusion", "loss_weighting")),
        lambda: losses.training_losses(_DDPM, lambda x, t: x, _X, jax.random.key(0),
                                       weighting="nonexistent")],
    "optim.optimizer": [lambda: optimizers.create_optimizer(_unknown("optim", "optimizer"))],
    "sampling.method": [lambda: samplers.get("nonexistent"),
                        lambda: sampling_options(_unknown("sampling", "method"))],
    "consistency.method": [lambda: objectives.get("nonexistent"),
                           lambda: objectives.of_config(_unknown("consistency", "method"))],
}


def test_every_registry_has_its_takers():
    assert set(TAKERS) == set(CHOICE)


@pytest.mark.parametrize(("key", "index"),
                         [(k, i) for k, fns in TAKERS.items() for i in range(len(fns))])
def test_an_unknown_name_is_refused_by_every_function_that_takes_one(key, index):
    with pytest.raises(ValueError, match="unknown .*'nonexistent'; expected one of|"
                                         "'nonexistent': must be one of"):
        TAKERS[key][index]()


@pytest.mark.parametrize("key", list(CHOICE))
def test_validation_refuses_an_unknown_name(key):
    section, field = key.split(".")
    with pytest.raises(ValueError, match=f"config.{key} = 'nonexistent': must be one of"):
        validate(_unknown(section, field), num_devices=1)


# Combinations that mean nothing: refused with a message naming both.
@pytest.mark.parametrize(("experiment", "fields", "message"), [
    ("digits_edm", {"diffusion.loss_type": "vlb"},
     "config.diffusion.loss_type = 'vlb': 'vlb' is a term of the chain's bound, which needs a "
     "process with steps (diffusion.process 'ddpm'); a continuous process trains with loss_type "
     "'simple'"),
    ("digits_fm", {"diffusion.model_var_type": "learned"},
     "config.diffusion.model_var_type = 'learned': a learned variance belongs to a chain's "
     "steps (diffusion.process 'ddpm')"),
    ("digits", {"diffusion.loss_type": "vlb", "diffusion.loss_weighting": "min_snr"},
     "config.diffusion.loss_weighting = 'min_snr': a loss weighting reweights "
     "diffusion.loss_type 'simple' only, not 'vlb' (it carries its own weights)"),
    ("digits_ict", {"diffusion.process": "flow_matching"},
     "config.diffusion.process = 'flow_matching': consistency.method 'ict' trains on the 'edm' "
     "process"),
    ("digits_classifier", {"consistency.method": "ict"},
     "config.consistency.method = 'ict': model.name 'classifier' trains by its own objective "
     "('classifier'), not as a consistency model"),
    ("digits_sct", {"model.adaptive_double_norm": True},
     "config.model.adaptive_double_norm = True: sCM's adaptive double normalisation normalises "
     "AdaGN's scale and shift: it needs model.use_scale_shift_norm=True"),
    ("toy2d", {"data.dataset": "digits", "data.channels": 1, "data.image_size": 8,
               "data.random_flip": False, "data.num_classes": 10},
     "config.model.name = 'mlp': 'mlp' takes points, not digits images; use 'unet', "
     "'classifier' or 'dit'"),
])
def test_a_combination_that_means_nothing_is_refused(experiment, fields, message):
    config = _experiment(experiment)
    for path, v in fields.items():
        section, field = path.split(".")
        config[section][field] = v
    with pytest.raises(ValueError) as info:
        validate(config, num_devices=1)
    assert message in str(info.value)


def _accepted_diffusion_combinations():
    """Every process x parameterisation x variance type x loss type x weighting that validation
    accepts for the digits network (fixed_small and learned_range stand for the variance types)."""
    accepted, bases = [], {"ddpm": "digits", "edm": "digits_edm", "flow_matching": "digits_fm"}
    for process in processes.PROCESSES:
        base = _experiment(bases.get(process, "digits"))
        base.diffusion.process = process
        for out in parameterisations.PARAMETERISATIONS:
            for var in ("fixed_small", "learned_range"):
                for loss in losses.LOSS_TYPES:
                    for weighting in losses.WEIGHTINGS:
                        config = ml_collections.ConfigDict(base.to_dict())
                        config.diffusion.update(model_output=out, model_var_type=var,
                                                loss_type=loss, loss_weighting=weighting)
                        try:
                            validate(config, num_devices=1)
                        except ValueError:
                            continue
                        accepted.append((process, out, var, loss, weighting, config))
    return accepted


def test_every_accepted_combination_trains_on_a_finite_non_zero_loss():
    """A model whose output misses its target by a known amount: every combination validation
    accepts gives it a finite loss > 0 (the zero loss of a combination that cannot be expressed
    is refused instead), and the refused ones are the consistency parameterisation's."""
    accepted = _accepted_diffusion_combinations()
    assert {c[:2] for c in accepted} >= {(p, o) for p in processes.PROCESSES
                                         for o in parameterisations.PARAMETERISATIONS
                                         if parameterisations.PARAMETERISATIONS[o].denoises}
    x0 = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    for process, out, var, loss, weighting, config in accepted:
        d = config.diffusion
        channels = 2 if diffusion.check_model_var_type(var).learned else 1
        terms = losses.training_losses(
            processes.make_process(d), lambda x, t, c=channels: jnp.full(x.shape[:-1] + (c,), 0.3),
            x0, jax.random.key(1), loss_type=loss, model_output_type=out, model_var_type=var,
            hybrid_lambda=d.hybrid_lambda, weighting=weighting,
            weighting_params=losses.weighting_params(config), sigma_data=d.sigma_data)
        value_ = np.asarray(terms["loss"])
        assert np.all(np.isfinite(value_)) and np.all(value_ > 0), (process, out, var, loss,
                                                                     weighting)


@pytest.mark.parametrize("name", list(cm.DISTANCES))
def test_each_consistency_distance_owns_its_fields_and_is_accepted(name, tmp_path):
    """`consistency.distance` is chosen inside the consistency objectives: each distance's
    fields are in default_config with its defaults, and a CT config selecting it validates."""
    schema = default_config()
    for path, default in cm.DISTANCES[name].fields.items():
        assert value(schema, path) == default.get()
    config = _method(_experiment("digits_ict"), "ct")
    config.consistency.distance = name
    for path in cm.DISTANCES[name].fields:  # LPIPS's weight files: their existence is checked
        if path.startswith("consistency.lpips_"):
            (tmp_path / path).write_bytes(b"")
            config.consistency[path.split(".")[1]] = str(tmp_path / path)
    validate(config, num_devices=1)
    with pytest.raises(ValueError, match="unknown consistency distance 'nonexistent'"):
        cm.get_distance("nonexistent")
