"""Reverse-process samplers as values: which sampler, over how many steps, with which settings.

A sampler is described by one :class:`SamplerSpec` — its kind (:data:`SAMPLER_KINDS`), its steps,
DDIM's eta, whether predicted images are clipped, and a solver's time grid and order — parsed and
checked here and nowhere else: the config's ``sample`` group (:func:`from_config`), ``run.py``'s
``--sampler`` / ``--steps`` / ``--ddim`` / ``--eta`` / ``--grid`` / ``--order`` flags (which set
those fields), the FID sweep (:func:`sweep_specs`), the ablation study and the benchmark all
describe samplers this way, and :func:`tf_iddpm.inference.build_sampler` turns a spec into the
compiled loop.  The exported sampler takes the same kinds per request (``export/export_lib.py``).

What ``steps`` means: every kind calls the network ``steps`` times per image (the NFE).  For the
paper's samplers it is a respacing of the trained T-step process (Section 4;
:func:`tf_iddpm.schedules.space_timesteps`): ``""`` every step, ``"50"`` 50 evenly strided steps,
``"ddim50"`` the DDIM paper's fixed stride, ``"10,15,20"`` sections.  For the solvers (DPM-Solver++
2M / 3M / SDE-2M, UniPC; :mod:`tf_iddpm.solvers`) it is the number of calls itself, ``"20"``, and
``grid`` places them.

Adding a sampler kind: one row in :data:`SAMPLER_KINDS` (its name and what it needs), and its
chain in :mod:`tf_iddpm.chains` (its math in :mod:`tf_iddpm.solvers`).

Nothing here imports TensorFlow, so configs and flags are checked before it loads.
"""

import dataclasses
from math import inf
from typing import List, Optional, Sequence, Tuple

from tf_iddpm import schedules


@dataclasses.dataclass(frozen=True)
class SamplerKind:
    """What one kind of sampler is and which settings it takes.

    Attributes:
      name: the value of ``sample.sampler`` / ``--sampler``.
      description: one line for help texts, tables and plots.
      takes_eta: whether ``eta`` applies (DDIM's noise level); other kinds need eta = 0.
      solver: a few-step ODE/SDE solver: ``steps`` is its number of network calls, ``grid``
        chooses its timesteps.
      orders: the orders ``order`` may choose (empty: fixed by the kind).
      order: the kind's order (its default when ``orders`` is not empty).
    """

    name: str
    description: str
    takes_eta: bool = False
    solver: bool = False
    orders: Tuple[int, ...] = ()
    order: int = 1


SAMPLER_KINDS = {
    kind.name: kind
    for kind in (
        SamplerKind(
            "ancestral",
            "strided ancestral sampling of p(x_{t-1} | x_t) with the model's variances "
            "(the paper's, Section 4)",
        ),
        SamplerKind("ddim", "DDIM (Song et al. 2020); eta = 0 is deterministic", takes_eta=True),
        SamplerKind(
            "dpmpp_2m", "DPM-Solver++(2M), multistep, data prediction", solver=True, order=2
        ),
        SamplerKind("dpmpp_3m", "DPM-Solver++(3M)", solver=True, order=3),
        SamplerKind("dpmpp_2m_sde", "SDE-DPM-Solver++(2M), stochastic", solver=True, order=2),
        SamplerKind(
            "unipc",
            "UniPC-bh2 predictor-corrector (the corrector costs no network call)",
            solver=True,
            orders=(1, 2, 3),
            order=2,
        ),
    )
}

# The time grids of the solvers (tf_iddpm.solvers.solver_timesteps): uniform in lambda =
# log(alpha/sigma) (DPM-Solver's default), in t, or Karras et al.'s.
SOLVER_GRIDS = ("logsnr", "time_uniform", "karras")

