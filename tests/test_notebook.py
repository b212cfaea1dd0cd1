"""experiments/colab_tpu.ipynb: committed without outputs, and run end to end on the CPU.

`SMOKE=1` makes the notebook its own test (tiny U-Net, mocked CIFAR-10, stand-ins for its two
downloads); nbclient runs it in a fresh ipykernel in a temporary directory, as Colab would run it.
"""

import json
import math
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "colab_tpu.ipynb"

# Appended to the notebook run: saves what the test checks from the kernel's variables, and
# compares the published-weights stand-in with what came back through safetensors and the
# converter (a wrong transpose keeps every shape of a square kernel, not its values).
PROBE = """
import json

import jax
import numpy as np

np.save("probe_images.npy", np.asarray(images))
np.save("probe_ddpm_images.npy", np.asarray(ddpm_images))
round_trip = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                          stand_in_params, ddpm.params)
with open("probe.json", "w") as f:
    json.dump({"round_trip_error": max(jax.tree.leaves(round_trip))}, f)
"""


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=nbformat.NO_CONVERT)


def test_committed_notebook_is_valid_and_has_no_outputs():
    notebook = read_notebook()
    nbformat.validate(notebook)
    assert notebook.nbformat == 4
    dirty = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"
             and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"cells {dirty} hold outputs or execution counts: clear them to commit"


@pytest.mark.slow  # compiles cifar.py (tiny) and two samplers: about 60 s on 2 shared CPU cores
def test_smoke_run_trains_samples_scores_and_converts(tmp_path, monkeypatch):
    notebook = read_notebook()
    notebook.cells.append(nbformat.v4.new_code_cell(PROBE))
    monkeypatch.setenv("SMOKE", "1")
    monkeypatch.setenv("JAXDIFF_REPO", str(ROOT))
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    for name in ("probe_images.npy", "probe_ddpm_images.npy"):
        images = np.load(tmp_path / name)
        assert images.shape == (8, 32, 32, 3), name
        assert np.isfinite(images).all() and np.abs(images).max() <= 1.0, name
        assert images.std() > 0, name
    # The notebook's grids: 8 tiles of 32 pixels with borders in a row; training's: 4 by 2.
    for name, size in [("samples_ddim.png", (265, 34)), ("samples_ddpm_cifar10.png", (265, 34)),
                       ("runs/cifar10/samples/step_0000002.png", (133, 67)),
                       ("runs/cifar10/samples/step_0000003.png", (133, 67))]:
        with Image.open(tmp_path / name) as image:
            assert image.size == size, name

    metrics = [json.loads(line) for line in (tmp_path / "runs/cifar10/metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == [2, 3] and all(math.isfinite(m["loss"]) for m in metrics)

    printed = "".join(output.get("text", "") for cell in notebook.cells
                      for output in cell.get("outputs", []))
    fid = re.search(r"^fid\s+(\S+)$", printed, flags=re.M)
    assert fid, f"no FID table in the notebook's output:\n{printed}"
    with open(tmp_path / "runs/cifar10/eval/metrics_3.json") as f:
        record = json.load(f)
    assert record["settings"]["feature_network"] == "random_projection"
    assert record["settings"]["num_samples"] == 32
    assert float(fid.group(1)) == round(record["metrics"]["fid"], 4) > 0

    with open(tmp_path / "runs/ddpm-cifar10/config.json") as f:
        converted = json.load(f)
    assert converted["model"]["ch"] == 32 and converted["model"]["ch_mult"] == [1, 2]
    with open(tmp_path / "probe.json") as f:
        assert json.load(f)["round_trip_error"] == 0.0
