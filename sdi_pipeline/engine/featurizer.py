"""Per-example, per-loop-step gradient features: sketched (default) or exact.

:class:`StepFeaturizer` turns batches into ``values[i, s, :]``: the gradient of example i's
loss with respect to the target parameters *as used in slot s* (prelude, loop step, readout),
either sketched into m dimensions or materialised exactly (small models; the baseline).
Summing over slots gives the ordinary per-example gradient (or its sketch).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator, Sequence, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from sdi_pipeline.engine.capture import StepCapture
from sdi_pipeline.engine.kernels import Workspace
from sdi_pipeline.engine.layers.generic import GenericHandler
from sdi_pipeline.engine.registry import HandlerClass, LayerHandler, TargetParam
from sdi_pipeline.engine.slots import SlotLayout
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.engine.targets import (
    classify,
    collect_target_params,
    lift_uncalled,
    resolve_target_modules,
)
from sdi_pipeline.errors import DataError, UnsupportedModel
from sdi_pipeline.messages import shortened

LossFn = Callable[[nn.Module, Any], torch.Tensor]
# Which tokens' losses get their own query features: every position, each example's last
# position with a nonzero loss (the answer), or these positions (negative from the end).
TokenChoice = str | Sequence[int]


@dataclass
class StepFeatures:
    """Features of N examples: ``values`` (N, slots, width) float32 and ``loss`` (N,).

    With a token choice, also ``tokens`` (N, slots, P, width): slot s's gradient of the loss
    *at token position* ``positions[i, p]`` alone (N, P), for P chosen tokens per example.
    ``norms`` (N, slots): the L2 norm of each example's features in each slot, as
    ``torch.linalg.vector_norm(values, dim=2)`` gives it (the featurizer's finite check
    computes it on the way, so scoring need not read the features again for its norm
    diagnostic); None where not computed.
    """

    values: torch.Tensor
    loss: torch.Tensor
    layout: SlotLayout
    tokens: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    norms: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def summed(self) -> torch.Tensor:
        """(N, width): the whole per-example gradient (or its sketch), all slots summed."""
        return self.values.sum(dim=1)

    @staticmethod
    def concat(parts: Sequence[StepFeatures]) -> StepFeatures:
        """Stack features of consecutive batches (all with the same layout)."""
        if not parts:
            raise DataError("no batches to featurize: the data loader is empty")
        if len(parts) == 1:
            return parts[0]  # one batch: spares a copy of all its features
        tokens = positions = None
        if parts[0].tokens is not None:
            widths = {int(p.tokens.shape[2]) for p in parts if p.tokens is not None}
            if len(widths) > 1:
                raise DataError(
                    f"batches chose different numbers of tokens ({sorted(widths)}): "
                    "query_tokens='all' needs every batch of one length; pad the query set "
                    "to one length or choose 'last' or a list of positions"
                )
            tokens = torch.cat([p.tokens for p in parts if p.tokens is not None])
            positions = torch.cat([p.positions for p in parts if p.positions is not None])
        norms = None
        if all(p.norms is not None for p in parts):
            norms = torch.cat([p.norms for p in parts if p.norms is not None])
        return StepFeatures(
            torch.cat([p.values for p in parts]),
            torch.cat([p.loss for p in parts]),
            parts[0].layout,
            tokens,
            positions,
            norms,
        )


def token_positions(
    token_loss: torch.Tensor, choice: TokenChoice, first_index: int
) -> torch.Tensor:
    """(B, P) positions of the chosen tokens in per-token losses (B, L)."""
    b, length = token_loss.shape
    if choice == "all":
        return torch.arange(length, device=token_loss.device).expand(b, length)
    if choice == "last":
        nonzero = token_loss.detach() != 0
        empty = torch.nonzero(~nonzero.any(dim=1)).flatten() + first_index
        if len(empty):
            raise DataError(
                f"query_tokens='last': examples {shortened(int(i) for i in empty)} have no "
                "token with a nonzero loss (the last one is taken as the answer)"
            )
        index = torch.arange(length, device=token_loss.device)
        return (index * nonzero).argmax(dim=1, keepdim=True)
    if isinstance(choice, str) or not all(isinstance(p, int) for p in choice) or not choice:
        raise DataError(
            f"query_tokens must be 'all', 'last' or a list of token positions, got {choice!r}"
        )
    bad = [p for p in choice if not -length <= p < length]
    if bad:
        raise DataError(
            f"query_tokens positions {bad} are outside the per-token loss's {length} positions"
        )
    wanted = torch.tensor([p % length for p in choice], device=token_loss.device)
    return wanted.expand(b, len(choice))


def _token_lengths(batch: Any, examples: int) -> set[int]:
    """The lengths the batch's per-example sequences have (dim 1 of its tensors of two or
    more dims with the examples on dim 0): what token-flattened rows may number per example."""
    return {
        int(t.shape[1])
        for t in tree_leaves(batch)
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[0] == examples
    }


def _leaves_reached(loss: object) -> set[int]:
    """The ids of the tensors whose gradient the loss's autograd graph accumulates."""
    if not isinstance(loss, torch.Tensor) or loss.grad_fn is None:
        return set()
    seen: set[int] = set()
    found: set[int] = set()
    stack: list[Any] = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # an AccumulateGrad node's leaf
        if isinstance(variable, torch.Tensor):
            found.add(id(variable))
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return found


