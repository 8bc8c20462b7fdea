"""Noise schedules (paper Section 3.2) and timestep respacing (Section 4), in float64 numpy.

Everything here is plain numpy on purpose: the schedules are computed once, in float64, and only
gathered into float32 tensors by the diffusion module (as the reference does), so the constants do
not depend on the TF device or precision policy.
"""

import math
from typing import Callable, Iterable, List, Sequence, Set, Union

import numpy as np

NOISE_SCHEDULES = ("linear", "cosine")

# Ho et al.'s linear schedule is defined for T=1000; other T rescale it so that any T
# describes the same continuous process (improved-diffusion's convention).
_LINEAR_BETA_START_T1000 = 1e-4
_LINEAR_BETA_END_T1000 = 0.02
# Section 3.2: offset s keeps beta_0 from being vanishingly small near t = 0, and the clip
# at 0.999 prevents the singularity at t = T where alpha_bar reaches 0.
COSINE_OFFSET_S = 0.008
COSINE_MAX_BETA = 0.999


def cosine_alpha_bar(t: float, s: float = COSINE_OFFSET_S) -> float:
    """The cosine schedule's cumulative signal fraction, Eq. 17 (unnormalised).

    Args:
      t: diffusion time in [0, 1].
      s: the small offset of Section 3.2.

    Returns:
      cos^2(((t + s) / (1 + s)) * pi / 2), a python float.
    """
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def betas_for_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = COSINE_MAX_BETA
) -> np.ndarray:
    """Discretises a continuous alpha_bar(t), t in [0, 1], into T betas (Eq. 17-18).

    beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta), computed with python
    floats (the same arithmetic as the reference, so the result is bit-identical).

    Args:
      num_timesteps: T.
      alpha_bar: the cumulative product of (1 - beta) as a function of t in [0, 1].
      max_beta: upper clip, below 1 to avoid a singular final step.

    Returns:
      float64 array [T].
    """
    betas = []
    for i in range(num_timesteps):
        t1 = i / num_timesteps
        t2 = (i + 1) / num_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(schedule_name: str, num_timesteps: int) -> np.ndarray:
    """Returns the named beta schedule for T = num_timesteps steps.

    Args:
      schedule_name: "linear" (Ho et al., rescaled by 1000/T so that any T matches the T=1000
        schedule) or "cosine" (Section 3.2: s = 0.008, betas clipped at 0.999).
      num_timesteps: T >= 1.

    Returns:
      float64 numpy array [T] of betas.

    Raises:
      ValueError: for an unknown name or a non-positive T.
    """
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    if schedule_name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(
            scale * _LINEAR_BETA_START_T1000,
            scale * _LINEAR_BETA_END_T1000,
            num_timesteps,
            dtype=np.float64,
        )
    if schedule_name == "cosine":
        return betas_for_alpha_bar(num_timesteps, cosine_alpha_bar)
    raise ValueError(
        f"unknown noise schedule {schedule_name!r}; allowed: {', '.join(NOISE_SCHEDULES)}"
    )


SectionCounts = Union[str, Sequence[int]]


def _parse_section_counts(section_counts: SectionCounts) -> List[int]:
    if isinstance(section_counts, str):
        try:
            counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"invalid timestep respacing {section_counts!r}; expected 'K', 'a,b,c' or 'ddimK' "
                "with positive integers"
            ) from None
    else:
        counts = list(section_counts)
        if not all(isinstance(c, (int, np.integer)) for c in counts):
            raise ValueError(f"section counts must be integers, got {section_counts!r}")
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"every section count must be a positive integer, got {section_counts!r}")
    return [int(c) for c in counts]


