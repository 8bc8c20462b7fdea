"""The rules on the UNet's hyper-parameters, in one place and without TensorFlow.

A UNet is described by the reference's ``script_util`` options: ``image_size``, ``num_channels``,
``channel_mult`` ("" for the image size's default), ``attention_resolutions`` (pixel sizes such
as "16,8"), ``num_heads`` ... This module owns what those options may be and what they resolve
to: the default channel multipliers per image size, the per-level multipliers, the downsample rates
at which attention runs, and the constraints that the network imposes on them (the image size
divides by the total downsampling, GroupNorm's 32 groups divide every channel count, the heads
divide every level's channels).

Two callers apply the same rules and so give the same messages: ``factory.create_model`` (which
raises before it builds anything) and ``config_utils.validate_config`` (which lists every invalid
field of a config before a run starts).  Each message names the option as its caller knows it:
``names`` maps an option to that name, e.g. ``"channel_mult"`` to ``"model.channel_mult"`` for a
config; without it the option's own name (``create_model``'s argument) is used.

Only the standard library is imported: config validation, and with it ``run.py --help``, must not
load TensorFlow.
"""

import numbers
from typing import Any, List, Mapping, NamedTuple, Optional, Tuple

# The reference's normalization(): GroupNorm with 32 groups, so every channel count of the UNet
# (all multiples of num_channels) must divide by 32.
NORM_GROUPS = 32

# Class count of the reference's class-conditional ImageNet models (script_util.NUM_CLASSES).
DEFAULT_NUM_CLASSES = 1000

# Channel multipliers per image size when channel_mult is "".  32, 64 and 256 are
# improved-diffusion's script_util.create_model; 128 is not in improved-diffusion, the value is the
# one its successor (openai/guided-diffusion) uses for 128x128 models.
CHANNEL_MULT_BY_IMAGE_SIZE = {
    32: (1, 2, 2, 2),
    64: (1, 2, 3, 4),
    128: (1, 1, 2, 3, 4),
    256: (1, 1, 2, 2, 4, 4),
}


class UNetLevels(NamedTuple):
    """What the options resolve to: the UNet's per-level structure, as UNetModel takes it."""

    channel_mult: Tuple[int, ...]  # one multiplier per resolution level
    attention_downsample_rates: Tuple[int, ...]  # the levels (1, 2, 4, ...) that have attention


def _name(names: Optional[Mapping[str, str]], option: str) -> str:
    return (names or {}).get(option, option)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value >= 1


def parse_int_list(value: Any, *, name: str, example: str) -> Tuple[int, ...]:
    """Parses "16,8" (or a sequence of ints such as (16, 8)) into a tuple; "" gives ().

    Args:
      value: comma-separated integers, or a sequence of ints.
      name: what the value is called in the message.
      example: a valid value, shown in the message.

    Raises:
      ValueError: if an item is not an integer.
    """
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",") if item.strip()]
        try:
            return tuple(int(item) for item in items)
        except ValueError:
            pass
    else:
        try:
            items = list(value)
        except TypeError:
            items = None
        if items is not None and all(_is_int(item) for item in items):
            return tuple(int(item) for item in items)
    raise ValueError(
        f"{name}={value!r}: expected comma-separated integers (or a sequence of ints), "
        f"e.g. '{example}'"
    )


