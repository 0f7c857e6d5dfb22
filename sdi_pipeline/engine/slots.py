"""Which slot of a per-example feature each use of a target module contributes to.

A looped model calls its shared block tau times per forward pass; the k-th call of every
looped module belongs to loop step k. Modules called exactly once (an embedding before the
loop, a readout after it) may be targeted too: they are binned into one *prelude* slot before
the loop steps or one *readout* slot after them, by where their call falls in the forward
pass. Anything else (a module called twice per step, a single-use module between loop
steps) cannot be assigned to a step and is refused rather than silently summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdi_pipeline.errors import UnsupportedModel
from sdi_pipeline.messages import shortened


@dataclass(frozen=True)
class SlotLayout:
    """The slots of one per-example feature: [prelude] + loop steps + [readout]."""

    loop_steps: int
    prelude: bool = False
    readout: bool = False

    @property
    def n_slots(self) -> int:
        return self.loop_steps + int(self.prelude) + int(self.readout)

    @property
    def first_loop_slot(self) -> int:
        return int(self.prelude)

    def slot_names(self) -> list[str]:
        """Human-readable slot names: ``prelude``, ``step 1`` ... ``step tau``, ``readout``."""
        names = ["prelude"] if self.prelude else []
        names += [f"step {t + 1}" for t in range(self.loop_steps)]
        return names + (["readout"] if self.readout else [])

    def to_dict(self) -> dict[str, Any]:
        return {"loop_steps": self.loop_steps, "prelude": self.prelude, "readout": self.readout}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlotLayout:
        return cls(int(data["loop_steps"]), bool(data["prelude"]), bool(data["readout"]))

    def describe(self) -> str:
        extra = [s for s, on in (("prelude", self.prelude), ("readout", self.readout)) if on]
        return self.steps_text() + (f" + {' + '.join(extra)}" if extra else "")

    def steps_text(self) -> str:
        """``1 loop step`` / ``6 loop steps``."""
        return f"{self.loop_steps} loop step{'' if self.loop_steps == 1 else 's'}"


def _check_interleaving(calls: dict[str, list[int]], tau: int) -> None:
    """Refuse looped modules whose k-th calls do not all come before their (k+1)-th calls.

    A loop body runs once per step, so every module's k-th call falls between the others'
    (k-1)-th and (k+1)-th. Several blocks each applied several times in a row (ALBERT with
    num_hidden_groups > 1: group 1 twice, then group 2 twice) also call every module tau
    times, but binning "the k-th calls" would mix different layer applications in one step.
    """
    for k in range(tau - 1):
        late = max(calls, key=lambda n: calls[n][k])
        early = min(calls, key=lambda n: calls[n][k + 1])
        if calls[late][k] > calls[early][k + 1]:

            def positions(name: str) -> str:
                return f"'{name}' at calls {shortened(calls[name], 6)}"

            raise UnsupportedModel(
                f"the looped target modules do not run one loop step at a time: '{late}' "
                f"makes its call {k + 1} after '{early}' makes its call {k + 2} "
                f"({positions(late)}; {positions(early)}, counting all target-module calls of "
                "one forward pass in order). The targets hold several blocks that each run "
                "several times in a row (e.g. ALBERT with num_hidden_groups > 1): target one "
                "of them, or modules that run once per loop step."
            )


def describe_assignment(slots: dict[str, list[int]], layout: SlotLayout) -> str:
    """What was inferred, for logs: ``4 loop steps of core.* (6 modules), prelude: wte``."""
    roles: dict[str, list[str]] = {"loop": [], "prelude": [], "readout": []}
    for name, used in sorted(slots.items()):
        if layout.prelude and used == [0]:
            roles["prelude"].append(name)
        elif layout.readout and used == [layout.n_slots - 1]:
            roles["readout"].append(name)
        else:
            roles["loop"].append(name)
    parts = [f"{layout.steps_text()} of {_names(roles['loop'])}"]
    parts += [f"{role}: {_names(roles[role])}" for role in ("prelude", "readout") if roles[role]]
    return ", ".join(parts)


def _names(names: list[str]) -> str:
    """Module names, a shared dotted prefix folded to ``prefix.*``."""
    if len(names) <= 1:
        return ", ".join(names) or "(none)"
    prefix = names[0].split(".")
    for name in names[1:]:
        parts = name.split(".")
        n = 0
        while n < min(len(prefix), len(parts)) and prefix[n] == parts[n]:
            n += 1
        prefix = prefix[:n]
    if prefix:
        return f"{'.'.join(prefix)}.* ({len(names)} modules)"
    return shortened(names, 6)


def infer_layout(
    calls: dict[str, list[int]], expected_steps: int | None = None
) -> tuple[SlotLayout, dict[str, list[int]]]:
    """Infer the slot layout from when each target module was called.

    ``calls`` maps each module that owns target parameters to the global call indices of its
    uses in one forward pass (every such module must have been called). Returns the layout
    and, per module, the slot of each of its uses in call order.
    """
    counts = {name: len(idx) for name, idx in calls.items()}
    tau = max(counts.values())
    odd = {n: c for n, c in counts.items() if c not in (1, tau)}
    if odd:
        listed = ", ".join(f"'{n}' ran {c}x" for n, c in sorted(odd.items()))
        raise UnsupportedModel(
            f"target modules were called different numbers of times: the loop ran {tau} steps "
            f"but {listed}. A module called several times per loop step (or in only some "
            "steps) cannot be assigned to a step; target separate modules per call, or "
            "leave it out of the targets."
        )
    if expected_steps is not None and tau != expected_steps:
        raise UnsupportedModel(
            f"the target modules ran {tau} times per forward pass but expected_steps="
            f"{expected_steps}; check the model's loop count or the targets (a module used "
            "twice per step doubles the apparent step count)."
        )
    looped = {n for n, c in counts.items() if c == tau} if tau > 1 else set(counts)
    _check_interleaving({n: calls[n] for n in looped}, tau)
    loop_calls = [i for n in looped for i in calls[n]]
    first, last = min(loop_calls), max(loop_calls)
    placement: dict[str, str] = {}
    for name in sorted(set(counts) - looped):
        (idx,) = calls[name]
        if idx < first:
            placement[name] = "prelude"
        elif idx > last:
            placement[name] = "readout"
        else:
            raise UnsupportedModel(
                f"target module '{name}' runs once, between loop steps (call {idx} of the "
                f"loop's calls {first}..{last}): it is neither prelude nor readout and cannot "
                "be assigned to a step. Leave it out of the targets."
            )
    layout = SlotLayout(
        loop_steps=tau if tau > 1 else 1,
        prelude="prelude" in placement.values(),
        readout="readout" in placement.values(),
    )
    slots: dict[str, list[int]] = {}
    for name in counts:
        if name in looped:
            slots[name] = [layout.first_loop_slot + k for k in range(counts[name])]
        elif placement[name] == "prelude":
            slots[name] = [0]
        else:
            slots[name] = [layout.n_slots - 1]
    return layout, slots
