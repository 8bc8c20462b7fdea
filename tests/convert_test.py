"""Tests for tf_iddpm.torch_checkpoint and tf_iddpm.convert (checkpoint import, CLI)."""

import io
import json
import os
import pickle
import subprocess
import sys
import types
import zipfile

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from tests import golden
from tf_iddpm import convert
from tf_iddpm import torch_checkpoint
from tf_iddpm import unet

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MAIN_ARGS = dict(
    in_channels=3,
    model_channels=32,
    out_channels=6,
    num_res_blocks=1,
    attention_resolutions=(2,),
    channel_mult=(1, 2),
    num_heads=2,
    use_scale_shift_norm=True,
)
VARIANT_ARGS = dict(
    in_channels=3,
    model_channels=32,
    out_channels=3,
    num_res_blocks=1,
    attention_resolutions=(1,),
    channel_mult=(1,),
    num_classes=10,
    num_heads=1,
    use_scale_shift_norm=False,
)

# The main fixture model as --config overrides of configs/base.py.
MAIN_CONFIG_FLAGS = [
    "--config.data.image_size=8",
    "--config.model.num_channels=32",
    "--config.model.num_res_blocks=1",
    "--config.model.channel_mult=1,2",
    "--config.model.attention_resolutions=4",
    "--config.model.num_heads=2",
]


