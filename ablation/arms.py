"""What the study compares: its arms (loss x noise schedule x timestep sampler) and its samplers.

Each arm is one row of the paper's Tables 1-2: the base config (``configs/ablation.py``) with the
arm's loss, schedule and timestep sampler (:func:`arm_config`).  Sample quality is measured for
every sampler kind of ``--samplers`` (kinds of :data:`tf_iddpm.samplers.SAMPLER_KINDS`; by default
:data:`DEFAULT_SAMPLERS`) at every point of the sweep, a number of network calls per image (NFE):
``k`` evenly strided steps of the trained process for strided ancestral sampling and DDIM (eta 0),
``k`` calls for a few-step solver, which has no "full" point (:func:`sampler_spec`,
:func:`sampler_points`).

Nothing here imports TensorFlow, so the command line is checked before it loads.
"""

import copy
from typing import List

import ml_collections

from tf_iddpm import samplers

ARM_SETTINGS = {
    # name: (loss, noise_schedule, schedule_sampler)
    "simple_linear": ("simple", "linear", "uniform"),
    "simple_cosine": ("simple", "cosine", "uniform"),
    "hybrid_linear": ("hybrid", "linear", "uniform"),
    "hybrid_cosine": ("hybrid", "cosine", "uniform"),
    "vlb_cosine_uniform": ("vlb", "cosine", "uniform"),
    "vlb_cosine_loss_aware": ("vlb", "cosine", "loss-second-moment"),
}
ARMS = tuple(ARM_SETTINGS)
ARM_LABELS = {
    "simple_linear": "L_simple, linear",
    "simple_cosine": "L_simple, cosine",
    "hybrid_linear": "L_hybrid, linear",
    "hybrid_cosine": "L_hybrid, cosine",
    "vlb_cosine_uniform": "L_vlb, cosine, uniform t",
    "vlb_cosine_loss_aware": "L_vlb, cosine, loss-aware t",
}
QUICK_ARMS = ("simple_linear", "hybrid_cosine")
# The arm whose untrained network is the feature check's "bad model".
UNTRAINED_ARM = "hybrid_cosine"

# The sampler kinds of the default quality sweep (--samplers), with their names in tables and
# plots; any other kind is named as it is (sampler_label).
DEFAULT_SAMPLERS = ("ancestral", "ddim")
SAMPLER_LABELS = {"ancestral": "strided", "ddim": "DDIM"}


def sampler_label(kind: str) -> str:
    """The name of a sampler kind in tables and plots: "strided", "DDIM", else the kind."""
    return SAMPLER_LABELS.get(kind, kind)


def is_solver(kind: str) -> bool:
    """Whether ``kind`` is a few-step solver (its points are numbers of calls, none "full")."""
    return samplers.SAMPLER_KINDS[kind].solver


def parse_samplers(text: str) -> tuple:
    """ "ancestral,ddim,unipc" -> the kinds, each known and given once.

    Raises:
      ValueError: naming --samplers, the unknown names and every kind.
    """
    return samplers.parse_kinds(text, field="--samplers")


def sampler_spec(kind: str, steps: int, num_timesteps: int) -> samplers.SamplerSpec:
    """The study's sampler of ``kind`` at ``steps`` network calls per image on a T-step process.

    Strided ancestral and DDIM: ``steps`` evenly strided steps (all T when steps = T), DDIM with
    eta 0 (deterministic).  Solvers: ``steps`` calls on their default grid and order (a solver
    has no "full" point: see :func:`sampler_points`).  Predicted images are clipped.
    """
    if kind not in samplers.SAMPLER_KINDS:
        raise ValueError(
            f"unknown sampler {kind!r}; the samplers are: {', '.join(samplers.SAMPLER_KINDS)}"
        )
    if is_solver(kind):
        return samplers.SamplerSpec(kind=kind, steps=str(int(steps)), clip_denoised=True)
    return samplers.SamplerSpec(
        kind=kind, steps=respacing(steps, num_timesteps), eta=0.0, clip_denoised=True
    )


def sampler_points(kind: str, step_points, num_timesteps: int) -> List[int]:
    """The sweep's points (step counts, T = "full") that ``kind`` is measured at: all of them,
    but a solver skips T, the full chain, which is no number of solver calls."""
    return [int(k) for k in step_points if not (is_solver(kind) and int(k) == int(num_timesteps))]


def respacing(steps: int, num_timesteps: int) -> str:
    """The respacing of ``steps`` evenly strided steps of a T-step process ("" = every step)."""
    return "" if int(steps) == int(num_timesteps) else str(int(steps))


def arm_config(
    base: ml_collections.ConfigDict, arm: str, seed: int, steps: int
) -> ml_collections.ConfigDict:
    """The base config with one arm's loss, schedule and timestep sampler, a seed and a budget.

    L_simple: fixed (large, beta_t) variances, MSE on eps.  L_hybrid: learned variances (Eq. 15),
    MSE + lambda L_vlb (rescale_learned_sigmas).  L_vlb: learned variances, KL terms only.
    """
    if arm not in ARM_SETTINGS:
        raise ValueError(f"unknown arm {arm!r}; the arms are: {', '.join(ARMS)}")
    loss, schedule, sampler = ARM_SETTINGS[arm]
    config = copy.deepcopy(base)
    config.seed = int(seed)
    config.diffusion.noise_schedule = schedule
    config.diffusion.learn_sigma = loss != "simple"
    config.diffusion.sigma_small = False
    config.diffusion.use_kl = loss == "vlb"
    config.diffusion.rescale_learned_sigmas = True
    config.diffusion.timestep_respacing = ""
    config.train.schedule_sampler = sampler
    config.train.num_steps = int(steps)
    config.train.sample_every = 0
    config.train.fid_every = 0
    return config


def parse_arms(text: str) -> List[str]:
    """ "a,b" or "all" -> arm names, each checked."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("--arms is empty; give arm names or 'all'")
    if names == ["all"]:
        return list(ARMS)
    unknown = [n for n in names if n not in ARM_SETTINGS]
    if unknown:
        raise ValueError(
            f"unknown arm(s) {', '.join(map(repr, unknown))}; the arms are: "
            f"{', '.join(ARMS)} (or 'all')"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"--arms names an arm twice: {text!r}")
    return names


def parse_sampling_steps(
    text: str, num_timesteps: int, *, flag: str = "sampling_steps"
) -> List[int]:
    """ "10,25,full" -> sorted distinct step counts, each in 1..T ("full" = T).

    Raises:
      ValueError: naming ``--<flag>``, for a token that is no step count in 1..T, or no token.
    """
    respacings = samplers.parse_sweep_steps(text, num_timesteps, field=f"--{flag}")
    if not respacings:
        raise ValueError(f"--{flag} is empty; give step counts, e.g. '10,25,50,full'")
    return sorted({int(r) if r else int(num_timesteps) for r in respacings})
