"""PyTorch `.pth` state dicts read as NumPy arrays without torch.

`torch.save` writes one of two layouts (torch/serialization.py): since torch 1.6 a zip holding
`<name>/data.pkl` (the pickled dict, each storage a persistent id) and one file per storage under
`<name>/data/`; before it (the `lpips` package's heads, torchvision's VGG-16) five pickles in a
row (magic number, protocol, system info, the dict, the storage keys) followed by each storage's
element count (int64) and bytes. Only the classes a state dict needs are unpickled: anything else
is an error, never code run.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from typing import Any, BinaryIO

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_DTYPES = {"DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
           "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
           "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _Storage:
    """A typed storage; its bytes come with it (zip) or after the pickles (legacy)."""

    def __init__(self, dtype: type, data: bytes | None = None):
        self.dtype, self.data = np.dtype(dtype), data

    def array(self) -> np.ndarray:
        return np.frombuffer(self.data, self.dtype)


class _Tensor:
    """`torch._utils._rebuild_tensor_v2`'s arguments, made an array once the storage is read."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def array(self) -> np.ndarray:
        flat = self.storage.array()[self.offset:]
        item = flat.dtype.itemsize
        return np.lib.stride_tricks.as_strided(
            flat, self.size, tuple(s * item for s in self.stride)).copy()


def _parameter(tensor: _Tensor, *_: Any) -> _Tensor:
    return tensor


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, storage: Any):
        super().__init__(file)
        self._storage = storage

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _Tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _parameter
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        raise pickle.UnpicklingError(f"a state dict holds no {module}.{name}: not read")

    def persistent_load(self, pid: Any) -> Any:
        if pid[0] != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {pid[0]!r}")
        return self._storage(*pid[1:])


def _arrays(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _arrays(v) for k, v in tree.items()}
    return tree.array() if isinstance(tree, _Tensor) else tree


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if not pickles:
            raise ValueError(f"{path} is a zip without data.pkl: not a torch.save file")
        prefix = pickles[0][: -len("data.pkl")]

        def storage(dtype, key, location, numel):
            return _Storage(dtype, archive.read(f"{prefix}data/{key}"))

        return _arrays(_Unpickler(io.BytesIO(archive.read(pickles[0])), storage).load())


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        if pickle.load(f) != _LEGACY_MAGIC:
            raise ValueError(f"{path} is not a torch.save file (no magic number)")
        pickle.load(f)  # protocol version
        pickle.load(f)  # system info
        storages: dict[str, _Storage] = {}

        def storage(dtype, key, location, numel, view=None):
            if view is not None:
                raise ValueError(f"{path}: storage views (torch < 0.4) are not read")
            return storages.setdefault(key, _Storage(dtype))

        tree = _Unpickler(f, storage).load()
        for key in pickle.load(f):
            numel = int(np.frombuffer(f.read(8), "<i8")[0])
            s = storages[key]
            s.data = f.read(numel * s.dtype.itemsize)
        return _arrays(tree)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """The state dict `torch.save` wrote to `path`, as NumPy arrays (either layout)."""
    try:
        return _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    except (pickle.UnpicklingError, EOFError, KeyError, IndexError) as e:
        raise ValueError(f"{path} is not a readable PyTorch state dict: {e}") from e
