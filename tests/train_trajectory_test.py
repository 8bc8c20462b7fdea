"""Replays six recorded training steps of the reference (train_trajectory.npz) through Trainer.

The reference ran ``training_losses`` -> mean loss -> backward -> ``torch.optim.AdamW`` -> EMA on a
tiny UNet with recorded images, timesteps and noise (see testdata/REFERENCE_README.md).  Starting
from its initial weights, ``Trainer.replay_steps`` must give the same per-example loss terms at
every step and move the weights and the EMA as the reference did.  The optimizer and EMA
settings come from the config built from the fixture's metadata; the Trainer reads them there.

Why the weights are compared through their updates and not element by element: Adam divides by
sqrt(v), so an element whose true gradient is zero (e.g. a conv bias removed by a following
one-channel-per-group GroupNorm) moves by about +-lr on float32 rounding noise alone, in any
implementation.  The L2 norm of the update over all parameters together is dominated by the
elements with real gradients.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from configs import base
from tests import golden
from tf_iddpm import convert
from tf_iddpm import train_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trajectory():
    return golden.load("train_trajectory")


def _config_from_meta(meta):
    """configs/base.py set to the recorded run: architecture, diffusion, optimizer, EMA."""
    unet_kwargs, flags, optimizer = meta["unet_kwargs"], meta["diffusion"], meta["optimizer"]
    assert optimizer["name"] == "torch.optim.AdamW" and optimizer["betas"] == [0.9, 0.999]
    assert optimizer["eps"] == 1e-8  # create_adam's constant: the reference's default
    config = base.get_config()
    config.seed = meta["seed"]
    config.data.image_size = meta["image_size"]
    config.data.num_channels = unet_kwargs["in_channels"]
    config.model.num_channels = unet_kwargs["model_channels"]
    config.model.num_res_blocks = unet_kwargs["num_res_blocks"]
    config.model.channel_mult = ",".join(str(m) for m in unet_kwargs["channel_mult"])
    config.model.attention_resolutions = ",".join(
        str(meta["image_size"] // ds) for ds in unet_kwargs["attention_resolutions"]
    )
    config.model.num_heads = unet_kwargs["num_heads"]
    config.model.num_heads_upsample = unet_kwargs["num_heads_upsample"]
    config.model.use_scale_shift_norm = unet_kwargs["use_scale_shift_norm"]
    config.model.dropout = unet_kwargs["dropout"]
    config.diffusion.steps = flags["steps"]
    config.diffusion.learn_sigma = flags["learn_sigma"]
    config.diffusion.noise_schedule = flags["noise_schedule"]
    config.diffusion.rescale_timesteps = flags["rescale_timesteps"]
    config.diffusion.rescale_learned_sigmas = flags["rescale_learned_sigmas"]
    config.train.batch_size = meta["batch"]
    config.train.lr = optimizer["lr"]
    config.train.weight_decay = optimizer["weight_decay"]
    config.train.ema_rate = str(meta["ema_rate"])
    return config


def _state(trajectory, prefix):
    return {
        key[len(prefix) :]: trajectory[key] for key in trajectory.files if key.startswith(prefix)
    }


def _update_error(ours, reference, init, keys):
    """|Δ_ours − Δ_ref| / |Δ_ref| over all `keys` together (L2, Δ = after − init)."""
    delta_ours = np.concatenate([(ours[k] - init[k]).ravel() for k in keys]).astype(np.float64)
    delta_ref = np.concatenate([(reference[k] - init[k]).ravel() for k in keys]).astype(np.float64)
    return float(np.linalg.norm(delta_ours - delta_ref) / np.linalg.norm(delta_ref))


def _replay(trajectory, strategy):
    meta = json.loads(str(trajectory["meta"]))
    config = _config_from_meta(meta)
    with strategy.scope():
        trainer = train_lib.Trainer(config, strategy)
    init = _state(trajectory, "init/")
    convert.assign_state_dict(trainer.net, init)
    (ema_net,) = trainer.ema_nets.values()
    convert.assign_state_dict(ema_net, init)
    terms = trainer.replay_steps(
        trajectory["images_nhwc"], trajectory["t"], trajectory["noise_nhwc"]
    )
    return trainer, init, terms


def _replay_errors(trajectory, strategy):
    """Replays the trajectory under `strategy`; returns every compared error (see module doc)."""
    trainer, init, terms = _replay(trajectory, strategy)
    num_steps = trajectory["t"].shape[0]
    errors = {
        "step": int(trainer.step.numpy()),
        "iterations": int(trainer.optimizer.iterations.numpy()),
        "shapes_ok": all(terms[n].shape == trajectory[n].shape for n in train_lib.REPLAY_TERMS),
    }
    errors["steps_ok"] = errors["step"] == errors["iterations"] == num_steps
    for name in train_lib.REPLAY_TERMS:
        errors[name] = golden.max_rel_error(terms[name], trajectory[name])
    final_ref = _state(trajectory, "final/")
    final = convert.model_state_dict(trainer.net)
    errors["same_keys"] = sorted(final) == sorted(final_ref)
    errors["weights"] = _update_error(final, final_ref, init, sorted(final_ref))
    ema_ref = _state(trajectory, "ema/")
    (ema_net,) = trainer.ema_nets.values()
    errors["ema"] = _update_error(convert.model_state_dict(ema_net), ema_ref, init, sorted(ema_ref))
    return errors


def _check(errors):
    assert errors["steps_ok"] and errors["shapes_ok"] and errors["same_keys"], errors
    for name in train_lib.REPLAY_TERMS:  # measured: 1.6e-7 (loss), 1.7e-7 (mse), 4e-8 (vb)
        assert errors[name] <= 1e-4, f"{name}: max rel error {errors[name]:.2e}"
    # measured: 2.0e-4 (weights), 1.7e-4 (EMA); Mirrored 1.8e-4, 1.5e-4; Keras' epsilon placement gives ~0.6
    assert errors["weights"] <= 2e-3, (
        f"weights: |Δ_ours - Δ_ref| / |Δ_ref| = {errors['weights']:.2e}"
    )
    assert errors["ema"] <= 2e-3, f"EMA: |Δ_ours - Δ_ref| / |Δ_ref| = {errors['ema']:.2e}"


def test_replayed_reference_steps_match_terms_weights_and_ema(trajectory):
    _check(_replay_errors(trajectory, tf.distribute.get_strategy()))


@pytest.mark.slow
def test_replay_under_mirrored_strategy_matches_the_reference_too():
    # A fresh process: the CPU must be split into logical devices before TensorFlow starts.
    result = subprocess.run(
        [sys.executable, "-m", "tests.train_trajectory_test", "--mirrored"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _check(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_keras_epsilon_placement_would_fail_the_comparison(trajectory, monkeypatch):
    """The check can fail: Keras' epsilon on the uncorrected sqrt(v) moves the weights differently."""
    from tf_iddpm import optimizers

    original = optimizers.create_adam

    def keras_style_adam(learning_rate, weight_decay=0.0):
        optimizer = original(learning_rate, weight_decay)
        optimizer.corrected_epsilon = False
        optimizer.epsilon = 1e-7
        return optimizer

    monkeypatch.setattr(optimizers, "create_adam", keras_style_adam)
    errors = _replay_errors(trajectory, tf.distribute.get_strategy())
    assert errors["weights"] > 0.05, errors


