"""Schedules and respacing against the reference's float64 arrays (relative error <= 1e-12)."""

import json

import numpy as np
import pytest

from tests import golden
from tf_iddpm import diffusion
from tf_iddpm import schedules

SCHEDULES = golden.load("schedules")
RESPACING = golden.load("respacing")

DIFFUSION_ATTRS = sorted(
    {k.split("T1000_", 1)[1] for k in SCHEDULES.files if k.startswith("diff_")}
)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("num_timesteps", [1000, 4000])
def test_named_beta_schedule_matches_reference(name, num_timesteps):
    betas = schedules.get_named_beta_schedule(name, num_timesteps)
    expected = SCHEDULES[f"betas_{name}_T{num_timesteps}"]
    assert betas.dtype == np.float64
    assert golden.max_rel_error(betas, expected) <= 1e-12


def test_cosine_schedule_closed_form():
    # Eq. 17: alpha_bar_t = f(t)/f(0) with f(t) = cos^2(((t/T + s)/(1 + s)) pi/2); the clip at 0.999
    # only touches the last beta at T = 1000.
    num_timesteps = 1000
    betas = schedules.get_named_beta_schedule("cosine", num_timesteps)

    def f(t):
        return np.cos((t / num_timesteps + 0.008) / 1.008 * np.pi / 2) ** 2

    t = np.arange(num_timesteps)
    alpha_bar = f(t + 1) / f(0)
    np.testing.assert_allclose(np.cumprod(1 - betas)[:-1], alpha_bar[:-1], rtol=1e-9)
    assert betas[-1] == pytest.approx(0.999)
    assert np.all(betas[:-1] < 0.999)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("attr", DIFFUSION_ATTRS)
def test_diffusion_constants_match_reference(name, attr):
    process = diffusion.GaussianDiffusion(
        betas=schedules.get_named_beta_schedule(name, 1000),
        model_mean_type="epsilon",
        model_var_type="learned_range",
        loss_type="rescaled_mse",
        rescale_timesteps=True,
    )
    value = getattr(process, attr)
    assert value.dtype == np.float64
    assert golden.max_rel_error(value, SCHEDULES[f"diff_{name}_T1000_{attr}"]) <= 1e-12


def _case_counts(raw):
    raw = str(raw)
    return json.loads(raw) if raw.startswith("[") else raw


@pytest.mark.parametrize("case", range(len(RESPACING["case_T"])))
def test_space_timesteps_matches_reference_including_errors(case):
    num_timesteps = int(RESPACING["case_T"][case])
    counts = _case_counts(RESPACING["case_section_counts"][case])
    if RESPACING["case_ok"][case]:
        steps = schedules.space_timesteps(num_timesteps, counts)
        np.testing.assert_array_equal(sorted(steps), RESPACING[str(RESPACING["case_key"][case])])
    else:
        with pytest.raises(ValueError, match="cannot"):
            schedules.space_timesteps(num_timesteps, counts)


def test_space_timesteps_docstring_examples():
    steps = sorted(schedules.space_timesteps(300, [10, 15, 20]))
    assert len(steps) == 45
    assert steps[:10] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert steps[10] == 100 and steps[24] == 199 and steps[25] == 200 and steps[-1] == 299
    assert sorted(schedules.space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))


SPACED = sorted(
    {k.rsplit("_timestep_map", 1)[0] for k in RESPACING.files if k.endswith("_timestep_map")}
)


@pytest.mark.parametrize("prefix", SPACED)
def test_respaced_diffusion_matches_reference(prefix):
    _, name, steps, respacing = prefix.split("_", 3)
    process = diffusion.create_gaussian_diffusion(
        steps=int(steps[1:]),
        learn_sigma=True,
        noise_schedule=name,
        rescale_timesteps=True,
        timestep_respacing=respacing.replace("-", ","),
    )
    np.testing.assert_array_equal(process.timestep_map, RESPACING[f"{prefix}_timestep_map"])
    assert process.original_num_steps == int(RESPACING[f"{prefix}_original_num_steps"])
    for key in RESPACING.files:
        if key.startswith(prefix + "_") and key.endswith(
            ("betas", "cumprod", "cumprod_prev", "variance", "clipped", "coef1", "coef2")
        ):
            attr = key[len(prefix) + 1 :]
            assert golden.max_rel_error(getattr(process, attr), RESPACING[key]) <= 1e-12, attr


@pytest.mark.parametrize("bad", ["quadratic", "Cosine ", ""])
def test_unknown_schedule_names_the_value_and_allowed(bad):
    with pytest.raises(ValueError, match=r"unknown noise schedule .*allowed: linear, cosine"):
        schedules.get_named_beta_schedule(bad, 100)


@pytest.mark.parametrize("counts", ["abc", "10,x", "0", "-3", "ddim", "ddimx", [0, 2], ""])
def test_malformed_section_counts(counts):
    with pytest.raises(ValueError):
        schedules.space_timesteps(100, counts)


def test_non_positive_num_timesteps():
    with pytest.raises(ValueError, match="positive integer"):
        schedules.get_named_beta_schedule("linear", 0)
