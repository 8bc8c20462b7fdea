"""Reads PyTorch ``torch.save`` files (.pt) into numpy arrays without importing torch.

Since torch 1.6 ``torch.save`` writes a zip archive::

    <root>/data.pkl          pickle of the saved object; tensors appear as calls to
                             torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
                             whose storage is a persistent id
                             ("storage", <torch.FloatStorage ...>, key, location, numel)
    <root>/data/<key>        raw little-endian bytes of each storage
    <root>/byteorder         "little" or "big" (absent in old files: little)

The unpickler below resolves only the handful of globals such a file needs (tensor rebuild
functions, storage types, ``collections.OrderedDict``) and refuses every other global, so
loading a checkpoint cannot execute arbitrary code.  The legacy pre-1.6 (non-zip) format is not
supported.
"""

import collections
import pickle
import zipfile

import numpy as np

# torch storage class name -> numpy dtype of its elements.  bfloat16 has no numpy dtype; it is
# read as uint16 and widened to float32 (exact) in _bfloat16_bits_to_float32.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    """Stand-in for a ``torch.<X>Storage`` class found in the pickle."""

    def __init__(self, name):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A flat storage read from the archive (numpy array) plus its torch type name."""

    def __init__(self, array, type_name):
        self.array = array
        self.type_name = type_name


def _bfloat16_bits_to_float32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args):
    """numpy equivalent of torch._utils._rebuild_tensor_v2 (and v1): a strided view, copied."""
    array = storage.array
    size = tuple(int(s) for s in size)
    itemsize = array.dtype.itemsize
    if size:
        view = np.lib.stride_tricks.as_strided(
            array[storage_offset:],
            shape=size,
            strides=tuple(int(s) * itemsize for s in stride),
            writeable=False,
        )
    else:
        view = array[storage_offset : storage_offset + 1].reshape(())
    tensor = np.array(view, copy=True)
    if storage.type_name == "BFloat16Storage":
        tensor = _bfloat16_bits_to_float32(tensor)
    return tensor


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused_args):
    """torch._utils._rebuild_parameter: an nn.Parameter is just its data here."""
    del requires_grad, backward_hooks
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles data.pkl of a torch zip archive, tensors becoming numpy arrays."""

    def __init__(self, file, archive, root, byteorder):
        super().__init__(file)
        self._archive = archive
        self._root = root
        self._byteorder = byteorder
        self._storages = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name} from a torch checkpoint; only tensors, "
            f"storages and (Ordered)dicts of them are supported"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, unused_location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        if key not in self._storages:
            raw = self._archive.read(f"{self._root}data/{key}")
            dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            array = np.frombuffer(raw, dtype=dtype, count=int(numel))
            self._storages[key] = _Storage(
                array.astype(storage_type.dtype, copy=False), storage_type.name
            )
        return self._storages[key]


def load(path):
    """Loads a ``torch.save`` zip archive with every tensor converted to a numpy array.

    Args:
      path: a ``.pt`` / ``.pth`` file written by torch >= 1.6.

    Returns:
      The saved object (for a state_dict: an OrderedDict from key to np.ndarray, float32 for
      float32 tensors, float32 for bfloat16 ones).

    Raises:
      ValueError: the file is not a torch zip archive.
      pickle.UnpicklingError: the pickle references something other than tensors/dicts.
    """
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a zip archive; only the torch>=1.6 torch.save format is supported "
            f"(re-save legacy checkpoints with a recent torch, or convert them to .npz)"
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the archive, found {pickles}")
        root = pickles[0][: -len("data.pkl")]  # "<archive name>/" (or "" for a flat archive)
        byteorder = "little"
        byteorder_name = f"{root}byteorder"
        if byteorder_name in archive.namelist():
            byteorder = archive.read(byteorder_name).decode().strip()
        with archive.open(pickles[0]) as pickle_file:
            return _TorchUnpickler(pickle_file, archive, root, byteorder).load()


def load_state_dict(path):
    """Loads a torch state_dict file as a plain dict ``{key: np.ndarray}``.

    Raises:
      ValueError: the object in the file is not a flat mapping of names to tensors.
    """
    obj = load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state_dict (a mapping), found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, np.ndarray))]
    if bad:
        raise ValueError(f"{path}: not a flat state_dict of tensors; offending keys: {bad[:10]}")
    return dict(obj)
