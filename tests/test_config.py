"""Config validation: every bad field is named, with its value and what is allowed."""

import importlib
import json
import pathlib

import numpy as np
import pytest

from jaxdiff import checkpoint, objectives, samplers
from jaxdiff.config import (
    check_overrides,
    config_from_json,
    config_to_json,
    default_config,
    describe_fields,
    sampling_options,
    validate,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = tuple(sorted(p.stem for p in (ROOT / "experiments").glob("*.py")
                           if p.stem != "__init__"))
# What a distillation config is given on the command line: its teacher's config.
TEACHERS = {"digits_cd": "digits", "cifar_cd": "cifar_edm", "digits_scd": "digits_trigflow",
            "digits_ect": "digits_edm", "digits_pd": "digits_edm", "cifar_ect": "cifar_edm",
            "cifar_pd": "cifar_edm"}


def _experiment(name):
    return importlib.import_module(f"experiments.{name}").get_config()


def _fake_workdir(path, name):
    """A workdir holding experiment `name`'s config and a checkpoint (of a stand-in tree): all
    that validating a teacher reads."""
    return checkpoint.export(str(path), _experiment(name), {"w": np.zeros(1, np.float32)})


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {name: _fake_workdir(root / name, name) for name in set(TEACHERS.values())}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiments_are_valid(name, teachers, tmp_path):
    """Every experiment file, a distillation one with a teacher of its own shape (and the LPIPS
    weight files its distance reads) as its command line gives them."""
    config = _experiment(name)
    if name in TEACHERS:
        config.distill.teacher = teachers[TEACHERS[name]]
    if config.consistency.distance == "lpips":
        for field in ("lpips_heads", "lpips_vgg"):
            (tmp_path / field).write_bytes(b"")
            config.consistency[field] = str(tmp_path / field)
    validate(config, num_devices=2)


def test_every_experiment_file_is_checked():
    assert {"cifar", "digits", "digits_cd", "digits_ict", "cifar_cd", "cifar_ict",
            "cifar_edm", "digits_edm"} <= set(EXPERIMENTS)


def test_cifar_is_the_published_ddpm():
    c = _experiment("cifar")
    assert (c.diffusion.num_timesteps, c.diffusion.beta_schedule) == (1000, "linear")
    assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks) == (128, (1, 2, 2, 2), 2)
    assert tuple(c.model.attn_resolutions) == (16,) and c.model.dropout == 0.1
    assert (c.optim.lr, c.optim.warmup_steps, c.optim.grad_clip) == (2e-4, 5000, 1.0)
    assert (c.training.batch_size, c.training.num_steps, c.training.ema_decay) == (
        128,
        800_000,
        0.9999,
    )
    assert c.diffusion.model_var_type == "fixed_large" and c.data.random_flip


def _set(path, value):
    def mutate(config):
        *parents, leaf = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value

    return mutate


def _add(section, key, value):
    def mutate(config):
        node = config if section is None else config[section]
        with node.unlocked():
            node[key] = value

    return mutate


def _multi(*mutations):
    def mutate(config):
        for m in mutations:
            m(config)

    return mutate