# Values of steps and sweep points that mean "every step of the trained process".
FULL_CHAIN_TOKENS = ("full", "all")


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """One sampler: kind, steps, eta, clipping, and a solver's grid and order.

    Attributes:
      kind: a key of :data:`SAMPLER_KINDS`.
      steps: ancestral and DDIM: the respacing of the trained process ("" = every step, "50",
        "ddim50", "10,15,20"); solvers: the number of network calls, "K".
      eta: DDIM's eta in [0, 1] (0 = deterministic); 0 for kinds that take none.
      clip_denoised: clip each predicted x_0 to [-1, 1], as the reference does.
      grid: a solver's time grid, one of :data:`SOLVER_GRIDS`.
      order: the order of a kind that offers several (UniPC: 1-3); 0 = the kind's default.
      guidance_scale: classifier-free guidance s (Ho & Salimans 2022) for class-conditional
        models trained with label dropout: the network's prediction becomes
        uncond + s (cond - uncond); 1 = the plain conditional model, 0 = the unconditional one.
    """

    kind: str = "ancestral"
    steps: str = ""
    eta: float = 0.0
    clip_denoised: bool = True
    grid: str = "logsnr"
    order: int = 0
    guidance_scale: float = 1.0

    def errors(self, num_timesteps: int, *, betas=None, prefix: str = "sample.") -> List[str]:
        """Every problem of this spec for a T-step process, each naming its field.

        Args:
          num_timesteps: T of the trained process.
          betas: the process's float64 betas; when given, a solver's number of calls is checked
            against the steps it can take (:func:`tf_iddpm.schedules.solver_max_steps`).
          prefix: how the fields are named in messages (``"sample."`` for the config group).
        """
        problems = []
        kind = SAMPLER_KINDS.get(self.kind)
        if kind is None:
            problems.append(
                f"{prefix}sampler={self.kind!r} is unknown; the samplers are: "
                f"{', '.join(SAMPLER_KINDS)}"
            )
        if not isinstance(self.steps, str):
            problems.append(f"{prefix}timestep_respacing={self.steps!r} must be a string")
        elif kind is not None and kind.solver:
            problems.extend(self._solver_errors(kind, num_timesteps, betas, prefix))
        elif self.steps and num_timesteps > 0:
            try:
                schedules.space_timesteps(num_timesteps, self.steps)
            except ValueError as e:
                problems.append(
                    f"{prefix}timestep_respacing={self.steps!r} is not a valid respacing of "
                    f"diffusion.steps={num_timesteps}: {e}"
                )
        if kind is not None and not kind.solver:
            if self.grid != SamplerSpec.grid:
                problems.append(
                    f"{prefix}grid={self.grid!r} applies to the solvers; the {self.kind} sampler "
                    f"takes the respacing's steps"
                )
            if self.order:
                problems.append(f"{prefix}solver_order={self.order} applies to the solvers")
        if not 0.0 <= self.eta <= 1.0:
            problems.append(f"{prefix}eta={self.eta!r} must lie in [0, 1] (0 = deterministic)")
        elif self.eta and kind is not None and not kind.takes_eta:
            takers = [k.name for k in SAMPLER_KINDS.values() if k.takes_eta]
            problems.append(
                f"{prefix}eta={self.eta} only applies to {' and '.join(takers)}; the "
                f"{self.kind} sampler needs eta 0 (run.py --sampler={takers[0]} to use it)"
            )
        if not isinstance(self.clip_denoised, bool):
            problems.append(f"{prefix}clip_denoised={self.clip_denoised!r} must be a bool")
        if not (isinstance(self.guidance_scale, (int, float)) and 0.0 <= self.guidance_scale < inf):
            problems.append(
                f"{prefix}guidance_scale={self.guidance_scale!r} must be a finite number >= 0 "
                "(1 = the plain conditional model, 0 = the unconditional one, > 1 guided)"
            )
        return problems

    def _solver_errors(self, kind, num_timesteps, betas, prefix) -> List[str]:
        problems = []
        if self.grid not in SOLVER_GRIDS:
            problems.append(
                f"{prefix}grid={self.grid!r} is unknown; the grids are: {', '.join(SOLVER_GRIDS)}"
            )
        if self.order and self.order not in kind.orders:
            offered = (
                f"orders {', '.join(map(str, kind.orders))}"
                if kind.orders
                else f"only its own order {kind.order}"
            )
            problems.append(f"{prefix}solver_order={self.order}: {self.kind} offers {offered}")
        if not self.steps.isdigit() or int(self.steps) < 1:
            problems.append(
                f"{prefix}timestep_respacing={self.steps!r}: the {self.kind} solver needs its "
                "number of network calls, a positive integer such as '20'"
            )
            return problems
        calls = int(self.steps)
        order = self.order if self.order in kind.orders else kind.order
        if calls < order:
            problems.append(
                f"{prefix}timestep_respacing={self.steps!r}: {self.kind} of order {order} needs "
                f"at least {order} network calls"
            )
        most = num_timesteps if betas is None else schedules.solver_max_steps(betas)
        if calls > most:
            problems.append(
                f"{prefix}timestep_respacing={self.steps!r}: {self.kind} can make at most {most} "
                f"network calls on this process (one per step from its start at lambda >= "
                f"{schedules.SOLVER_LAMBDA_MIN} to t = 0)"
            )
        return problems

    def check(self, num_timesteps: int, *, betas=None) -> "SamplerSpec":
        """Raises ValueError listing :meth:`errors`; returns the spec itself."""
        problems = self.errors(num_timesteps, betas=betas)
        if problems:
            raise ValueError("invalid sampler:\n  - " + "\n  - ".join(problems))
        return self

    def num_steps(self, num_timesteps: int) -> int:
        """Network calls per image on a T-step process (the chain's steps)."""
        if SAMPLER_KINDS[self.kind].solver:
            return int(self.steps)
        if not self.steps:
            return int(num_timesteps)
        return len(schedules.space_timesteps(num_timesteps, self.steps))

    def replace(self, **changes) -> "SamplerSpec":
        return dataclasses.replace(self, **changes)

    def label(self, num_timesteps: int) -> str:
        """E.g. "ddim (eta 0.5), 50 steps" for logs, tables and file names."""
        kind = SAMPLER_KINDS[self.kind]
        details = []
        if kind.takes_eta:
            details.append(f"eta {self.eta:g}")
        if kind.orders and self.order:
            details.append(f"order {self.order}")
        if kind.solver and self.grid != SamplerSpec.grid:
            details.append(f"{self.grid} grid")
        if self.guidance_scale != 1.0:
            details.append(f"guidance {self.guidance_scale:g}")
        extra = f" ({', '.join(details)})" if details else ""
        return f"{self.kind}{extra}, {self.num_steps(num_timesteps)} steps"


