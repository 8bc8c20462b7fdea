"""Classifier-free guidance: the null label, label dropout in training, the guided prediction."""

import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from tf_iddpm import config_utils
from tf_iddpm import factory
from tf_iddpm import image_utils
from tf_iddpm import inference
from tf_iddpm import metrics
from tf_iddpm import samplers
from tf_iddpm import train_lib


def _conditional_config(class_dropout=0.1):
    config = tiny.get_config()
    config.data.class_cond, config.data.num_classes = True, 10
    config.model.class_dropout = class_dropout
    return config


def test_label_dropout_gives_the_network_a_null_label_row():
    net = factory.create_model_from_config(_conditional_config())
    assert net.label_emb.embeddings.shape[0] == 11
    assert factory.null_label(_conditional_config()) == 10
    plain = factory.create_model_from_config(_conditional_config(0.0))
    assert plain.label_emb.embeddings.shape[0] == 10  # today's checkpoints load unchanged
    assert factory.null_label(_conditional_config(0.0)) is None
    assert factory.null_label(tiny.get_config()) is None


class _LabelledModel:
    """A network whose output is x * (label + 1) (first C channels) and a variance half that
    records the label: guidance's arithmetic can be read off it.  Counts its calls."""

    def __init__(self, channels=3):
        self.channels, self.calls = channels, []

    def __call__(self, x, t, y=None, **kwargs):
        del t, kwargs
        self.calls.append(int(x.shape[0]))
        factor = tf.reshape(tf.cast(y, tf.float32) + 1.0, [-1, 1, 1, 1])
        return tf.concat([x * factor, tf.ones_like(x) * factor], -1)


def test_the_guided_prediction_is_uncond_plus_s_times_the_difference_in_one_call():
    model = _LabelledModel()
    x = tf.random.stateless_normal([2, 4, 4, 3], seed=[1, 2])
    labels = tf.constant([2, 5])
    scale = tf.constant([0.0, 3.0])
    guided = inference.guided_model_function(model, scale, null_label=10, channels=3)
    out = guided(x, tf.constant([7.0, 7.0]), y=labels).numpy()
    assert model.calls == [4]  # one call on [cond; uncond]
    cond = x.numpy() * np.array([3.0, 6.0])[:, None, None, None]
    uncond = x.numpy() * 11.0
    expected = uncond + np.array([0.0, 3.0])[:, None, None, None] * (cond - uncond)
    np.testing.assert_allclose(out[..., :3], expected, rtol=1e-6)
    # The learned-variance half is the conditional branch's (GLIDE).
    np.testing.assert_allclose(out[..., 3:], np.ones([2, 4, 4, 3]) * [[[[3.0]]], [[[6.0]]]])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ancestral", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_every_sampler_takes_guidance_and_scale_one_is_the_plain_model(kind):
    config = _conditional_config()
    net = factory.create_model_from_config(config)
    for variable in net.variables:  # move the zero-initialised output layer
        variable.assign(variable + 0.02 * tf.random.stateless_normal(variable.shape, seed=[3, 4]))
    model_fn = inference.model_function(net)
    steps = "ddim10" if kind == "ddim" else "5"
    seeds, labels = np.array([1, 2]), np.array([3, 7])
    draws = {}
    for scale in (1.0, 0.0, 3.0):
        spec = samplers.SamplerSpec(kind=kind, steps=steps, guidance_scale=scale)
        sampler = inference.build_sampler(model_fn, config, spec)
        assert (sampler.model_fn is model_fn) == (scale == 1.0)  # no doubled batch at s = 1
        draws[scale] = sampler(seeds, labels).numpy()
    plain = inference.build_sampler(model_fn, config, samplers.SamplerSpec(kind, steps))
    np.testing.assert_array_equal(draws[1.0], plain(seeds, labels).numpy())
    assert np.abs(draws[3.0] - draws[1.0]).max() > 1e-3
    assert np.abs(draws[0.0] - draws[1.0]).max() > 1e-3
    if kind == "ancestral":
        return  # its variance stays the conditional branch's, so s = 0 still reads the label
    # s = 0 is the unconditional model: the label no longer matters.
    unconditional = inference.build_sampler(
        model_fn, config, samplers.SamplerSpec(kind, steps, guidance_scale=0.0)
    )
    np.testing.assert_allclose(
        unconditional(seeds, np.array([0, 0])).numpy(), draws[0.0], atol=1e-5
    )


def _training_labels(config, step):
    trainer = train_lib.Trainer(config, tf.distribute.get_strategy())
    trainer.step.assign(step)
    labels = tf.range(config.train.batch_size, dtype=tf.int64) % 10

    @tf.function
    def dropped():
        return tf.distribute.get_strategy().run(trainer._dropped_labels, args=(labels,))

    return labels.numpy(), dropped().numpy()