def _inside(name: str, ancestor: str) -> bool:
    return ancestor == "" or name.startswith(f"{ancestor}.")


def _batch_size_hint(batch: Any) -> int | None:
    """Dim 0 of the batch's first tensor: lets calls broadcast over the batch be expanded.

    The loss's length is checked against it (a loss_fn may slice the batch otherwise)."""
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def _distinct(uses: list[TargetParam]) -> list[TargetParam]:
    # One entry per parameter (a tied one has several uses, one per using module).
    return list({p.name: p for p in reversed(uses)}.values())[::-1]


def target_params(
    model: nn.Module, targets: Sequence[str | nn.Module] | str | nn.Module
) -> list[TargetParam]:
    """The parameters a :class:`StepFeaturizer` of ``targets`` analyses (its ``params``), in
    its order, without choosing their layer handlers (which may import Opacus)."""
    return _distinct(collect_target_params(model, resolve_target_modules(model, targets))[0])


class StepFeaturizer:
    """Per-example per-step gradient sketches (or exact gradients) of target modules.

    Args:
        model: the model; ``loss_fn(model, batch)`` must run it.
        targets: module names, glob patterns over ``named_modules()``, or modules: the looped
            block, and optionally single-use modules before/after the loop (binned into a
            prelude / readout slot).
        spec: the sketch; ``None`` materialises exact gradients (small models only).
        expected_steps: if given, the loop step count the targets must show.
        loop_entry: a module name or pattern whose every call opens a loop pass (the
            outermost matches count); None infers it from the order of calls.

    The model is put in eval mode while featurizing (dropout off) and restored after.
    Parameters the first forward pass reads without calling their module (``F.conv1d(x,
    self.conv1d.weight)``) are captured at the nearest called ancestor through the generic
    fallback; :attr:`lifted` and :attr:`assignment` say which.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: Sequence[str | nn.Module] | str | nn.Module,
        spec: SketchSpec | None = SketchSpec(),
        *,
        expected_steps: int | None = None,
        loop_entry: str | None = None,
    ) -> None:
        self.model = model
        self.spec = spec
        self.expected_steps = expected_steps
        self.target_modules = resolve_target_modules(model, targets)
        entry = None
        if loop_entry is not None:
            try:
                named = resolve_target_modules(model, [loop_entry])
            except UnsupportedModel as err:
                raise UnsupportedModel(f"loop_entry: {err}") from None
            outer = [n for n in named if not any(_inside(n, o) for o in named if o != n)]
            entry = (loop_entry, outer)
        uses, owners = collect_target_params(model, self.target_modules)
        self.params = _distinct(uses)
        offsets: dict[str, int] | None = None
        if spec is None:
            offsets, total = {}, 0
            for p in self.params:
                offsets[p.name] = total
                total += p.numel
            self.width = total
        else:
            self.width = spec.m
        self._offsets = offsets
        self._uses = uses
        self._workspace = Workspace()  # one scratch buffer shared by all handlers
        #: Parameters read without a call of their module: name -> the module capturing them.
        self.lifted: dict[str, str] = {}
        self._probed = False  # whether a forward pass has shown which modules run
        self.handlers = self._make_handlers(uses, classify(owners, uses))
        self._capture = StepCapture(model, self.handlers, entry)

    def _make_handlers(
        self, uses: Sequence[TargetParam], classes: dict[str, HandlerClass]
    ) -> dict[str, LayerHandler]:
        by_module: dict[str, list[TargetParam]] = {}
        for p in uses:
            by_module.setdefault(p.module_name, []).append(p)
        return {
            name: handler(
                self.model.get_submodule(name),
                by_module[name],
                self.spec,
                self._offsets,
                self._workspace,
            )
            for name, handler in classes.items()
        }

    def _lift(self, ran: set[str], called: set[str], loss: object) -> bool:
        """Move the target parameters that the loss reads but whose modules did not run to
        their nearest called ancestor (generic fallback there); whether any moved.
        Parameters the loss does not read stay, to be refused by name."""
        read = _leaves_reached(loss)
        uncalled = set(self.handlers) - ran
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        names = {by_id[i] for i in read if i in by_id}
        uses, lifted = lift_uncalled(self._uses, uncalled, called, names)
        if not lifted:
            return False
        holders = set(lifted.values())
        rest = [p for p in uses if p.module_name not in holders]
        classes = classify(
            {p.module_name: self.model.get_submodule(p.module_name) for p in rest}, rest
        )
        for name in holders:
            classes[name] = GenericHandler  # what it does with the parameters is unknown
        self._uses, self.lifted = uses, lifted
        self.handlers = self._make_handlers(uses, classes)
        self._capture.set_handlers(self.handlers)
        return True

    @property
    def exact(self) -> bool:
        return self.spec is None

    @property
    def assignment(self) -> str | None:
        """What the last batch showed, in words: ``4 loop steps of block.* (6 modules),
        prelude: tok_emb``, and the parameters read without a call; None before the first
        batch."""
        text = self._capture.assignment
        if text is None or not self.lifted:
            return text
        moves = ", ".join(f"{p} -> {m or '(model)'}" for p, m in sorted(self.lifted.items()))
        return f"{text}; read without a call, captured at the caller: {moves}"

    @contextmanager
    def _watch_ancestors(self) -> Iterator[set[str]]:
        """The names of the target modules' ancestors called while the context is open."""
        called: set[str] = set()
        names = set()
        for name in self.handlers:
            parts = name.split(".")
            names.update(".".join(parts[:k]) for k in range(len(parts)))
        handles = [
            self.model.get_submodule(n).register_forward_pre_hook(lambda *_, n=n: called.add(n))
            for n in sorted(names - set(self.handlers))
        ]
        try:
            yield called
        finally:
            for handle in handles:
                handle.remove()

    def _batch(
        self, batch: Any, loss_fn: LossFn, first_index: int, tokens: TokenChoice | None
    ) -> StepFeatures:
        self._capture.reset(_batch_size_hint(batch))
        if self._probed:
            token_loss = loss_fn(self.model, batch)
        else:
            with self._watch_ancestors() as called:
                token_loss = loss_fn(self.model, batch)
            self._probed = True
            ran = self._capture.modules_called()
            if ran and ran != set(self.handlers) and self._lift(ran, called, token_loss):
                return self._batch(batch, loss_fn, first_index, tokens)  # with them moved
        if not isinstance(token_loss, torch.Tensor):
            raise DataError(
                f"loss_fn must return a tensor of per-example losses, got {type(token_loss)}"
            )
        if token_loss.dim() not in (1, 2):
            raise DataError(
                f"loss_fn must return one loss per example, shape (B,), or per-token losses "
                f"(B, L) that sum to it; got shape {tuple(token_loss.shape)}. Use "
                "reduction='none' and reduce over tokens only."
            )
        if tokens is not None and token_loss.dim() != 2:
            raise DataError(
                "per-token query features (query_tokens) need a loss_fn that returns per-token "
                "losses (B, L) summing to each example's loss; it returned shape "
                f"{tuple(token_loss.shape)} (e.g. next_token_loss with per_token: true)"
            )
        loss = token_loss.sum(dim=1) if token_loss.dim() == 2 else token_loss
        bad = torch.nonzero(~torch.isfinite(loss.detach())).flatten() + first_index
        if len(bad):
            raise DataError(
                f"non-finite loss (NaN or inf) for examples {shortened(int(i) for i in bad)}"
            )
        layout = self._capture.finish_forward(
            loss.shape[0], self.expected_steps, _token_lengths(batch, loss.shape[0])
        )
        if not loss.requires_grad:
            raise DataError(
                "the loss does not depend on the target modules' outputs (it does not require "
                "grad): check that loss_fn uses the model's output."
            )
        # Example-major, as returned: each call scatters into its slot's (B, width) view
        # (rows S * width apart, which index_add_ handles as fast as contiguous rows), so
        # no slot-major -> example-major copy is needed.
        shape = (loss.shape[0], layout.n_slots, self.width)
        values = torch.zeros(shape, dtype=torch.float32, device=loss.device)
        per_token = positions = None
        if tokens is not None:
            # One backward per chosen token, of that token's loss alone; the graph is kept
            # for the next one and the whole loss's backward comes last.
            positions = token_positions(token_loss, tokens, first_index)
            rows = torch.arange(loss.shape[0], device=loss.device)
            n_pos = positions.shape[1]
            per_token = torch.zeros(
                (shape[0], shape[1], n_pos, shape[2]), dtype=torch.float32, device=loss.device
            )
            for p in range(n_pos):
                self._capture.backward(
                    token_loss[rows, positions[:, p]], per_token[:, :, p], keep=True
                )
            self._check_finite(per_token, layout, first_index)
        self._capture.backward(loss, values)
        norms = self._check_finite(values, layout, first_index)
        return StepFeatures(values, loss.detach().float(), layout, per_token, positions, norms)

    @staticmethod
    def _check_finite(values: torch.Tensor, layout: SlotLayout, first_index: int) -> torch.Tensor:
        """Refuse ``values`` (B, slots, ...) if any is NaN or inf, naming examples and slots;
        returns the (B, slots) L2 norms the check computed."""
        # One reduction then a check of its (B, slots) results: a NaN or inf anywhere makes
        # its row's norm non-finite (finite values whose squares overflow are checked in full).
        norms = torch.linalg.vector_norm(values.flatten(2), dim=2)
        if bool(torch.isfinite(norms).all()):
            return norms
        finite = torch.isfinite(values).flatten(2).all(dim=2)
        if not bool(finite.all()):
            rows, slots = torch.nonzero(~finite, as_tuple=True)
            names = layout.slot_names()
            where = sorted({names[int(s)] for s in slots})
            listed = shortened(int(i) for i in rows.unique() + first_index)
            raise DataError(
                f"non-finite gradient sketches for examples {listed} "
                f"(at {', '.join(where)}): the model produces NaN/inf gradients for them."
            )
        return norms

    def iter_batches(
        self,
        batches: Iterable[Any],
        loss_fn: LossFn,
        *,
        progress: bool = False,
        desc: str = "featurize",
        tokens: TokenChoice | None = None,
    ) -> Generator[StepFeatures, None, None]:
        """Features of each batch in turn (hooks installed while the iterator runs).

        ``loss_fn`` returns per-example losses (B,) or per-token losses (B, L) whose sum over
        tokens is the example's loss. ``tokens`` ("all", "last" or positions) also gives each
        chosen token's own features (one more backward per token: for the few queries).
        Every batch must show the same slot layout; the first example of the first batch is
        example 0 in error messages. Stopping early (``break``) is safe: the model's hooks
        and train/eval mode are restored when the iterator is closed.
        """
        was_training = self.model.training
        self.model.eval()
        layout: SlotLayout | None = None
        seen = 0
        try:
            with self._capture.hooks():
                total = len(batches) if isinstance(batches, Sized) else None
                for n, batch in enumerate(
                    tqdm(batches, desc=desc, total=total, disable=not progress, leave=False)
                ):
                    part = self._batch(batch, loss_fn, seen, tokens)
                    if layout is not None and part.layout != layout:
                        raise UnsupportedModel(
                            f"batch {n} shows {part.layout.describe()} but earlier batches "
                            f"showed {layout.describe()}: the loop count must not change "
                            "within one featurization."
                        )
                    layout = part.layout
                    seen += len(part)
                    yield part
        finally:
            self.model.train(was_training)

    def featurize(
        self,
        batches: Iterable[Any],
        loss_fn: LossFn,
        *,
        progress: bool = False,
        desc: str = "featurize",
        tokens: TokenChoice | None = None,
    ) -> StepFeatures:
        """Features of every example of ``batches`` (e.g. a DataLoader), in order; see
        :meth:`iter_batches` for ``tokens``."""
        return StepFeatures.concat(
            list(self.iter_batches(batches, loss_fn, progress=progress, desc=desc, tokens=tokens))
        )