BAD = [
    (_set("data.dataset", "imagenet"), "config.data.dataset = 'imagenet': must be one of"),
    (
        _set("training.batch_size", 127),
        "config.training.batch_size = 127: must be divisible by the 2 devices "
        "(training.mesh data x fsdp)",
    ),
    (
        _set("data.image_size", 30),
        "config.data.image_size = 30: model.ch_mult has 4 levels, so the U-Net halves the "
        "image 3 times: image_size must be divisible by 8",
    ),
    (_set("optim.optimizer", "sgd"), "config.optim.optimizer = 'sgd': must be one of ('adam',"),
    (_set("diffusion.loss_type", "l1"), "config.diffusion.loss_type = 'l1': must be one of"),
    (_set("diffusion.beta_schedule", "exp"), "config.diffusion.beta_schedule = 'exp'"),
    (_set("diffusion.model_output", "score"), "config.diffusion.model_output = 'score'"),
    (_set("diffusion.model_var_type", "big"), "config.diffusion.model_var_type = 'big'"),
    (_set("optim.lr", -1e-4), "config.optim.lr = -0.0001: must be a number in (0.0, inf)"),
    (_set("optim.lr", 0.0), "config.optim.lr = 0.0: must be a number in (0.0, inf)"),
    (_set("training.ema_decay", 1.0), "config.training.ema_decay = 1.0: must be a number in [0"),
    (_set("training.ema_decay", -0.5), "config.training.ema_decay = -0.5"),
    (_set("training.ema_halflife_kimg", 0.0),
     "config.training.ema_halflife_kimg = 0.0: must be None or a number > 0"),
    (_set("training.ema_rampup_ratio", 0.05),
     "config.training.ema_rampup_ratio = 0.05: ramps up training.ema_halflife_kimg, which is None"),
    (_add("training", "learning_rate", 1e-3), "config.training.learning_rate: unknown key"),
    (_add(None, "trainer", {}), "config.trainer: unknown key"),
    (_set("model.name", "transformer"), "config.model.name = 'transformer': must be one of"),
    (
        _set("data.channels", 1),
        "config.data.channels = 1: cifar10 has 3 (the image channels)",
    ),
    (
        _set("model.attn_resolutions", (12,)),
        "config.model.attn_resolutions = (12,): must be a tuple of resolutions the U-Net "
        "reaches: (32, 16, 8, 4)",
    ),
    (_set("model.ch_mult", ()), "config.model.ch_mult = (): must be a non-empty tuple"),
    (_set("model.dropout", 1.5), "config.model.dropout = 1.5: must be a number in [0.0, 1.0)"),
    (_set("model.dtype", "float16"), "config.model.dtype = 'float16': must be one of"),
    (
        _set("training.label_dropout", 0.1),
        "config.training.label_dropout = 0.1: label dropout (classifier-free guidance) needs "
        "model.class_cond=True",
    ),
    (
        _set("diffusion.loss_type", "hybrid"),
        "config.diffusion.loss_type = 'hybrid': 'hybrid' trains a learned variance",
    ),
    (
        _set("diffusion.model_var_type", "learned_range"),
        "config.diffusion.loss_type = 'simple': a learned variance (diffusion.model_var_type "
        "'learned_range') is trained only by",
    ),
    (
        _set("training.steps_per_call", 3),
        "config.training.num_steps = 800000: must be a multiple of training.steps_per_call = 3",
    ),
    (
        _set("sampling.num_steps", 2000),
        "config.sampling: num_steps must lie in [1, T=1000], got 2000",
    ),
    (_set("sampling.method", "eular"), "config.sampling.method = 'eular': must be one of"),
    (_set("sampling.spacing", "log"),
     "config.sampling.spacing = 'log': unknown spacing 'log'; expected one of"),
    (
        _set("sampling.guidance_scale", 3.0),
        "config.sampling.guidance_scale = 3.0: classifier-free guidance needs",
    ),
    (_set("training.batch_size", 0), "config.training.batch_size = 0: must be an integer >= 1"),
    (_set("training.log_every", 0), "config.training.log_every = 0: must be an integer >= 1"),
    (_set("optim.b2", 1.0), "config.optim.b2 = 1.0: must be a number in [0.0, 1.0)"),
    (_set("optim.warmup_steps", -1), "config.optim.warmup_steps = -1: must be an integer >= 0"),
    (
        _multi(_set("model.class_cond", True), _set("data.num_classes", 0)),
        "config.data.num_classes = 0: a class-conditional model",
    ),
    (
        _set("data.num_classes", 100),
        "config.data.num_classes = 100: cifar10 has 10 classes",
    ),
    (
        _set("model.name", "mlp"),
        "config.model.name = 'mlp': 'mlp' takes points, not cifar10 images",
    ),
    (_set("model.ch", 48), "config.model: channels [48] are not divisible by the 32 GroupNorm"),
    (_set("model.num_res_blocks", True), "config.model.num_res_blocks = True: must be an integer"),
    (_set("distributed", None), "config.distributed = None: must be True or False"),
]


