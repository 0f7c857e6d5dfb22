"""SGLD around a checkpoint and the loss traces BIF is computed from (devinterp 2.0.1's sampler).

Each parameter θ with gradient g of the minibatch mean loss (over examples and tokens) moves by

    d = nβ·g + (λ·θ + γ·(θ − θ₀)),   θ ← θ − (lr/2)·d,   θ ← θ + √lr·N(0, σ²),

then, with a bounding box b, is clamped to θ₀ ± b (λ = ``llc_weight_decay``, γ =
``localization``, σ = ``noise_level``), in the order and with the floating-point operations of
devinterp's ``SGMCMC.sgld``. Parameters without a gradient draw no noise, as there.

A chain is a pure function of (seed, chain index): its noise comes from a
:class:`torch.Generator` seeded by :func:`chain_seed`, its minibatches from :func:`batch_order`
(the same for every chain), so any worker can replay it and see the same draws. After
``num_burnin_steps`` steps a draw is taken every ``num_steps_bw_draws`` steps, right after the
step; :func:`run_chain` then calls back with the sampled model, which records whatever losses
the worker needs (:class:`LossRecorder`: its block of training examples, or the queries).

Differences from devinterp, on purpose: the model is in eval mode throughout (devinterp keeps
it in train mode, so dropout is on in its steps and draws), since a chain that is replayed by
several workers must be deterministic; the noise seed is a hash of (seed, chain) unless
``devinterp_seeding`` asks for devinterp's ``seed + chain``, with which the traces of a
dropout-free model equal devinterp's exactly. Not supported: gradient accumulation, parameter
masks, ``init_noise``, the RMSprop preconditioner.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, default_collate

from sdi_pipeline.errors import ConfigError, DataError

__all__ = [
    "ChainStats",
    "DrawFn",
    "LossRecorder",
    "RecordFn",
    "SGLDConfig",
    "SamplingResult",
    "batch_order",
    "chain_seed",
    "initial_loss",
    "loop_step_losses",
    "run_chain",
    "sample",
    "sgld_step",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]
# What a recorder reads from the sampled model: (B,) per-example, (B, T) per-token or
# (B, τ) per-loop-step losses of one batch.
RecordFn = Callable[[nn.Module, Any], torch.Tensor]
DrawFn = Callable[[int, nn.Module], None]
Collate = Callable[[list[Any]], Any]


@dataclass(frozen=True)
class SGLDConfig:
    """SGLD settings, named as devinterp's ``sample()`` names them.

    Attributes:
        lr: step size ε.
        n_beta: inverse temperature nβ (devinterp's default is B/log B for batch size B).
        num_chains, num_draws, batch_size, num_burnin_steps, num_steps_bw_draws: as in
            devinterp; draw d is taken after step ``num_burnin_steps + d·num_steps_bw_draws``
            (0-based), so a chain runs ``num_burnin_steps + (num_draws-1)·num_steps_bw_draws
            + 1`` steps.
        localization: γ, the pull towards θ₀.
        noise_level: σ.
        llc_weight_decay: λ, a Gaussian prior centred at 0.
        bounding_box_size: b; None for no box.
        seed: the chain seeds and the minibatch order derive from it (devinterp's
            ``init_seed``).
        num_init_loss_batches: minibatches whose mean loss at θ₀ is the LLC's reference.
        shuffle: shuffle the minibatch order (devinterp's default).
        devinterp_seeding: seed chain c's noise with ``seed + c`` as devinterp does, to
            reproduce its traces; the default hash keeps runs with nearby seeds from sharing
            streams (under ``seed + c``, seed 100's chain 1 is seed 101's chain 0).
        diverged_above: a chain is stopped as diverged when a minibatch loss is not finite or
            exceeds this many times (1 + |loss at θ₀|).
    """

    lr: float
    n_beta: float
    num_chains: int = 4
    num_draws: int = 200
    batch_size: int = 32
    num_burnin_steps: int = 0
    num_steps_bw_draws: int = 1
    localization: float = 0.0
    noise_level: float = 1.0
    llc_weight_decay: float = 0.0
    bounding_box_size: float | None = None
    seed: int = 100
    num_init_loss_batches: int = 32
    shuffle: bool = True
    devinterp_seeding: bool = False
    diverged_above: float = 10.0

    @property
    def num_steps(self) -> int:
        """Steps per chain: up to and including the last draw's."""
        return self.num_burnin_steps + (self.num_draws - 1) * self.num_steps_bw_draws + 1

    def draw_at(self, step: int) -> int | None:
        """The draw taken right after 0-based ``step``, or None."""
        draw, rest = divmod(step - self.num_burnin_steps, self.num_steps_bw_draws)
        return draw if draw >= 0 and rest == 0 else None

    def check(self) -> None:
        """Refuse settings SGLD cannot run with, one line each, naming the fix."""
        positive = ("num_chains", "num_draws", "batch_size", "num_steps_bw_draws")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"sgld.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "n_beta", "localization", "noise_level", "llc_weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"sgld.{name} must be a finite number >= 0, got {value}")
        if self.lr == 0:
            raise ConfigError("sgld.lr is 0: the chain would not move; set e.g. lr=1e-4")
        if self.num_burnin_steps < 0 or self.num_init_loss_batches < 1:
            raise ConfigError(
                "sgld.num_burnin_steps must be >= 0 and sgld.num_init_loss_batches >= 1, got "
                f"{self.num_burnin_steps} and {self.num_init_loss_batches}"
            )
        if self.bounding_box_size is not None and not self.bounding_box_size > 0:
            raise ConfigError(
                f"sgld.bounding_box_size must be > 0 or null, got {self.bounding_box_size}"
            )
        if not self.diverged_above > 1:
            raise ConfigError(f"sgld.diverged_above must be > 1, got {self.diverged_above}")


def chain_seed(seed: int, chain: int, devinterp: bool = False) -> int:
    """The noise seed of chain ``chain``: a stable hash of (seed, chain), the same on every
    machine and Python (unlike ``hash()``), or devinterp's ``seed + chain``."""
    if devinterp:
        return seed + chain
    digest = hashlib.blake2b(f"sdi-sgld:{seed}:{chain}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # manual_seed takes up to 2**63 - 1


def batch_order(
    n_examples: int, batch_size: int, num_batches: int, seed: int, shuffle: bool = True
) -> torch.Tensor:
    """(num_batches, batch_size) example indices of the minibatches, step by step.

    devinterp's order: a DataLoader (``drop_last``) whose generator is seeded with ``seed``,
    its first epoch replayed cyclically (``itertools.cycle``). Built through the same
    DataLoader so the order stays devinterp's whatever torch does with the generator.
    """
    if n_examples < batch_size:
        raise ConfigError(
            f"sgld.batch_size={batch_size} is larger than the {n_examples} training examples; "
            f"use batch_size <= {n_examples}"
        )
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    loader = DataLoader(
        TensorDataset(torch.arange(n_examples)),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=True,
    )
    epoch = torch.stack([rows for (rows,) in loader])
    repeats = -(-num_batches // len(epoch))
    return epoch.repeat(repeats, 1)[:num_batches]


def sgld_step(
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    config: SGLDConfig,
    generator: torch.Generator | None,
) -> None:
    """One SGLD update of ``params`` in place from their ``.grad`` (θ₀ = ``anchors``).

    Noise is drawn from ``generator`` in the order of ``params``, for those with a gradient.
    """
    lr, wd, loc = config.lr, config.llc_weight_decay, config.localization
    with torch.no_grad():
        for p, anchor in zip(params, anchors, strict=True):
            if p.grad is None:
                continue
            d = p.grad.mul(config.n_beta)
            # The prior terms summed before they join the gradient, as devinterp's
            # CompositePrior does, so the result is the same to the bit.
            prior: torch.Tensor | None = None
            if wd > 0:
                prior = wd * p
            if loc > 0:
                pull = loc * (p - anchor)
                prior = pull if prior is None else prior + pull
            if prior is not None:
                d.add_(prior)
            p.add_(d, alpha=-0.5 * lr)
            noise = torch.normal(
                mean=0.0,
                std=config.noise_level,
                size=p.size(),
                device=p.device,
                generator=generator,
            )
            p.add_(noise, alpha=lr**0.5)
            if config.bounding_box_size is not None:
                box = config.bounding_box_size
                torch.clamp_(p, min=anchor - box, max=anchor + box)


def _collate_rows(dataset: Any, rows: torch.Tensor, collate: Collate) -> Any:
    return collate([dataset[int(i)] for i in rows])


def _batch_loss(model: nn.Module, batch: Any, loss_fn: LossFn) -> torch.Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.dim() not in (1, 2):
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise DataError(
            f"loss_fn must return per-example (B,) or per-token (B, T) losses, got {shape}"
        )
    return loss.float()


def initial_loss(
    model: nn.Module,
    dataset: Any,
    loss_fn: LossFn,
    config: SGLDConfig,
    collate: Collate = default_collate,
) -> float:
    """Mean minibatch loss at θ₀ over the first ``num_init_loss_batches`` minibatches of the
    chains' order (devinterp's ``init_loss``), in eval mode."""
    order = batch_order(
        len(dataset),
        config.batch_size,
        config.num_init_loss_batches,
        config.seed,
        config.shuffle,
    )
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for rows in order:
                loss = _batch_loss(model, _collate_rows(dataset, rows, collate), loss_fn)
                total += float(loss.mean())
    finally:
        model.train(was_training)
    value = total / len(order)
    if not math.isfinite(value):
        raise DataError(f"the loss at the checkpoint is {value}: check the model and loss_fn")
    return value


@dataclass
class ChainStats:
    """One chain's by-products: ``step_losses`` (steps,) the minibatch mean loss of every
    step (burn-in included) before its update, and the noise ``seed`` it ran with."""

    chain: int
    seed: int
    step_losses: torch.Tensor


def _diverged(config: SGLDConfig, chain: int, step: int, loss: float, init: float) -> ConfigError:
    return ConfigError(
        f"SGLD chain {chain} diverged at step {step}: minibatch loss {loss:.4g} against "
        f"{init:.4g} at the checkpoint; lr={config.lr:g} with n_beta={config.n_beta:g} is too "
        f"large a step: try lr={config.lr / 10:g} (or a larger localization)"
    )


def run_chain(
    model: nn.Module,
    dataset: Any,
    loss_fn: LossFn,
    config: SGLDConfig,
    chain: int,
    on_draw: DrawFn,
    *,
    init_loss: float,
    collate: Collate = default_collate,
    param_names: Sequence[str] | None = None,
) -> ChainStats:
    """Run SGLD chain ``chain`` on a copy of ``model``, calling ``on_draw(draw, sampled)`` at
    each draw (under ``torch.no_grad``, the copy in eval mode).

    ``dataset[i]`` are examples, ``collate`` makes batches, ``loss_fn(model, batch)`` returns
    (B,) or (B, T) losses whose mean over all elements is the minibatch loss (devinterp's:
    per-token cross-entropy, averaged over examples and tokens). ``param_names`` (default:
    all) are sampled, the others kept fixed. ``init_loss`` (:func:`initial_loss`) is the
    reference the divergence check compares against.

    Raises:
        ConfigError: the chain diverged (a minibatch loss not finite or above
            ``diverged_above`` × (1 + |init_loss|)); the message suggests a smaller lr.
    """
    config.check()
    sampled = copy.deepcopy(model)
    sampled.eval()
    named = dict(sampled.named_parameters())
    names = list(named) if param_names is None else list(param_names)
    unknown = [n for n in names if n not in named]
    if unknown:
        raise ConfigError(f"sgld parameters {unknown} are not parameters of the model")
    for name, p in named.items():
        p.requires_grad_(name in names)
    params = [named[n] for n in names]
    anchors = [p.detach().clone() for p in params]
    seed = chain_seed(config.seed, chain, config.devinterp_seeding)
    device = params[0].device if params else torch.device("cpu")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    order = batch_order(
        len(dataset), config.batch_size, config.num_steps, config.seed, config.shuffle
    )
    limit = config.diverged_above * (1 + abs(init_loss))
    step_losses = torch.empty(config.num_steps, dtype=torch.float64)
    for step, rows in enumerate(order):
        loss = _batch_loss(sampled, _collate_rows(dataset, rows, collate), loss_fn).mean()
        value = float(loss.detach())
        step_losses[step] = value
        if not (math.isfinite(value) and value <= limit):
            raise _diverged(config, chain, step, value, init_loss)
        loss.backward()
        sgld_step(params, anchors, config, generator)
        for p in params:
            p.grad = None
        draw = config.draw_at(step)
        if draw is not None:
            with torch.no_grad():
                on_draw(draw, sampled)
    return ChainStats(chain, seed, step_losses)


class LossRecorder:
    """Records the losses of fixed batches at every draw of every chain.

    ``traces`` (chains, draws, N, K) float32: the K losses per example that ``fn(model,
    batch)`` returns for the N examples of ``batches`` in order (K = 1 for per-example
    losses (B,), T tokens for (B, T), τ loop steps for :func:`loop_step_losses`).
    """

    def __init__(self, batches: Sequence[Any], fn: RecordFn, num_chains: int, num_draws: int):
        if not batches:
            raise DataError("no batches to record losses of: the example set is empty")
        self.batches = list(batches)
        self.fn = fn
        self.num_chains = num_chains
        self.num_draws = num_draws
        self.traces: torch.Tensor | None = None

    def record(self, chain: int, draw: int, model: nn.Module) -> None:
        """Store the losses of every batch under ``model`` as (chain, draw)."""
        parts = []
        with torch.no_grad():
            for batch in self.batches:
                loss = self.fn(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.dim() not in (1, 2):
                    raise DataError(
                        "a recorded loss must be (B,), (B, tokens) or (B, loop steps), got "
                        f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else loss!r}"
                    )
                parts.append((loss[:, None] if loss.dim() == 1 else loss).float().cpu())
        widths = {p.shape[1] for p in parts}
        if len(widths) > 1:
            raise DataError(
                f"recorded batches have different widths {sorted(widths)}: pad them to one "
                "length (per-token traces need one position axis)"
            )
        values = torch.cat(parts)
        if not torch.isfinite(values).all():
            raise DataError(
                f"non-finite recorded loss at chain {chain}, draw {draw}: the chain left the "
                "region where the model is defined; lower sgld.lr"
            )
        traces = self.traces
        if traces is None:
            traces = self.traces = torch.full(
                (self.num_chains, self.num_draws, *values.shape), math.nan
            )
        traces[chain, draw] = values


class _Margins(Protocol):
    margins: torch.Tensor


def loop_step_losses(trace_fn: Callable[[nn.Module, Any], _Margins | torch.Tensor]) -> RecordFn:
    """A :class:`LossRecorder` function giving each example's loss read out after every loop
    step, (B, τ), from ``trace_fn(model, batch)``.

    ``trace_fn`` returns either per-step losses (B, τ) itself, or a LoopTrace
    (``sdi_pipeline.dynamics``) whose ``margins`` (B, τ) are turned into the loss
    softplus(−margin): the cross-entropy for two classes, a lower bound on it for more.
    """

    def fn(model: nn.Module, batch: Any) -> torch.Tensor:
        out = trace_fn(model, batch)
        if isinstance(out, torch.Tensor):
            return out
        return F.softplus(-out.margins.float())

    return fn


@dataclass
class SamplingResult:
    """What :func:`sample` gives: ``traces[name]`` (chains, draws, N, K) per recorder,
    ``init_loss`` at θ₀, ``step_losses`` (chains, steps) and the LLC estimate λ̂ =
    nβ·(mean sampled loss − init_loss), over all steps (burn-in included, as devinterp), per
    chain (``llc_per_chain``) and their mean and population std."""

    traces: dict[str, torch.Tensor]
    init_loss: float
    step_losses: torch.Tensor
    llc_per_chain: torch.Tensor
    llc_mean: float
    llc_std: float


def sample(
    model: nn.Module,
    dataset: Any,
    loss_fn: LossFn,
    config: SGLDConfig,
    recorders: Mapping[str, LossRecorder],
    *,
    collate: Collate = default_collate,
    param_names: Sequence[str] | None = None,
) -> SamplingResult:
    """Run every chain in turn, recording with each of ``recorders`` at every draw.

    In a distributed run each worker calls :func:`run_chain` itself for its chains (or replays
    them) with recorders for its own examples; this is the single-process form.
    """
    config.check()
    for name, recorder in recorders.items():
        if (recorder.num_chains, recorder.num_draws) != (config.num_chains, config.num_draws):
            raise ConfigError(
                f"recorder {name!r} holds {recorder.num_chains} chains x {recorder.num_draws} "
                f"draws, the sampler runs {config.num_chains} x {config.num_draws}"
            )
    init = initial_loss(model, dataset, loss_fn, config, collate)
    stats = []
    for chain in range(config.num_chains):

        def on_draw(draw: int, sampled: nn.Module, chain: int = chain) -> None:
            for recorder in recorders.values():
                recorder.record(chain, draw, sampled)

        stats.append(
            run_chain(
                model,
                dataset,
                loss_fn,
                config,
                chain,
                on_draw,
                init_loss=init,
                collate=collate,
                param_names=param_names,
            )
        )
    step_losses = torch.stack([s.step_losses for s in stats])
    llc = config.n_beta * (step_losses.mean(dim=1) - init)
    traces = {}
    for name, recorder in recorders.items():
        assert recorder.traces is not None  # every draw recorded: num_draws >= 1
        traces[name] = recorder.traces
    return SamplingResult(
        traces, init, step_losses, llc, float(llc.mean()), float(llc.std(correction=0))
    )
