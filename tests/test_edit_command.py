"""`python -m jaxdiff.edit`: every bad argument is one line, before the model is read or
anything is written; the named masks keep what their names say."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

import jaxdiff
from jaxdiff.edit import MASKS, TASKS, _parser, main
from jaxdiff.workdir import LOCK_FILE
from tests.test_editing import MIX, data, oracle_model
from tests.test_readme import commands, python_blocks, tiny_digits_workdir


@pytest.fixture
def paths(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    images = tmp_path / "digits.npz"
    np.savez(images, images=np.zeros((4, 8, 8, 1), np.float32))
    return str(workdir), str(images), str(tmp_path / "edits")


def _cases(workdir, images, output, tmp):
    (tmp / "afile").write_text("")
    (tmp / "bad.npz").write_text("not a zip")
    (tmp / "cut.npz").write_bytes(open(images, "rb").read()[:100])  # a truncated copy
    base = ["--workdir", workdir, "--input", images, "--output", output]
    return {
        "unknown task 'paint'": base + ["--task", "paint"],
        "unknown mask 'top'": base + ["--task", "inpaint", "--mask", "top"],
        "unknown operator 'blur'": base + ["--task", "restore", "--operator", "blur"],
        "unknown editing method 'x'": base + ["--task", "inpaint", "--method", "x"],
        "is not a file": ["--workdir", workdir, "--input", str(tmp / "none.npz"), "--output",
                          output, "--task", "inpaint"],
        "is not an .npz": ["--workdir", workdir, "--input", str(tmp / "bad.npz"), "--output",
                           output, "--task", "inpaint"],
        "is not an .npz file (File is not a zip": ["--workdir", workdir, "--input",
                                                   str(tmp / "cut.npz"), "--output", output,
                                                   "--task", "inpaint"],
        "is a file, not a directory": ["--workdir", workdir, "--input", images, "--output",
                                       str(tmp / "afile"), "--task", "inpaint"],
        "is not a directory": ["--workdir", str(tmp / "none"), "--input", images, "--output",
                               output, "--task", "inpaint"],
        "num_samples must be >= 1": base + ["--task", "inpaint", "--num_samples", "0"],
        "in use by another training run": ["--workdir", workdir, "--input", images, "--output",
                                           os.path.join(workdir, "edits"), "--task", "inpaint"],
    }


@pytest.mark.parametrize("match", [
    "unknown task 'paint'", "unknown mask 'top'", "unknown operator 'blur'",
    "unknown editing method 'x'", "is not a file", "is not an .npz",
    "is not an .npz file (File is not a zip",
    "is a file, not a directory", "is not a directory", "num_samples must be >= 1",
    "in use by another training run"])
def test_bad_arguments_exit_with_one_line_and_write_nothing(paths, tmp_path, match):
    workdir, images, output = paths
    with open(os.path.join(workdir, LOCK_FILE), "w") as f:
        f.write(f"{os.getpid() + 1} another-host\n")  # a live run on another machine
    argv = _cases(workdir, images, output, tmp_path)[match]
    before = sorted(os.listdir(tmp_path)) + sorted(os.listdir(workdir))
    with pytest.raises(SystemExit) as error:
        main(argv)
    message = str(error.value.code)
    assert message.startswith("jaxdiff.edit: ") and "\n" not in message
    assert match in message
    assert sorted(os.listdir(tmp_path)) + sorted(os.listdir(workdir)) == before


def test_named_masks_keep_what_they_say():
    shape = (8, 8, 1)
    lower = MASKS["lower_half"](shape)
    assert lower[:4].all() and not lower[4:].any()
    np.testing.assert_array_equal(MASKS["upper_half"](shape), 1 - lower)
    right = MASKS["right_half"](shape)
    assert right[:, :4].all() and not right[:, 4:].any()
    centre = MASKS["centre"](shape)
    assert centre.sum() == 64 - 16 and not centre[2:6, 2:6].any()


def test_jaxdiff_edit_is_sdedit_after_the_command_module_is_imported():
    """Importing the command rebinds the attribute `jaxdiff.edit` to its module, which calls
    `editing.edit`."""
    import jaxdiff.edit as command

    assert jaxdiff.edit is command
    guide = data(MIX, 2)
    np.testing.assert_array_equal(jaxdiff.edit(oracle_model(), jax.random.key(0), guide, 0.0),
                                  guide)


def _readme_edit_block() -> str:
    return next(b for b in python_blocks() if "jaxdiff.inpaint(" in b)


def test_the_readme_edit_command_names_real_tasks_masks_and_flags():
    (args,) = commands("edit")
    parsed = _parser().parse_args(args)
    assert parsed.task in TASKS and parsed.mask in MASKS


@pytest.mark.slow  # compiles the digits U-Net's five editing scans: 206 s on a busy 2-core VM
def test_the_readme_edit_example_runs_on_an_exported_digits_workdir(tmp_path):
    workdir = tiny_digits_workdir(str(tmp_path / "digits"))
    code = _readme_edit_block().replace('"runs/digits"', repr(str(workdir)))
    code = code.replace("num_steps=50", "num_steps=5").replace('method="ddim")',
                                                               'method="ddim", num_steps=5)')
    code = code.replace("num=8)", "num=8, num_steps=5)")
    scope: dict = {}
    exec(code, scope)
    x, mask = scope["x"], scope["mask"]
    np.testing.assert_array_equal(np.asarray(scope["filled"]) * mask, x * mask)
    np.testing.assert_allclose(np.asarray(scope["sharp"]).reshape(8, 4, 2, 4, 2, 1)
                               .mean(axis=(2, 4)), scope["low"], atol=1e-5)
    assert scope["edited"].shape == x.shape and scope["path"].shape == (4, 8, 8, 8, 1)
