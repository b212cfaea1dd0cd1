"""The README's Python examples run as written (the workdir path swapped for a tiny export)."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import digits
from jaxdiff import checkpoint
from jaxdiff.models import create_model

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_two_examples():
    blocks = python_blocks()
    assert len(blocks) == 2
    assert 'jaxdiff.load("runs/digits")' in blocks[0]


def test_sampling_example_runs_on_an_exported_digits_workdir(tmp_path):
    config = digits.get_config()
    config.model.ch_mult = (1,)
    config.model.attn_resolutions = ()
    config.diffusion.num_timesteps = 20
    config.sampling.num_steps = 5
    model = create_model(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                            jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32))["params"]
    rng = np.random.default_rng(0)  # random weights without compiling `init`
    params = jax.tree.map(lambda s: 0.05 * rng.standard_normal(s.shape, np.float32), shapes)
    workdir = checkpoint.export(str(tmp_path / "digits"), config, params)
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
