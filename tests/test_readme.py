"""The README's Python examples run as written (the workdir path swapped for a tiny export)."""

import importlib
import re
import shlex
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import digits
from jaxdiff import checkpoint
from jaxdiff.models import create_model

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


MAKEFILE = README.with_name("Makefile")


def commands(module: str) -> list[list[str]]:
    """The arguments of every `python -m jaxdiff.<module>` in the README's shell blocks."""
    text = "\n".join(re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S))
    text = text.replace("\\\n", " ")  # continuation lines
    found = []
    for rest in re.findall(rf"python -m jaxdiff\.{module} ([^\n\"&]*)", text):
        found.append(shlex.split(rest.split("#")[0]))
    return found


def options(args: list[str]) -> dict[str, str]:
    """--name value and --name=value pairs."""
    pairs, i = {}, 0
    while i < len(args):
        name, _, value = args[i].removeprefix("--").partition("=")
        if not value:
            value, i = args[i + 1], i + 1
        pairs[name] = value
        i += 1
    return pairs


def test_the_make_targets_the_readme_names_are_the_makefiles():
    targets = set(re.findall(r"^([\w-]+):", MAKEFILE.read_text(), flags=re.M))
    named = set(re.findall(r"`?make ([\w-]+)", README.read_text()))
    assert named and named <= targets, named - targets


def test_make_demo_trains_the_workdir_the_sampling_example_loads():
    recipe = re.search(r"^demo:.*\n\t(.*)", MAKEFILE.read_text(), flags=re.M).group(1)
    demo = options(recipe.split("-m jaxdiff.train ")[1].split())
    loaded = re.search(r'jaxdiff\.load\("([^"]+)"\)', python_blocks()[0]).group(1)
    assert demo["workdir"] == loaded
    assert (README.parent / demo["config"]).exists()


def test_the_training_commands_name_real_configs_and_fields():
    runs = commands("train")
    assert len(runs) >= 5  # two plain, TPU pod, SLURM, any cluster
    for args in runs:
        given = options(args)
        assert set(given) - {"config", "workdir"} == {k for k in given if k.startswith("config.")}
        config = importlib.import_module(
            given["config"].removesuffix(".py").replace("/", ".")).get_config()
        for field in (k.removeprefix("config.") for k in given if k.startswith("config.")):
            node = config
            for part in field.split("."):
                assert part in node, f"{field} is not a field of {given['config']}"
                node = node[part]


def test_the_evaluation_commands_use_its_flags_metrics_and_methods():
    from absl import flags

    from jaxdiff import evaluate, samplers

    runs = commands("evaluate")
    assert len(runs) == 2
    for args in runs:
        given = options(args)
        assert set(given) <= set(flags.FLAGS), set(given) - set(flags.FLAGS)
        evaluate.check_metrics(given["metrics"].split(","))
        assert given.get("method", "ddim") in samplers.SAMPLERS


def test_the_conversion_command_parses(capsys):
    from jaxdiff import convert

    (args,) = commands("convert")
    with pytest.raises(SystemExit) as info:  # parsed; then the placeholder input is not there
        convert.main(args)
    assert str(info.value) == f"jaxdiff.convert: --input {options(args)['input']!r} does not exist"


def tiny_digits_workdir(path: str) -> str:
    """digits.py with a one-level U-Net, 20 steps and random weights (no `init` compiled),
    exported to `path`: what the README's examples load in place of `runs/digits`."""
    config = digits.get_config()
    config.model.ch_mult = (1,)
    config.model.attn_resolutions = ()
    config.diffusion.num_timesteps = 20
    config.sampling.num_steps = 5
    model = create_model(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                            jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: 0.05 * rng.standard_normal(s.shape, np.float32), shapes)
    return checkpoint.export(path, config, params)


@pytest.mark.slow  # compiles the digits U-Net's sampler: about 6 s
def test_sampling_example_runs_on_an_exported_digits_workdir(tmp_path):
    workdir = tiny_digits_workdir(str(tmp_path / "digits"))
    code = python_blocks()[0].replace('"runs/digits"', repr(str(workdir)))
    code = code.replace("num_steps=50", "num_steps=5")
    scope: dict = {}
    exec(code, scope)
    pixels = scope["pixels"]
    assert pixels.shape == (10, 8, 8, 1) and pixels.dtype == np.uint8
    assert np.abs(scope["images"]).max() <= 1.0


def test_mathematics_example_runs():
    scope: dict = {}
    exec(python_blocks()[1], scope)
    assert scope["xt"].shape == (4, 32, 32, 3)
    # The all-zero eps prediction has L_simple = E[eps^2] per example, near 1.
    assert np.allclose(scope["out"]["loss"], 1.0, atol=0.1)


def test_every_program_the_readme_runs_is_installed_by_a_command_it_gives():
    """Each `pip install -e '.[extra]'` names an extra of pyproject.toml, and a program the
    README runs that no core dependency provides (tensorboard) comes after the install of an
    extra that lists it."""
    import tomllib

    project = tomllib.loads(README.with_name("pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    text = "\n".join(re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S))
    installed = re.findall(r"pip install -e '\.\[([\w,-]+)\]'", text)
    for names in installed:
        assert set(names.split(",")) <= set(extras), names
    for program in ("tensorboard",):
        assert re.search(rf"^{program} ", text, flags=re.M)
        assert not any(d.startswith(f"{program}>") for d in project["dependencies"])
        assert any(program in " ".join(d for n in names.split(",") for d in extras[n])
                   and text.index(f"'.[{names}]'") < text.index(f"\n{program} ")
                   for names in installed), program