def space_timesteps(num_timesteps: int, section_counts: SectionCounts) -> Set[int]:
    """Chooses which timesteps of a T-step process a respaced process keeps (Section 4).

    The T steps are cut into len(section_counts) nearly equal sections (the first T % n sections
    one step longer); section i keeps section_counts[i] steps evenly strided over it, endpoints
    included.  The stride is accumulated by repeated float addition and rounded half-to-even
    (python's round), exactly like improved-diffusion, so respaced processes match it step for step.

    Examples:
      space_timesteps(300, [10, 15, 20]): 100 steps strided to 10, then 100 to 15, then 100 to 20.
      space_timesteps(1000, "250"): 250 steps evenly spread over 0..999.
      space_timesteps(1000, "ddim50"): the DDIM paper's fixed stride, {0, 20, ..., 980}; only one
        section is allowed and T - 1 is not necessarily included.

    Args:
      num_timesteps: T of the original process.
      section_counts: "K", "a,b,c", "ddimK" or a list of ints.

    Returns:
      A set of kept timestep indices in [0, T).

    Raises:
      ValueError: if a section is shorter than its count, a "ddimK" stride cannot give exactly K
        steps, or the string is malformed.
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        suffix = section_counts[len("ddim") :]
        if not suffix.isdigit() or int(suffix) < 1:
            raise ValueError(
                f"invalid DDIM respacing {section_counts!r}; expected 'ddimK' with K >= 1"
            )
        desired_count = int(suffix)
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired_count:
                return set(range(0, num_timesteps, stride))
        raise ValueError(
            f"cannot create exactly {desired_count} steps out of {num_timesteps} with an integer "
            f"stride ({section_counts!r}); choose K such that some stride i gives ceil(T/i) == K"
        )
    counts = _parse_section_counts(section_counts)
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(
                f"cannot divide section of {size} steps into {section_count} "
                f"(respacing {section_counts!r} of {num_timesteps} steps)"
            )
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def respace_betas(base_alphas_cumprod: np.ndarray, use_timesteps: Iterable[int]):
    """Betas of the process that visits only `use_timesteps` of a base process.

    Keeping the marginals q(x_t | x_0) of the kept steps unchanged fixes the new betas:
    beta'_k = 1 - alpha_bar[s_k] / alpha_bar[s_{k-1}] (with alpha_bar[s_{-1}] = 1).

    Args:
      base_alphas_cumprod: float64 [T] of the base process.
      use_timesteps: kept indices (any order; duplicates ignored).

    Returns:
      (betas float64 [K], timestep_map int64 [K]) where timestep_map[k] is the base index of new
      step k.
    """
    timestep_map = np.array(sorted(set(int(s) for s in use_timesteps)), dtype=np.int64)
    if timestep_map.size == 0:
        raise ValueError("use_timesteps is empty")
    if timestep_map[0] < 0 or timestep_map[-1] >= len(base_alphas_cumprod):
        raise ValueError(
            f"use_timesteps must lie in [0, {len(base_alphas_cumprod)}), "
            f"got {timestep_map[0]}..{timestep_map[-1]}"
        )
    kept = base_alphas_cumprod[timestep_map]
    previous = np.concatenate([[1.0], kept[:-1]])
    return 1.0 - kept / previous, timestep_map


# The noisiest half-logSNR a few-step solver starts from.  A discrete cosine schedule clips beta
# at 0.999, so lambda plunges over its last steps (to about -10 at T = 4000): a grid uniform in
# lambda from T-1 would spend its first steps where the image is pure noise whatever the model
# says.  DPM-Solver (Lu et al. 2022) clips lambda at -5.1 for such discrete-time models; alpha is
# then 0.006 and x_T ~ N(0, I) is as good a start as at T-1.
SOLVER_LAMBDA_MIN = -5.1


def half_log_snr(alphas_cumprod) -> np.ndarray:
    """lambda_t = log(alpha_t / sigma_t) = (log abar_t - log(1 - abar_t)) / 2, in float64.

    ``1 - abar`` is formed as ``-expm1(log abar)``, exact where abar is close to 1 (t near 0).

    Args:
      alphas_cumprod: float64 [T], decreasing, in (0, 1).

    Returns:
      float64 [T], decreasing in t.
    """
    log_abar = np.log(np.asarray(alphas_cumprod, np.float64))
    return 0.5 * (log_abar - np.log(-np.expm1(log_abar)))


def solver_start_index(alphas_cumprod, lambda_min: float = SOLVER_LAMBDA_MIN) -> int:
    """The noisiest step of the trained process a solver starts from: the largest t whose
    lambda_t >= lambda_min (T-1 when every step qualifies; 0 when none does)."""
    lambdas = half_log_snr(alphas_cumprod)
    return max(int(np.sum(lambdas >= lambda_min)) - 1, 0)


def solver_max_steps(betas) -> int:
    """The most network calls a few-step solver can make on a process: one per step from its
    start (:func:`solver_start_index`) down to t = 0."""
    return solver_start_index(np.cumprod(1.0 - np.asarray(betas, np.float64))) + 1
