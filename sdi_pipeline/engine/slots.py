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
        return f"{self.loop_steps} loop steps" + (f" + {' + '.join(extra)}" if extra else "")


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