# --- torch_checkpoint -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unet_weights", "unet_variant_weights"])
def test_torch_file_equals_npz_twin(name, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` would now fail
    from_pt = torch_checkpoint.load_state_dict(golden.path(f"{name}.pt"))
    from_npz = golden.load(name)
    assert list(from_pt) == list(from_npz.files)  # same keys, same (module) order
    for key in from_npz.files:
        assert from_pt[key].dtype == from_npz[key].dtype == np.float32, key
        np.testing.assert_array_equal(from_pt[key], from_npz[key], err_msg=key)


def _write_torch_zip(path, obj, storages, root="archive"):
    """Writes a torch.save-style zip: data.pkl referencing storages by persistent id.

    The pickle must name torch's globals; a stand-in ``torch`` module in sys.modules lets the
    standard pickler write them by reference without torch being installed.
    """
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        buffer = io.BytesIO()

        class Pickler(pickle.Pickler):
            def persistent_id(self, value):
                if isinstance(value, _FakeStorage):
                    return ("storage", value.storage_type, value.key, "cpu", value.numel)
                return None

        Pickler(buffer, protocol=2).dump(obj)
        archive.writestr(f"{root}/data.pkl", buffer.getvalue())
        archive.writestr(f"{root}/byteorder", "little")
        for key, raw in storages.items():
            archive.writestr(f"{root}/data/{key}", raw)


class _FakeStorage:
    def __init__(self, storage_type, key, numel):
        self.storage_type, self.key, self.numel = storage_type, key, numel


@pytest.fixture
def fake_torch(monkeypatch):
    """Stand-in torch / torch._utils modules exposing the globals a checkpoint pickle names."""
    torch_module = types.ModuleType("torch")
    utils_module = types.ModuleType("torch._utils")
    for name in ("FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage"):
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch_module, name, cls)

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only pickled by reference, never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils_module._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch_module._utils = utils_module
    monkeypatch.setitem(sys.modules, "torch", torch_module)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_module)
    return torch_module


class _Tensor:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, {})."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, {})

    def __reduce__(self):
        return (sys.modules["torch._utils"]._rebuild_tensor_v2, self.args)


def test_reader_handles_dtypes_strides_offsets_and_shared_storage(tmp_path, fake_torch):
    floats = np.arange(12, dtype=np.float32)
    halves = np.array([0.5, -2.0, 65504.0], np.float16)
    bf16_values = np.array([1.0, -3.5, 2.0**-10], np.float32)
    bf16_bits = (bf16_values.view(np.uint32) >> 16).astype(np.uint16)
    longs = np.array([7, -1, 2**40], np.int64)
    f_storage = _FakeStorage(fake_torch.FloatStorage, "0", 12)
    state = {
        "matrix": _Tensor(f_storage, 0, [3, 4], [4, 1]),
        "transposed": _Tensor(f_storage, 0, [4, 3], [1, 4]),  # shares storage, not contiguous
        "tail": _Tensor(f_storage, 10, [2], [1]),  # storage offset
        "scalar": _Tensor(f_storage, 5, [], []),
        "half": _Tensor(_FakeStorage(fake_torch.HalfStorage, "1", 3), 0, [3], [1]),
        "bf16": _Tensor(_FakeStorage(fake_torch.BFloat16Storage, "2", 3), 0, [3], [1]),
        "long": _Tensor(_FakeStorage(fake_torch.LongStorage, "3", 3), 0, [3], [1]),
    }
    path = tmp_path / "synthetic.pt"
    _write_torch_zip(
        path,
        state,
        {
            "0": floats.tobytes(),
            "1": halves.tobytes(),
            "2": bf16_bits.tobytes(),
            "3": longs.tobytes(),
        },
    )
    loaded = torch_checkpoint.load_state_dict(str(path))
    np.testing.assert_array_equal(loaded["matrix"], floats.reshape(3, 4))
    np.testing.assert_array_equal(loaded["transposed"], floats.reshape(3, 4).T)
    np.testing.assert_array_equal(loaded["tail"], [10.0, 11.0])
    assert loaded["scalar"].shape == () and loaded["scalar"] == 5.0
    assert loaded["half"].dtype == np.float16
    np.testing.assert_array_equal(loaded["half"], halves)
    assert loaded["bf16"].dtype == np.float32
    np.testing.assert_array_equal(loaded["bf16"], bf16_values)
    np.testing.assert_array_equal(loaded["long"], longs)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_reader_refuses_foreign_globals(tmp_path):
    path = tmp_path / "evil.pt"
    _write_torch_zip(path, {"x": _Exploit()}, {})
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        torch_checkpoint.load(str(path))


def test_reader_rejects_non_zip_and_non_state_dict(tmp_path):
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not a zip archive"):
        torch_checkpoint.load(str(legacy))
    not_a_dict = tmp_path / "list.pt"
    _write_torch_zip(not_a_dict, [1, 2], {})
    with pytest.raises(ValueError, match="expected a state_dict"):
        torch_checkpoint.load_state_dict(str(not_a_dict))


# --- assign_state_dict ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_converted_checkpoint_reproduces_reference_output(suffix):
    model = unet.UNetModel(**MAIN_ARGS)
    convert.assign_state_dict(model, convert.load_state_dict(golden.path("unet_weights" + suffix)))
    data = golden.load("unet_forward")
    output = model(golden.nhwc(data["x"]), data["timesteps"])
    # Measured: 1.7e-6.
    assert golden.max_rel_error(output, golden.nhwc(data["output"])) <= 1e-4


def test_weight_layouts():
    model = unet.UNetModel(**MAIN_ARGS)
    state = convert.load_state_dict(golden.path("unet_weights.npz"))
    convert.assign_state_dict(model, state)
    conv = state["input_blocks.3.0.in_layers.2.weight"]  # OIHW [64, 32, 3, 3]
    np.testing.assert_array_equal(
        model.input_blocks_3_0.in_conv.kernel.numpy()[1, 2, 5, 7], conv[7, 5, 1, 2]
    )
    linear = state["time_embed.0.weight"]  # [out, in]
    np.testing.assert_array_equal(model.time_embed_0.kernel.numpy(), linear.T)
    qkv = state["input_blocks.3.1.qkv.weight"]  # Conv1d [192, 64, 1]
    np.testing.assert_array_equal(model.input_blocks_3_1.qkv.kernel.numpy(), qkv[:, :, 0].T)
    np.testing.assert_array_equal(model.out_norm.gamma.numpy(), state["out.0.weight"])


def test_model_state_dict_round_trip():
    model = unet.UNetModel(**VARIANT_ARGS)
    reference = convert.load_state_dict(golden.path("unet_variant_weights.npz"))
    convert.assign_state_dict(model, reference)
    exported = convert.model_state_dict(model)
    assert list(exported) == list(reference)
    for key, value in reference.items():
        assert exported[key].shape == value.shape, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_assign_is_strict_and_lists_every_problem():
    model = unet.UNetModel(**MAIN_ARGS)
    before = [v.numpy() for v in model.variables]
    state = dict(convert.load_state_dict(golden.path("unet_weights.npz")))
    del state["middle_block.1.qkv.bias"]
    del state["out.2.weight"]
    state["label_emb.weight"] = np.zeros([10, 128], np.float32)
    state["input_blocks.1.0.in_layers.2.weight"] = np.zeros([32, 32, 1, 1], np.float32)
    with pytest.raises(ValueError) as error:
        convert.assign_state_dict(model, state)
    message = str(error.value)
    assert "2 missing, 1 unexpected, 1 mis-shaped" in message
    assert "missing keys: middle_block.1.qkv.bias, out.2.weight" in message
    assert "unexpected keys: label_emb.weight" in message
    assert "input_blocks.1.0.in_layers.2.weight: checkpoint (32, 32, 1, 1)" in message
    assert "model expects (3, 3, 32, 32)" in message
    for old, variable in zip(before, model.variables):  # nothing was assigned
        np.testing.assert_array_equal(variable.numpy(), old)


def test_variant_checkpoint_does_not_fit_main_model():
    with pytest.raises(ValueError, match="unexpected keys: label_emb.weight"):
        convert.assign_state_dict(
            unet.UNetModel(**MAIN_ARGS),
            convert.load_state_dict(golden.path("unet_variant_weights.pt")),
        )


# --- convert_checkpoint and the command line ------------------------------------------------------


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tf_iddpm.convert", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        timeout=300,
    )


@pytest.mark.slow
def test_command_line_writes_a_workdir(tmp_path):
    out = tmp_path / "imported"
    args = [
        "--checkpoint",
        golden.path("unet_weights.pt"),
        "--config",
        "configs/base.py",
        *MAIN_CONFIG_FLAGS,
        "--out",
        str(out),
    ]
    result = _run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["imported"]  # no temporary directory left behind

    config = ml_collections.ConfigDict(json.loads((out / "config.json").read_text()))
    assert config.data.image_size == 8 and config.model.channel_mult == "1,2"
    checkpoint = tf.train.latest_checkpoint(str(out / "checkpoints"))
    assert checkpoint == str(out / "checkpoints" / "ckpt-1")

    model = unet.UNetModel(**MAIN_ARGS)
    # assert_existing_objects_matched: every model variable restored (the manager's
    # save_counter is the only extra value in the file).
    tf.train.Checkpoint(model=model).read(checkpoint).assert_existing_objects_matched()
    data = golden.load("unet_forward")
    output = model(golden.nhwc(data["x"]), data["timesteps"])
    assert golden.max_rel_error(output, golden.nhwc(data["output"])) <= 1e-4

    again = _run_cli(*args)  # the output directory is now non-empty
    assert again.returncode != 0
    assert "refusing to overwrite" in again.stderr


def test_convert_checkpoint_rejects_mismatched_config(tmp_path):
    config = golden.fixture_model_config()
    config.data.class_cond = True  # the checkpoint is unconditional
    config.data.num_classes = 10
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="missing keys: label_emb.weight"):
        convert.convert_checkpoint(golden.path("unet_weights.npz"), config, str(out))
    assert not out.exists() and os.listdir(tmp_path) == []

    config.data.class_cond = False
    out.mkdir()  # an existing empty directory is fine
    path = convert.convert_checkpoint(golden.path("unet_weights.npz"), config, str(out))
    assert path == str(out / "checkpoints" / "ckpt-1")
    with pytest.raises(ValueError, match="not an empty directory"):
        convert.convert_checkpoint(golden.path("unet_weights.npz"), config, str(out))