@pytest.mark.parametrize(("mutate", "message"), BAD)
def test_bad_field_is_named(mutate, message):
    config = _experiment("cifar")
    mutate(config)
    with pytest.raises(ValueError) as info:
        validate(config, num_devices=2)
    assert message in str(info.value)


def test_toy2d_needs_the_mlp():
    config = _experiment("toy2d")
    config.model.name = "unet"
    with pytest.raises(ValueError, match="toy2d \\(points\\) needs model.name 'mlp'"):
        validate(config, num_devices=1)


def test_every_problem_is_listed_at_once():
    config = _experiment("cifar")
    config.optim.lr = -1.0
    config.data.dataset = "imagenet"
    config.training.ema_decay = 2.0
    with pytest.raises(ValueError) as info:
        validate(config, num_devices=1)
    text = str(info.value)
    assert "3 problem(s)" in text
    for field in ("optim.lr", "data.dataset", "training.ema_decay"):
        assert f"config.{field} = " in text


def test_missing_key_is_named():
    config = default_config()
    del config.optim["lr"]
    with pytest.raises(ValueError, match="config.optim.lr: missing"):
        validate(config, num_devices=1)


def test_json_round_trip_keeps_tuples():
    config = _experiment("cifar_improved")
    back = config_from_json(config_to_json(config))
    assert back.model.ch_mult == (1, 2, 2, 2) and back.model.attn_resolutions == (16, 8)
    assert json.loads(config_to_json(back)) == json.loads(config_to_json(config))
    validate(back, num_devices=1)


def test_unknown_override_is_one_line_naming_it():
    with pytest.raises(ValueError, match=r"^unknown config field config.training.nonexistent in "
                       r"'--config.training.nonexistent=1'; config.training has: batch_size, "):
        check_overrides(["--config.training.nonexistent=1"])
    with pytest.raises(ValueError, match=r"config.training.num_step .*did you mean "
                       r"config.training.num_steps\?$"):
        check_overrides(["--workdir", "w", "--config.training.num_step", "3"])
    with pytest.raises(ValueError, match=r"config.seed.x .*config.seed is a single value"):
        check_overrides(["--config.seed.x=1"])
    check_overrides(["--config", "experiments/toy2d.py", "--config.seed=1",
                                "--noconfig.training.skip_nonfinite"])


def test_describe_fields_lists_every_default():
    text = describe_fields()
    schema = default_config()
    for key, value in schema.items():
        if hasattr(value, "items"):
            for field, default in value.items():
                assert f"\n  {field} = {default!r}" in text.split(f"config.{key}:")[1]
        else:
            assert f"config.{key} = {value!r}" in text
    assert describe_fields("optim").splitlines()[:2] == ["config.optim:", "  b1 = 0.9"]
    with pytest.raises(ValueError, match="unknown config section 'optimizer'; the sections: "):
        describe_fields("optimizer")


# ---------------------------------------------------------------------------------------------
# Consistency models


def _invalid(config) -> str:
    with pytest.raises(ValueError) as info:
        validate(config, num_devices=2)
    return str(info.value)


def test_cd_without_a_teacher_is_named():
    assert ("config.distill.teacher = None: consistency distillation ('cd') needs the workdir of "
            "a trained model: --config.distill.teacher=<workdir>") in _invalid(
                _experiment("digits_cd"))


@pytest.mark.parametrize("name", ["digits", "digits_ict"])
def test_a_teacher_given_to_a_run_that_does_not_distil_is_refused(name, teachers):
    config = _experiment(name)
    config.distill.teacher = teachers["digits"]
    method = config.consistency.method
    assert (f"config.distill.teacher = {teachers['digits']!r}: only consistency.method 'cd', "
            f"'ect', 'pd' or 'scd' distils a teacher; this config's is {method!r}"
            ) in _invalid(config)


