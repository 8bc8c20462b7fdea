"""The sampler description: parsing and checks of kinds, steps, eta and sweeps (no TensorFlow)."""

import subprocess
import sys

import pytest

from configs import base
from configs import tiny
from tf_iddpm import chains
from tf_iddpm import config_utils
from tf_iddpm import samplers


def test_every_sampler_kind_has_a_chain():
    assert set(samplers.SAMPLER_KINDS) == set(chains.CHAIN_KINDS)


def test_the_config_describes_the_paper_sampler_by_default():
    spec = samplers.from_config(base.get_config().sample)
    assert spec == samplers.SamplerSpec("ancestral", "50", 0.0, True)
    assert spec.num_steps(1000) == 50 and spec.label(1000) == "ancestral, 50 steps"
    assert samplers.SamplerSpec("ddim", "ddim10", 0.5).label(100) == "ddim (eta 0.5), 10 steps"
    assert samplers.SamplerSpec("ancestral", "").num_steps(4000) == 4000
    assert samplers.SamplerSpec("ancestral", "10,15").num_steps(100) == 25


@pytest.mark.parametrize(
    "spec, message",
    [
        (samplers.SamplerSpec(kind="euler"), "sample.sampler='euler' is unknown; the samplers are"),
        (samplers.SamplerSpec(steps="101"), "sample.timestep_respacing='101' is not a valid"),
        (samplers.SamplerSpec(steps="ddim30"), "cannot create exactly 30 steps"),
        (samplers.SamplerSpec(eta=0.5), "sample.eta=0.5 only applies to ddim"),
        (samplers.SamplerSpec(kind="ddim", eta=1.5), "sample.eta=1.5 must lie in [0, 1]"),
        (samplers.SamplerSpec(kind="ddim", eta=-0.1), "must lie in [0, 1]"),
        (samplers.SamplerSpec(clip_denoised="yes"), "clip_denoised='yes' must be a bool"),
    ],
)
def test_bad_specs_are_named_field_by_field(spec, message):
    problems = spec.errors(100)
    assert len(problems) == 1 and message in problems[0], problems
    with pytest.raises(ValueError, match="invalid sampler"):
        spec.check(100)


def test_a_good_spec_has_no_problem():
    for spec in (
        samplers.SamplerSpec(),
        samplers.SamplerSpec("ddim", "ddim10", 1.0),
        samplers.SamplerSpec("ancestral", "10,10,10", 0.0, False),
    ):
        assert spec.errors(100) == [] and spec.check(100) is spec


def test_sweep_specs_cross_kinds_and_step_counts():
    base_spec = samplers.SamplerSpec("ddim", "ddim10", 0.3, clip_denoised=False)
    specs = samplers.sweep_specs(base_spec, "5, 10,full", "ancestral,ddim", 100)
    assert [(s.kind, s.steps, s.eta) for s in specs] == [
        ("ancestral", "5", 0.0),
        ("ancestral", "10", 0.0),
        ("ancestral", "", 0.0),
        ("ddim", "5", 0.3),
        ("ddim", "10", 0.3),
        ("ddim", "", 0.3),
    ]
    assert all(s.clip_denoised is False for s in specs)
    assert samplers.sweep_specs(base_spec, "", "ancestral", 100) == [base_spec]


@pytest.mark.parametrize(
    "steps, kinds, message",
    [
        ("25,abc", "ancestral", "fid.sweep='25,abc': 'abc' is not a step count in [1, diffusion"),
        ("0", "ancestral", "'0' is not a step count"),
        ("101", "ancestral", "'101' is not a step count in [1, diffusion.steps=100]"),
        ("10", "ancestral,euler", "fid.sweep_samplers='ancestral,euler' must name samplers"),
        ("10", "ddim,ddim", "each once"),
        ("10", "", "must name samplers"),
    ],
)
def test_bad_sweeps_are_refused(steps, kinds, message):
    with pytest.raises(ValueError) as error:
        samplers.sweep_specs(samplers.SamplerSpec(), steps, kinds, 100)
    assert message in str(error.value)


def test_importing_samplers_loads_no_tensorflow():
    code = "import sys; import tf_iddpm.samplers; print('tensorflow' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"


def test_a_sweep_takes_the_grid_for_its_solvers_whatever_the_base_sampler(tmp_path):
    """--sweep_samplers=ancestral,dpmpp_2m --grid=karras: the grid is the swept solvers'; on its
    own (no sweep) a grid on the ancestral sampler is refused."""
    config = tiny.get_config()
    config.sample.grid, config.fid.sweep = "karras", "5"
    config.fid.sweep_samplers = "ancestral,dpmpp_2m"
    for name in ("ref.npz", "graph.pb"):
        (tmp_path / name).write_bytes(b"")
    config.fid.ref_batch, config.fid.inception = (
        str(tmp_path / "ref.npz"),
        str(tmp_path / "graph.pb"),
    )
    config_utils.validate_config(config, mode="fid")
    specs = samplers.sweep_specs(
        samplers.from_config(config.sample), "5", config.fid.sweep_samplers, 100
    )
    assert [(s.kind, s.grid) for s in specs] == [("ancestral", "logsnr"), ("dpmpp_2m", "karras")]
    with pytest.raises(ValueError, match="grid='karras' applies to the solvers"):
        config_utils.validate_config(config, mode="sample")