def resolve_channel_mult(
    image_size: int, channel_mult: Any, *, names: Optional[Mapping[str, str]] = None
) -> Tuple[int, ...]:
    """The per-level channel multipliers: ``channel_mult``, or the image size's default if "".

    Args:
      image_size: the training resolution; selects the default.
      channel_mult: "" (or None) for the default of :data:`CHANNEL_MULT_BY_IMAGE_SIZE`, else
        "1,2,2" or a sequence of positive ints.
      names: the option names for messages (see the module docstring).

    Raises:
      ValueError: if there is no default for ``image_size`` or a multiplier is not a positive int.
    """
    if channel_mult is None or (isinstance(channel_mult, str) and not channel_mult):
        if image_size not in CHANNEL_MULT_BY_IMAGE_SIZE:
            raise ValueError(
                f"{_name(names, 'image_size')}={image_size} has no default UNet channel_mult "
                f"(defaults exist for {', '.join(map(str, sorted(CHANNEL_MULT_BY_IMAGE_SIZE)))}); "
                f"set {_name(names, 'channel_mult')}, one multiplier per resolution level, "
                "e.g. '1,2,2'"
            )
        return CHANNEL_MULT_BY_IMAGE_SIZE[image_size]
    name = _name(names, "channel_mult")
    mult = parse_int_list(channel_mult, name=name, example="1,2,2")
    if not mult or any(m < 1 for m in mult):
        raise ValueError(
            f"{name}={channel_mult!r}: expected positive integers, one per resolution level, "
            "e.g. '1,2,2'"
        )
    return mult