def test_replay_rejects_malformed_inputs(trajectory):
    meta = json.loads(str(trajectory["meta"]))
    trainer = train_lib.Trainer(_config_from_meta(meta), tf.distribute.get_strategy())
    images, t, noise = trajectory["images_nhwc"], trajectory["t"], trajectory["noise_nhwc"]
    with pytest.raises(ValueError, match=r"images must be \[K, B=4"):
        trainer.replay_steps(images[:, :2], t[:, :2], noise[:, :2])
    with pytest.raises(ValueError, match="t must be integer"):
        trainer.replay_steps(images, t.astype(np.float32), noise)
    with pytest.raises(ValueError, match="noise must have the images' shape"):
        trainer.replay_steps(images, t, noise[:, :, :8])
    with pytest.raises(ValueError, match=r"timesteps must be in \[0, 100\)"):
        trainer.replay_steps(images, t + 100, noise)
    with pytest.raises(ValueError, match="label is not used"):
        trainer.replay_steps(images, t, noise, labels=np.zeros(t.shape, np.int32))
    assert int(trainer.step.numpy()) == 0  # nothing ran


if __name__ == "__main__":
    if sys.argv[1:] != ["--mirrored"]:
        sys.exit("usage: python -m tests.train_trajectory_test --mirrored")
    from tf_iddpm import distribute  # pylint: disable=g-import-not-at-top

    distribute.split_cpu(2)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    print(json.dumps(_replay_errors(golden.load("train_trajectory"), mirrored)))