def from_config(sample) -> SamplerSpec:
    """The sampler of a config's ``sample`` group (``sample.sampler``, ``timestep_respacing``,
    ``eta``, ``clip_denoised``, ``grid``, ``solver_order``), not yet checked (see
    :meth:`SamplerSpec.errors`)."""
    return SamplerSpec(
        kind=sample["sampler"],
        steps=sample["timestep_respacing"],
        eta=float(sample["eta"]),
        clip_denoised=sample["clip_denoised"],
        grid=sample["grid"],
        order=int(sample["solver_order"]),
        guidance_scale=float(sample["guidance_scale"]),
    )


def guidance_error(
    spec: SamplerSpec, *, class_cond: bool, has_null_label: bool, prefix: str = "sample."
) -> Optional[str]:
    """Why a model cannot be sampled with ``spec``'s guidance scale, or None.

    Guidance other than 1 needs the unconditional prediction, which only a class-conditional
    model trained with label dropout (``model.class_dropout > 0``) makes: it has a null label.
    Published improved-diffusion checkpoints have none.
    """
    if spec.guidance_scale == 1.0:
        return None
    if not class_cond:
        return (
            f"{prefix}guidance_scale={spec.guidance_scale:g} needs a class-conditional model; "
            "this one is unconditional (leave it at 1)"
        )
    if not has_null_label:
        return (
            f"{prefix}guidance_scale={spec.guidance_scale:g} needs a model trained with label "
            "dropout (model.class_dropout > 0, e.g. 0.1), which gives it a null label for the "
            "unconditional prediction; this model was trained on labels only (as imported "
            "improved-diffusion checkpoints were), so only guidance_scale=1 is defined for it"
        )
    return None