def attention_downsample_rates(
    image_size: int,
    channel_mult: Tuple[int, ...],
    attention_resolutions: Any,
    *,
    names: Optional[Mapping[str, str]] = None,
) -> Tuple[int, ...]:
    """``attention_resolutions`` (pixel sizes, as in the reference) as downsample rates.

    A resolution r is the rate ``image_size // r``.  The reference silently ignores a rate that no
    level of the UNet has; here such a resolution is an error.

    Args:
      image_size: the training resolution.
      channel_mult: the resolved multipliers (:func:`resolve_channel_mult`).
      attention_resolutions: "16,8" or a sequence of ints; at least one.
      names: the option names for messages (see the module docstring).

    Raises:
      ValueError: if the list is empty or a resolution is not one of the UNet's levels.
    """
    name = _name(names, "attention_resolutions")
    resolutions = parse_int_list(attention_resolutions, name=name, example="16,8")
    if not resolutions:
        raise ValueError(
            f"{name}={attention_resolutions!r}: expected at least one resolution, e.g. '16,8'"
        )
    level_rates = [2**level for level in range(len(channel_mult))]
    rates = []
    for resolution in resolutions:
        if resolution < 1 or image_size % resolution or image_size // resolution not in level_rates:
            raise ValueError(
                f"{name}={attention_resolutions!r}: {resolution} is not a resolution of this UNet "
                f"({_name(names, 'image_size')}={image_size} with channel_mult {channel_mult} "
                f"gives resolutions {[image_size // rate for rate in level_rates]})"
            )
        rates.append(image_size // resolution)
    return tuple(rates)


def option_errors(
    *,
    image_size: Any,
    num_channels: Any,
    num_res_blocks: Any,
    channel_mult: Any,
    attention_resolutions: Any,
    num_heads: Any,
    num_heads_upsample: Any,
    dropout: Any,
    class_cond: bool = False,
    num_classes: Any = None,
    class_dropout: Any = 0.0,
    names: Optional[Mapping[str, str]] = None,
) -> List[str]:
    """Every problem of a set of UNet options (the arguments of ``factory.create_model``).

    Args:
      image_size, num_channels, num_res_blocks, channel_mult, attention_resolutions, num_heads,
        num_heads_upsample, dropout, class_cond, num_classes, class_dropout: the options.
      names: the option names for messages (see the module docstring).

    Returns:
      One message per problem (empty if the options describe a valid UNet).
    """
    errors = []
    for option, value in (
        ("image_size", image_size),
        ("num_channels", num_channels),
        ("num_res_blocks", num_res_blocks),
        ("num_heads", num_heads),
    ):
        if not _is_positive_int(value):
            errors.append(f"{_name(names, option)}={value!r} must be a positive integer")
    if num_heads_upsample != -1 and not _is_positive_int(num_heads_upsample):
        errors.append(
            f"{_name(names, 'num_heads_upsample')}={num_heads_upsample!r} must be -1 (the same "
            "as num_heads) or a positive integer"
        )
    if not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        errors.append(f"{_name(names, 'dropout')}={dropout!r} must lie in [0, 1)")
    if class_cond and not _is_positive_int(num_classes):
        errors.append(
            f"{_name(names, 'class_cond')}=True needs {_name(names, 'num_classes')} >= 1, "
            f"got {num_classes!r}"
        )
    if (
        isinstance(class_dropout, bool)
        or not isinstance(class_dropout, numbers.Real)
        or not 0.0 <= class_dropout < 1.0
    ):
        errors.append(
            f"{_name(names, 'class_dropout')}={class_dropout!r} must lie in [0, 1) (the "
            "probability of training an example without its label; 0 = never)"
        )
    elif class_dropout > 0 and not class_cond:
        errors.append(
            f"{_name(names, 'class_dropout')}={class_dropout} needs a class-conditional model "
            f"({_name(names, 'class_cond')}=True): it drops labels"
        )

    mult = None
    if _is_positive_int(image_size):
        try:
            mult = resolve_channel_mult(image_size, channel_mult, names=names)
        except ValueError as e:
            errors.append(str(e))
    if mult is not None:
        factor = 2 ** (len(mult) - 1)
        if image_size % factor:
            errors.append(
                f"{_name(names, 'image_size')}={image_size} is not divisible by {factor}, the "
                f"total downsampling of channel_mult {mult}"
            )
        try:
            attention_downsample_rates(image_size, mult, attention_resolutions, names=names)
        except ValueError as e:
            errors.append(str(e))

    if _is_positive_int(num_channels):
        # Every channel count of the UNet is num_channels times a multiplier (the input
        # convolution's output is num_channels itself), so this one condition covers them all.
        if num_channels % NORM_GROUPS:
            errors.append(
                f"{_name(names, 'num_channels')}={num_channels} is not divisible by the "
                f"{NORM_GROUPS} groups of GroupNorm (every channel count of the UNet is a "
                f"multiple of it); use a multiple of {NORM_GROUPS}"
            )
        if mult is not None:
            level_channels = [num_channels * m for m in mult]
            heads_of = [("num_heads", num_heads)]
            if num_heads_upsample != -1:  # -1 means num_heads, checked above
                heads_of.append(("num_heads_upsample", num_heads_upsample))
            for option, heads in heads_of:
                if _is_positive_int(heads) and any(channels % heads for channels in level_channels):
                    errors.append(
                        f"{_name(names, option)}={heads} must be >= 1 and divide every level's "
                        f"channel count {level_channels}"
                    )
    return errors


def resolve(
    *,
    image_size: int,
    num_channels: int,
    num_res_blocks: int,
    channel_mult: Any,
    attention_resolutions: Any,
    num_heads: int,
    num_heads_upsample: int,
    dropout: float,
    class_cond: bool = False,
    num_classes: Optional[int] = None,
    class_dropout: float = 0.0,
    names: Optional[Mapping[str, str]] = None,
) -> UNetLevels:
    """Checks the options (:func:`option_errors`) and returns the levels they describe.

    Raises:
      ValueError: listing every problem.
    """
    errors = option_errors(
        image_size=image_size,
        num_channels=num_channels,
        num_res_blocks=num_res_blocks,
        channel_mult=channel_mult,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        dropout=dropout,
        class_cond=class_cond,
        num_classes=num_classes,
        class_dropout=class_dropout,
        names=names,
    )
    if len(errors) == 1:
        raise ValueError(errors[0])
    if errors:
        raise ValueError("invalid UNet options:\n  - " + "\n  - ".join(errors))
    mult = resolve_channel_mult(image_size, channel_mult, names=names)
    return UNetLevels(
        channel_mult=mult,
        attention_downsample_rates=attention_downsample_rates(
            image_size, mult, attention_resolutions, names=names
        ),
    )