def test_a_teacher_of_another_shape_or_nowhere_is_named(teachers, tmp_path):
    config = _experiment("digits_cd")
    config.distill.teacher = teachers["cifar_edm"]
    assert "the teacher's examples have shape (32, 32, 3), this model's (8, 8, 1)" in _invalid(
        config)
    config.distill.teacher = str(tmp_path / "nowhere")
    assert "the teacher workdir does not load" in _invalid(config)
    config.distill.teacher = teachers["digits"]
    config.model.class_cond = False
    assert "the teacher is conditioned on 10 classes, this model on 0" in _invalid(config)


def test_a_teacher_of_another_network_is_named_when_the_student_starts_from_it(tmp_path):
    """distill.init_from_teacher copies the teacher's weights: every weight must fit, and the
    first that do not are named with both shapes; without it, only the example shape matters."""
    teacher = checkpoint.export(str(tmp_path / "digits"), _experiment("digits"),
                                {"w": np.zeros(1, np.float32)})
    config = _experiment("digits_cd")
    config.distill.teacher = teacher
    config.distill.init_from_teacher = True  # digits_cd.py starts from fresh weights
    config.model.ch = 64
    assert ("distill.init_from_teacher starts the student from the teacher's weights, but their "
            "networks differ in 144 weight(s) (teacher vs student): conv_in/bias: (32,) vs (64,);"
            " conv_in/kernel: (3, 3, 1, 32) vs (3, 3, 1, 64);") in _invalid(config)
    config.model.ch, config.model.num_res_blocks = 32, 2
    assert "down0_res1/conv1/bias: absent vs (32,)" in _invalid(config)
    config.distill.init_from_teacher = False
    validate(config, num_devices=2)


def test_consistency_needs_edm_and_its_parameterisation(teachers):
    config = _experiment("digits_cd")
    config.distill.teacher = teachers["digits"]
    config.diffusion.process = "ddpm"
    config.diffusion.model_output = "eps"
    text = _invalid(config)
    assert ("config.diffusion.process = 'ddpm': consistency.method 'cd' trains on the 'edm' "
            "process") in text
    assert ("config.diffusion.model_output = 'eps': consistency.method 'cd' trains the "
            "'consistency' parameterisation") in text
    config = _experiment("digits_edm")
    config.diffusion.model_output = "consistency"
    assert ("a consistency model is trained by consistency.method 'cd', 'ct', 'ict' or "
            "'ect'") in _invalid(config)


@pytest.mark.parametrize(("path", "value", "message"), [
    ("consistency.distance", "l3",
     "config.consistency.distance = 'l3': must be one of ('l2', 'l1', 'pseudo_huber', 'lpips')"),
    ("consistency.method", "cm", "config.consistency.method = 'cm': must be one of ('none', "),
    ("consistency.end_scales", 5, "must be an integer >= consistency.start_scales = 10"),
    ("consistency.lpips_heads", "/nowhere", None),
    ("diffusion.sigma_min", 0.01, "meets the identity at sigma_min = 0.002"),
    ("training.num_steps", 3, "iCT's curriculum: total_steps=3 is fewer than"),
    ("sampling.sigmas", (0.8, 80.0), "strictly decreasing"),
])
def test_bad_consistency_fields_are_named(path, value, message):
    config = _experiment("digits_ict")
    section, field = path.split(".")
    config[section][field] = value
    if message is None:  # LPIPS weights are checked where the distance reads them
        config.consistency.distance = "lpips"
        message = ("config.consistency.lpips_heads = '/nowhere': distance 'lpips' needs the path "
                   "of an existing weights file")
    assert message in _invalid(config)


def test_the_teachers_solver_is_checked_where_it_is_read(teachers):
    """`consistency.solver` belongs to CD (its teacher's ODE step); iCT does not read it."""
    config = _experiment("digits_cd")
    config.distill.teacher = teachers["digits"]
    config.consistency.solver = "rk4"
    assert "config.consistency.solver = 'rk4': must be one of" in _invalid(config)
    config = _experiment("digits_ict")
    config.consistency.solver = "rk4"
    validate(config, num_devices=2)


