"""PyTorch state dicts read without torch (jaxdiff.models.pth): what LPIPS's weights need."""

import os
import subprocess
import sys

import numpy as np
import pytest

from jaxdiff.models.pth import load_state_dict
from tests.test_train import ROOT

DATA = os.path.join(os.path.dirname(__file__), "data")
# tiny_state_{zip,legacy}.pth: one state dict written by torch 2.14.1's torch.save in its zip
# layout and in the layout before torch 1.6 (_use_new_zipfile_serialization=False): a conv
# weight, a transposed (non-contiguous) tensor, a row of a shared storage (an offset), the
# shared tensor itself, int64, float16, float64 and a 0-d tensor; tiny_state.npz: its .numpy().
LAYOUTS = ("zip", "legacy")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_both_layouts_read_as_torch_wrote_them(layout):
    want = dict(np.load(os.path.join(DATA, "tiny_state.npz")))
    got = load_state_dict(os.path.join(DATA, f"tiny_state_{layout}.pth"))
    assert list(got) == list(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array)


def test_read_where_torch_cannot_be_imported():
    """The CIFAR-10 CD recipe (distance lpips) on the documented install, which has no torch."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from jaxdiff.models.pth import load_state_dict\n"
            f"print(sorted(load_state_dict({os.path.join(DATA, 'tiny_state_legacy.pth')!r})))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "'conv.weight'" in result.stdout


def test_not_a_state_dict_is_named(tmp_path):
    import pickle

    path = tmp_path / "code.pth"
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C) + pickle.dumps(1001)
                     + pickle.dumps({}) + pickle.dumps(os.system))
    with pytest.raises(ValueError, match=r"code.pth is not a readable PyTorch state dict: a "
                                         r"state dict holds no (posix|nt).system"):
        load_state_dict(str(path))


@pytest.mark.parity
def test_lpips_weights_read_as_torch_reads_them(tmp_path):
    """The `lpips` package's heads (its legacy-layout vgg.pth) and a torchvision VGG-16 state
    dict saved by torch: equal to torch.load's."""
    torch = pytest.importorskip("torch")
    lpips = pytest.importorskip("lpips")
    torchvision = pytest.importorskip("torchvision")
    heads = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    vgg = str(tmp_path / "vgg16.pth")
    torch.save(torchvision.models.vgg16().state_dict(), vgg)
    for path in (heads, vgg):
        want = torch.load(path, map_location="cpu")
        got = load_state_dict(path)
        assert list(got) == list(want)
        for name, tensor in want.items():
            np.testing.assert_array_equal(got[name], tensor.numpy())
