"""Factories that build the project's objects: the UNet from the reference's flags, and the UNet
and the diffusion from a ConfigDict shaped like configs/base.py.

:func:`create_model` is the reference's ``script_util.create_model`` (and ``sr_create_model``): it
resolves the flags with the rules of :mod:`tf_iddpm.unet_options` and builds a
:class:`tf_iddpm.unet.UNetModel`; :func:`create_model_from_config` takes the flags from a config.
"""

from tf_iddpm import diffusion
from tf_iddpm import unet
from tf_iddpm import unet_options


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    attention_resolutions,
    num_heads,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    *,
    channel_mult="",
    num_classes=unet_options.DEFAULT_NUM_CLASSES,
    class_dropout=0.0,
    in_channels=3,
    super_res=False,
    **model_kwargs,
):
    """Builds a UNet from the reference's ``script_util`` flags.

    Args:
      image_size: training resolution; selects the default ``channel_mult`` (32, 64, 128, 256).
      num_channels: ``model_channels``.
      num_res_blocks: ResBlocks per level.
      learn_sigma: output 2 * in_channels channels (epsilon and variance values).
      class_cond: class-conditional on ``num_classes`` labels.
      attention_resolutions: comma-separated *resolutions* ("16,8"), converted to downsample
        rates ``image_size // res``.
      num_heads, num_heads_upsample, use_scale_shift_norm, dropout: as
        :class:`tf_iddpm.unet.UNetModel`.
      channel_mult: "" for the per-size default, else "1,2,2" or a sequence of ints.
      num_classes: label count when ``class_cond``.
      class_dropout: the probability with which training drops an example's label (classifier-
        free guidance); > 0 gives the label embedding one more row, the null label
        :func:`null_label` (= ``num_classes``).
      in_channels: image channels.
      super_res: build a :class:`tf_iddpm.unet.SuperResModel` at ``image_size`` (the
        reference's ``sr_create_model`` with ``large_size = image_size``).
      **model_kwargs: passed to the model (``name``, ``dtype``).

    Returns:
      A built :class:`tf_iddpm.unet.UNetModel` or :class:`tf_iddpm.unet.SuperResModel`.

    Raises:
      ValueError: listing every flag that breaks a rule of :mod:`tf_iddpm.unet_options`.
    """
    levels = unet_options.resolve(
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
    )
    model_cls = unet.SuperResModel if super_res else unet.UNetModel
    label_rows = num_classes + (1 if class_dropout > 0 else 0) if class_cond else None
    return model_cls(
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels,
        num_res_blocks=num_res_blocks,
        attention_resolutions=levels.attention_downsample_rates,
        dropout=dropout,
        channel_mult=levels.channel_mult,
        num_classes=label_rows,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        **model_kwargs,
    )


def create_model_from_config(config, **model_kwargs):
    """Builds the UNet (or super-resolution UNet) described by ``config``.

    ``image_size``, ``num_channels`` (image channels), ``class_cond``, ``num_classes`` and
    ``low_res_size`` (> 0 selects the super-resolution model) come from ``config.data``,
    ``learn_sigma`` from ``config.diffusion``, every other argument of :func:`create_model` from
    ``config.model``.

    Args:
      config: ml_collections.ConfigDict with ``data``, ``model`` and ``diffusion`` groups.
      **model_kwargs: passed to the model constructor (``name``, ``dtype``).

    Returns:
      A built :class:`tf_iddpm.unet.UNetModel` or :class:`tf_iddpm.unet.SuperResModel`.
    """
    data, model = config.data, config.model
    return create_model(
        image_size=data.image_size,
        num_channels=model.num_channels,
        num_res_blocks=model.num_res_blocks,
        learn_sigma=config.diffusion.learn_sigma,
        class_cond=data.class_cond,
        attention_resolutions=model.attention_resolutions,
        num_heads=model.num_heads,
        num_heads_upsample=model.num_heads_upsample,
        use_scale_shift_norm=model.use_scale_shift_norm,
        dropout=model.dropout,
        channel_mult=model.channel_mult,
        num_classes=data.num_classes,
        class_dropout=model.class_dropout,
        in_channels=data.num_channels,
        super_res=data.low_res_size > 0,
        **model_kwargs,
    )


def null_label(config):
    """The label that means "no label" to a network of ``config`` trained with class dropout
    (``model.class_dropout > 0``): its extra embedding row, ``data.num_classes``; None for a
    network without one (unconditional, or trained on labels only)."""
    if not config.data.class_cond or not config.model.class_dropout > 0:
        return None
    return int(config.data.num_classes)


def create_diffusion_from_config(config, *, timestep_respacing=None):
    """Builds the GaussianDiffusion of ``config.diffusion`` (create_gaussian_diffusion's kwargs).

    Args:
      config: ml_collections.ConfigDict with a ``diffusion`` group.
      timestep_respacing: overrides ``config.diffusion.timestep_respacing`` when not None
        ("" = every step, as training needs; "50" or "ddim50" for strided sampling).

    Returns:
      A :class:`tf_iddpm.diffusion.GaussianDiffusion`.
    """
    kwargs = dict(config.diffusion)
    if timestep_respacing is not None:
        kwargs["timestep_respacing"] = timestep_respacing
    return diffusion.create_gaussian_diffusion(**kwargs)