def parse_kinds(text: str, *, field: str) -> Tuple[str, ...]:
    """ "ancestral,ddim" -> ("ancestral", "ddim"), each a known kind, none twice.

    Raises:
      ValueError: naming ``field``, the bad names and the known kinds.
    """
    names = [name.strip() for name in str(text).split(",") if name.strip()]
    unknown = [name for name in names if name not in SAMPLER_KINDS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(
            f"{field}={text!r} must name samplers from {', '.join(SAMPLER_KINDS)}, "
            "comma-separated, each once"
            + (f" ({', '.join(map(repr, unknown))} unknown)" if unknown else "")
        )
    return tuple(names)


def parse_sweep_steps(text: str, num_timesteps: int, *, field: str) -> Tuple[str, ...]:
    """A sweep's step counts: "25,50,full" -> ("25", "50", "") as respacings of a T-step process.

    Raises:
      ValueError: naming ``field``, for a token that is not a step count in [1, T] or "full".
    """
    steps = []
    for token in (t.strip() for t in str(text).split(",")):
        if not token:
            continue
        if token in FULL_CHAIN_TOKENS:
            steps.append("")
        elif not token.isdigit() or not 1 <= int(token) <= num_timesteps:
            raise ValueError(
                f"{field}={text!r}: {token!r} is not a step count in [1, diffusion.steps="
                f"{num_timesteps}] or 'full'; e.g. '25,50,100,250,full'"
            )
        else:
            steps.append(str(int(token)))
    return tuple(steps)


def parse_guidance_sweep(text: str, *, field: str = "fid.guidance_sweep") -> Tuple[float, ...]:
    """ "0,1,1.5,3" -> (0.0, 1.0, 1.5, 3.0): guidance scales, each finite and >= 0, none twice.

    Raises:
      ValueError: naming ``field`` and the bad token.
    """
    scales = []
    for token in (t.strip() for t in str(text).split(",")):
        if not token:
            continue
        try:
            scale = float(token)
        except ValueError:
            scale = -1.0
        if not 0.0 <= scale < inf or scale in scales:
            raise ValueError(
                f"{field}={text!r}: {token!r} is not a new guidance scale (finite, >= 0); "
                "e.g. '0,1,1.5,2,3,5'"
            )
        scales.append(scale)
    return tuple(scales)


def sweep_specs(
    base: SamplerSpec,
    steps_text: str,
    kinds_text: str,
    num_timesteps: int,
    *,
    betas=None,
    guidance_text: str = "",
) -> List[SamplerSpec]:
    """The samplers of a sweep: every kind of ``kinds_text`` at every step count of
    ``steps_text``, or ``base`` at every guidance scale of ``guidance_text``.

    Each point keeps ``base``'s clipping and guidance; eta is ``base.eta`` for kinds that take
    it, grid and order ``base``'s for the solvers.  "full" (every step of the process) is a point
    of the paper's samplers only.  Without either sweep: ``[base]``.

    Raises:
      ValueError: for malformed sweep fields (``fid.sweep``, ``fid.sweep_samplers``,
        ``fid.guidance_sweep``), both sweeps at once, or a point a sampler cannot take.
    """
    scales = parse_guidance_sweep(guidance_text)
    steps = parse_sweep_steps(steps_text, num_timesteps, field="fid.sweep")
    if scales and steps:
        raise ValueError(
            "fid.sweep and fid.guidance_sweep are both given: sweep the steps or the guidance "
            "scale, one at a time"
        )
    if scales:
        return [base.replace(guidance_scale=scale) for scale in scales]
    if not steps:
        return [base]
    specs, problems = [], []
    for name in parse_kinds(kinds_text, field="fid.sweep_samplers"):
        kind = SAMPLER_KINDS[name]
        for point in steps:
            if kind.solver and not point:
                continue  # a solver's point is a number of calls
            spec = SamplerSpec(
                kind=name,
                steps=point,
                eta=base.eta if kind.takes_eta else 0.0,
                clip_denoised=base.clip_denoised,
                grid=base.grid if kind.solver else SamplerSpec.grid,
                order=base.order if kind.orders else 0,
                guidance_scale=base.guidance_scale,
            )
            problems.extend(spec.errors(num_timesteps, betas=betas, prefix=f"fid.sweep ({name}): "))
            specs.append(spec)
    if problems:
        raise ValueError("; ".join(problems))
    return specs


def describe_kinds(kinds: Sequence[str] = tuple(SAMPLER_KINDS)) -> str:
    """ "ancestral: ...; ddim: ..." for flag help texts."""
    return "; ".join(f"{name}: {SAMPLER_KINDS[name].description}" for name in kinds)
