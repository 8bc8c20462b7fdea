"""Tests for tf_iddpm.unet_options: the rules on the UNet's hyper-parameters (no TensorFlow)."""

import os
import re
import subprocess
import sys

import pytest

from tf_iddpm import unet_options

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VALID = dict(
    image_size=32,
    num_channels=64,
    num_res_blocks=2,
    channel_mult="",
    attention_resolutions="16,8",
    num_heads=4,
    num_heads_upsample=-1,
    dropout=0.1,
)
CONFIG_NAMES = {"image_size": "data.image_size", "channel_mult": "model.channel_mult"}


def test_importing_loads_no_tensorflow_keras_or_numpy():
    code = (
        "import sys; import tf_iddpm.unet_options; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'numpy'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "value, expected",
    [("16,8", (16, 8)), (" 1, 2 ,2 ", (1, 2, 2)), ("", ()), ((16, 8), (16, 8)), ([], ())],
)
def test_parse_int_list(value, expected):
    assert unet_options.parse_int_list(value, name="x", example="1") == expected


@pytest.mark.parametrize("value", ["1,x", "1.5", (1, 2.5), (True,), 16, None])
def test_parse_int_list_rejects_non_integers(value):
    with pytest.raises(ValueError, match=r"^x=.*: expected comma-separated integers.*e\.g\. '1'"):
        unet_options.parse_int_list(value, name="x", example="1")


@pytest.mark.parametrize("image_size", sorted(unet_options.CHANNEL_MULT_BY_IMAGE_SIZE))
def test_default_channel_mult(image_size):
    expected = unet_options.CHANNEL_MULT_BY_IMAGE_SIZE[image_size]
    assert unet_options.resolve_channel_mult(image_size, "") == expected
    assert unet_options.resolve_channel_mult(image_size, None) == expected


def test_channel_mult_rules_and_names():
    assert unet_options.resolve_channel_mult(48, "1,2,2") == (1, 2, 2)
    assert unet_options.resolve_channel_mult(48, [1, 3]) == (1, 3)
    with pytest.raises(ValueError, match=r"^image_size=48 has no default .*set channel_mult"):
        unet_options.resolve_channel_mult(48, "")
    with pytest.raises(
        ValueError, match=r"^data\.image_size=48 has no default .*set model\.channel_mult"
    ):
        unet_options.resolve_channel_mult(48, "", names=CONFIG_NAMES)
    for bad in ("1,0", (), "1,-2"):
        with pytest.raises(ValueError, match="expected positive integers, one per resolution"):
            unet_options.resolve_channel_mult(32, bad)


def test_attention_downsample_rates():
    rates = unet_options.attention_downsample_rates
    assert rates(32, (1, 2, 2, 2), "16,8") == (2, 4)
    assert rates(32, (1, 2, 2, 2), (32, 4)) == (1, 8)
    for bad in ("2", "12", "0", "64"):  # not one of the resolutions 32, 16, 8, 4
        with pytest.raises(ValueError, match=f"{bad} is not a resolution of this UNet"):
            rates(32, (1, 2, 2, 2), bad)
    with pytest.raises(ValueError, match="expected at least one resolution"):
        rates(32, (1, 2, 2, 2), "")


def test_valid_options_resolve_to_the_levels():
    assert unet_options.option_errors(**VALID) == []
    levels = unet_options.resolve(**VALID)
    assert levels == unet_options.UNetLevels((1, 2, 2, 2), (2, 4))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(image_size=0), "image_size=0 must be a positive integer"),
        (
            dict(image_size=40, channel_mult="1,1,2,2,2", attention_resolutions="20"),
            r"image_size=40 is not divisible by 16, the total downsampling of channel_mult \(1, 1,",
        ),
        (dict(num_channels=48), "num_channels=48 is not divisible by the 32 groups of GroupNorm"),
        # The input convolution's num_channels outputs are normalised too, whatever channel_mult.
        (
            dict(num_channels=48, channel_mult="2,4", attention_resolutions="16"),
            "num_channels=48 is not divisible",
        ),
        (dict(num_channels=True), "num_channels=True must be a positive integer"),
        (dict(num_res_blocks=0), "num_res_blocks=0 must be a positive integer"),
        (dict(num_heads=0), "num_heads=0 must be a positive integer"),
        (dict(num_heads=3), "num_heads=3 must be >= 1 and divide every level's channel count"),
        (dict(num_heads_upsample=3), "num_heads_upsample=3 must be >= 1 and divide"),
        (dict(num_heads_upsample=0), "num_heads_upsample=0 must be -1 .* or a positive integer"),
        (dict(dropout=1.0), r"dropout=1.0 must lie in \[0, 1\)"),
        (dict(class_cond=True, num_classes=0), "class_cond=True needs num_classes >= 1, got 0"),
    ],
)
def test_option_errors(overrides, message):
    errors = unet_options.option_errors(**{**VALID, **overrides})
    assert len(errors) == 1 and re.search(message, errors[0]), errors
    with pytest.raises(ValueError, match=message):
        unet_options.resolve(**{**VALID, **overrides})


def test_num_heads_upsample_of_minus_one_is_checked_once_as_num_heads():
    errors = unet_options.option_errors(**{**VALID, "num_heads": 3})
    assert len(errors) == 1 and errors[0].startswith("num_heads=3")


def test_every_problem_is_listed_under_the_callers_names():
    bad = {**VALID, "image_size": 48, "num_res_blocks": 0, "dropout": -1.0}
    errors = unet_options.option_errors(
        **bad, names={"image_size": "data.image_size", "dropout": "model.dropout"}
    )
    assert [e.split("=")[0] for e in errors] == [
        "num_res_blocks",
        "model.dropout",
        "data.image_size",
    ]
    with pytest.raises(ValueError) as error:
        unet_options.resolve(**bad)
    assert str(error.value).startswith(
        "invalid UNet options:\n  - num_res_blocks=0 must be a positive integer\n  - dropout=-1.0"
    )