def test_an_older_workdirs_config_trains_a_diffusion_model():
    """A config.json written before consistency models existed reads as method 'none'."""
    saved = json.loads(config_to_json(_experiment("digits")))
    del saved["consistency"], saved["distill"]
    del saved["sampling"]["sigmas"]
    config = config_from_json(json.dumps(saved))
    assert config.consistency.method == "none" and config.distill.teacher is None
    validate(config, num_devices=2)


def test_every_consistency_method_has_an_objective():
    """Each method validation accepts is its paper's objective: plain diffusion and iCT (Sec.
    3.2, theta- = stopgrad(theta)) keep no target network; CD (CM Alg. 2) a fixed mu, the
    config's; CT (Alg. 3) mu(k) = exp(s0 ln mu0 / (N(k) - 1)), 0.9^2 = 0.81 at step 0 (s0 = 2,
    the CM code's form); sCT, sCD (sCM Alg. 1) and ECT (arXiv 2406.14548) keep none either;
    CD, sCD, ECT and PD read a teacher; CT and iCT follow a curriculum."""
    config = _experiment("digits_ict")
    config.consistency.target_ema, config.consistency.start_scales = 0.95, 2
    config.consistency.start_ema = 0.9
    methods = {m: o for m, o in objectives.OBJECTIVES.items() if o.method}
    rates = {m: o.target_rate and float(o.target_rate(config, 0)) for m, o in methods.items()}
    assert rates == pytest.approx({"none": None, "cd": 0.95, "ct": 0.81, "ict": None,
                                   "sct": None, "scd": None, "ect": None, "pd": None})
    assert [m for m, o in objectives.OBJECTIVES.items() if o.distils] == ["cd", "ect", "pd",
                                                                          "scd"]
    assert [m for m, o in objectives.OBJECTIVES.items() if o.curriculum] == ["ct", "ict"]


@pytest.mark.parametrize(("method", "field", "value", "message"), [
    ("heun", "eta", 0.5, "config.sampling.eta = 0.5: method 'heun' takes no eta (None here; "
                         "'ddim' or 'euler_ancestral' take it)"),
    ("heun", "sigmas", (80.0, 1.0), "config.sampling.sigmas = (80.0, 1.0): method 'heun' takes "
                                    "no sigmas (None here; 'ddim' or 'consistency' take it)"),
    ("ddim", "eta", 1.5, "config.sampling.eta = 1.5: eta must lie in [0, 1], got 1.5"),
    ("heun", "s_churn", -1.0, "config.sampling.s_churn = -1.0: s_churn must be a finite number"),
    ("euler", "rho", 0.0, "config.sampling.rho = 0.0: rho must be a finite number > 0"),
])
def test_a_sampler_owns_its_options(method, field, value, message):
    """Each method declares the `sampling.<option>` fields it takes; one it does not take is
    refused rather than ignored, and one it takes is checked by the method's own rule."""
    config = _experiment("digits")
    config.sampling.method = method
    config.sampling.num_steps = 10
    config.sampling[field] = value
    assert message in _invalid(config)


def test_every_sampler_option_is_a_field_whose_none_is_the_methods_default():
    config = _experiment("digits")
    for name, sampler in samplers.SAMPLERS.items():
        config.sampling.method = name
        assert all(config.sampling[o] is None for o in sampler.options)
    config.sampling.method = "ddim"
    config.sampling.eta = 0.3
    assert sampling_options(config) == {"eta": 0.3}


def test_an_older_workdirs_sampler_options_that_its_method_never_read_read_as_none():
    """Workdirs written before the methods declared their fields hold every option (eta = 1.0
    with method 'ddpm', which takes none): they load and validate; a taken option stays."""
    saved = json.loads(config_to_json(_experiment("digits")))
    saved["sampling"].update(method="heun", num_steps=18, eta=1.0, s_churn=0.5, sigmas=None)
    config = config_from_json(json.dumps(saved))
    assert config.sampling.eta is None and config.sampling.s_churn == 0.5
    validate(config, num_devices=2)
