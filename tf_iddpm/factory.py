"""Factories that build the project's objects from a ConfigDict shaped like configs/base.py."""

from tf_iddpm import diffusion
from tf_iddpm import unet


def create_model_from_config(config, **model_kwargs):
    """Builds the UNet (or super-resolution UNet) described by ``config``.

    ``image_size``, ``num_channels`` (image channels), ``class_cond``, ``num_classes`` and
    ``low_res_size`` (> 0 selects the super-resolution model) come from ``config.data``,
    ``learn_sigma`` from ``config.diffusion``, every other argument of
    :func:`tf_iddpm.unet.create_model` from ``config.model``.

    Args:
      config: ml_collections.ConfigDict with ``data``, ``model`` and ``diffusion`` groups.
      **model_kwargs: passed to the model constructor (``name``, ``dtype``).

    Returns:
      A built :class:`tf_iddpm.unet.UNetModel` or :class:`tf_iddpm.unet.SuperResModel`.
    """
    data, model = config.data, config.model
    return unet.create_model(
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
        in_channels=data.num_channels,
        super_res=data.low_res_size > 0,
        **model_kwargs,
    )


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