def test_training_drops_labels_at_the_configured_rate_statelessly():
    config = _conditional_config(0.25)
    config.train.batch_size = 512
    labels, dropped = _training_labels(config, 3)
    replaced = dropped != labels
    assert set(dropped[replaced].tolist()) == {10}  # only ever the null label
    assert 0.2 < replaced.mean() < 0.3
    np.testing.assert_array_equal(
        _training_labels(config, 3)[1], dropped
    )  # a function of (seed, step)
    assert not np.array_equal(_training_labels(config, 4)[1], dropped)
    config.model.class_dropout = 0.0
    labels, kept = _training_labels(config, 3)
    np.testing.assert_array_equal(kept, labels)


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"sample.guidance_scale": -1.0},
            "sample.guidance_scale=-1.0 must be a finite number >= 0",
        ),
        ({"sample.guidance_scale": float("nan")}, "must be a finite number >= 0"),
        (
            {"sample.guidance_scale": 2.0, "model.class_dropout": 0.0},
            "sample.guidance_scale=2 needs a model trained with label dropout",
        ),
        (
            {"sample.guidance_scale": 2.0, "data.class_cond": False, "model.class_dropout": 0.0},
            "sample.guidance_scale=2 needs a class-conditional model",
        ),
        ({"model.class_dropout": 1.0}, "model.class_dropout=1.0 must lie in [0, 1)"),
        ({"model.class_dropout": -0.1}, "model.class_dropout=-0.1 must lie in [0, 1)"),
        (
            {"model.class_dropout": 0.1, "data.class_cond": False},
            "model.class_dropout=0.1 needs a class-conditional model",
        ),
        ({"fid.guidance_sweep": "0,1,x"}, "'x' is not a new guidance scale"),
        (
            {"fid.guidance_sweep": "0,2", "model.class_dropout": 0.0},
            "fid.guidance_sweep: sample.guidance_scale=0 needs a model trained with label dropout",
        ),
        ({"fid.guidance_sweep": "1,2", "fid.sweep": "5"}, "sweep the steps or the guidance"),
    ],
)
def test_bad_guidance_settings_are_refused_before_anything_runs(changes, message):
    config = _conditional_config()
    for field, value in changes.items():
        group, name = field.split(".")
        config[group][name] = value
    with pytest.raises(ValueError) as error:
        config_utils.validate_config(config, mode="sample")
    assert message in str(error.value)


def test_a_model_without_a_null_label_refuses_guidance_at_build_time():
    config = _conditional_config(0.0)
    net = factory.create_model_from_config(config)
    spec = samplers.SamplerSpec("ancestral", "5", guidance_scale=1.5)
    with pytest.raises(ValueError, match="needs a model trained with label dropout"):
        inference.build_sampler(inference.model_function(net), config, spec)


@pytest.mark.slow
def test_guided_digits_follow_their_label_more_as_the_scale_grows(tmp_path):
    """A class-conditional 8x8 digits model trained with label dropout, then classified by the
    study's proxy digit classifier: at s = 0 samples ignore their label (chance, 0.1), at s = 1
    most follow it, at s = 3 at least as many."""
    from ablation import features  # pylint: disable=g-import-not-at-top

    config = _conditional_config(0.1)
    config.data.num_channels = 1
    config.train.batch_size, config.train.num_steps = 64, 600
    config.train.log_every = config.train.checkpoint_every = 600
    workdir = str(tmp_path / "digits_cond")
    train_lib.train(config, workdir)
    classifier = features.ProxyFeatures.train_or_load(
        str(tmp_path / "classifier"),
        features.split_images_and_labels(config.data, "train"),
        features.split_images_and_labels(config.data, "test"),
        epochs=30,
        seed=0,
    )
    assert classifier.test_accuracy > 0.85
    model = inference.InferenceModel.restore(config, workdir, use_ema=False)
    labels = (np.arange(200) % 10).astype(np.int32)
    agreement = {}
    for scale in (0.0, 1.0, 3.0):
        spec = samplers.SamplerSpec("ancestral", "20", guidance_scale=scale)
        images = model.draw(spec, np.arange(200), labels=labels, batch_size=200)
        probs = classifier.network(image_utils.to_rgb(images))["probs"]
        agreement[scale] = metrics.label_agreement(probs, labels)
    # Measured: 0.100, 0.940, 1.000.
    assert agreement[0.0] < 0.3, agreement
    assert agreement[1.0] > 0.7, agreement
    assert agreement[3.0] >= agreement[1.0], agreement
