"""Which slot of a per-example feature each call of a target module contributes to.

A loop step is a span of time: a looped model runs its loop body in passes, and every call
of a target module belongs to the pass it happens in. The passes are opened by the calls of
one *entry* module: declared (``loop_entry``), or inferred as the earliest-starting module
whose calls, taken as pass openers, leave every other looped module in a regular pattern --
the same number of calls in every pass, or one call in each pass of a contiguous run of
passes (gates that mix in the previous pass's messages from pass 2 on). A module called
several times in a pass, or in some passes only, contributes the sum of its calls in each
pass (0 where it did not run). Modules called exactly once before the first pass are binned
into one *prelude* slot, those called once after the loop's last call into one *readout*
slot. Calls are ordered by when they start (a forward pre-hook), so a module's calls nested
inside the entry's call belong to its pass.
"""

from __future__ import annotations

from bisect import bisect_right
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


def describe_assignment(
    slots: dict[str, list[int]], layout: SlotLayout, entry: str | None = None
) -> str:
    """What was inferred, for logs: ``4 loop steps of core.* (6 modules), prelude: wte``,
    plus the modules that run in some steps only or several times per step, and the
    declared ``entry``."""
    roles: dict[str, list[str]] = {"loop": [], "prelude": [], "readout": []}
    partial: dict[str, list[str]] = {}
    repeated: dict[str, list[str]] = {}
    first = layout.first_loop_slot
    for name, used in sorted(slots.items()):
        if layout.prelude and used == [0]:
            roles["prelude"].append(name)
        elif layout.readout and used == [layout.n_slots - 1]:
            roles["readout"].append(name)
        else:
            roles["loop"].append(name)
            steps = sorted(set(used))
            if len(steps) < layout.loop_steps:
                a, b = steps[0] - first + 1, steps[-1] - first + 1
                partial.setdefault(f"step {a}" if a == b else f"steps {a}-{b}", []).append(name)
            if len(used) > len(steps):
                per = max(used.count(s) for s in steps)
                repeated.setdefault(f"{per}x per step", []).append(name)
    parts = [f"{layout.steps_text()} of {_names(roles['loop'])}"]
    parts += [f"{role}: {_names(roles[role])}" for role in ("prelude", "readout") if roles[role]]
    parts += [f"in {where} only: {_names(names)}" for where, names in sorted(partial.items())]
    parts += [f"{times}: {_names(names)}" for times, names in sorted(repeated.items())]
    if entry is not None:
        parts.append(f"loop entry: {entry}")
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


def _pass_counts(starts: list[int], opens: list[int]) -> list[int]:
    """How many of a module's calls (by start position) fall in each pass."""
    counts = [0] * len(opens)
    for s in starts:
        counts[bisect_right(opens, s) - 1] += 1
    return counts


def _regular(counts: list[int]) -> bool:
    """A pattern inference trusts: c calls in every pass, or one call in each pass of one
    contiguous run of passes (gates that run from pass 2 on, a module in one pass only)."""
    if len(set(counts)) == 1:
        return True
    ran = [p for p, c in enumerate(counts) if c]
    return all(counts[p] == 1 for p in ran) and ran == list(range(ran[0], ran[-1] + 1))


def _infer_entry(
    calls: dict[str, list[int]], single: set[str], above: dict[str, list[int]]
) -> tuple[str, list[int]] | None:
    """The earliest-starting module (target or above the targets) whose calls, taken as
    pass openers, place every call in a regular pattern; None if there is none."""
    candidates = {n: c for n, c in {**above, **calls}.items() if len(c) > 1}
    for name in sorted(candidates, key=lambda n: candidates[n][0]):
        opens = candidates[name]
        if any(calls[n][0] < opens[0] for n in calls if n not in single):
            continue  # a looped module starts before this one: it cannot open each pass
        if all(_regular(_pass_counts(calls[n], opens)) for n in calls if n not in single):
            return name, opens
    return None


def infer_layout(
    calls: dict[str, list[int]],
    expected_steps: int | None = None,
    entry: tuple[str, list[int]] | None = None,
    above: dict[str, list[int]] | None = None,
) -> tuple[SlotLayout, dict[str, list[int]]]:
    """Infer the slot layout from when each target module's calls started.

    ``calls`` maps each module that owns target parameters to the start positions of its
    calls in one forward pass, in call order (every such module must have been called).
    ``entry``: the declared loop entry's name and the start positions of its calls (each
    opens a pass), or None to infer it among the target modules and the modules ``above``
    them (name -> the start positions of their calls). Returns the layout and, per module,
    the slot of each of its calls in call order.
    """
    counts = {name: len(idx) for name, idx in calls.items()}
    single = {n for n, c in counts.items() if c == 1}
    if entry is None:
        if not set(counts) - single:  # every module ran once: one loop step, as ever
            return SlotLayout(1), {n: [0] for n in counts}
        entry = _infer_entry(calls, single, above or {})
        if entry is None:
            listed = ", ".join(f"'{n}' ran {c}x" for n, c in sorted(counts.items()) if c > 1)
            raise UnsupportedModel(
                f"cannot tell the loop's passes from the order of calls ({listed}): no "
                "module's calls open passes that hold every other looped module the same "
                "number of times (several blocks each run several times in a row, as ALBERT "
                "with num_hidden_groups > 1, or a module run twice after the loop); declare "
                "the module whose call opens each pass with analysis.loop_entry=<module "
                "name or pattern> (attribute(..., loop_entry=...)), or target fewer modules."
            )
    entry_name, opens = entry
    if not opens:
        raise UnsupportedModel(
            f"loop_entry '{entry_name}' never ran in the forward pass of loss_fn: name a "
            "module that runs once at the start of each loop pass."
        )
    passes = len(opens)
    if expected_steps is not None and passes != expected_steps:
        raise UnsupportedModel(
            f"the loop ran {passes} passes per forward pass (each opened by '{entry_name}') "
            f"but expected_steps={expected_steps}; check the model's loop count or the targets "
            "(a module used twice per pass, alone, doubles the apparent pass count)."
        )
    looped = [n for n in counts if n not in single]
    last = max((calls[n][-1] for n in looped), default=None)
    placement: dict[str, str] = {}
    for name in counts:
        first = calls[name][0]
        if first >= opens[0]:
            placement[name] = "loop"
        elif name in single:
            placement[name] = "prelude"
        else:
            raise UnsupportedModel(
                f"target module '{name}' is called before the first loop pass (opened by "
                f"'{entry_name}') and again later: its first call cannot be placed in a "
                "step; declare as loop_entry a module that runs before it in each pass, or "
                "leave it out of the targets."
            )
        if name in single and last is not None and first > last:
            placement[name] = "readout"
    layout = SlotLayout(
        loop_steps=passes,
        prelude="prelude" in placement.values(),
        readout="readout" in placement.values(),
    )
    slots: dict[str, list[int]] = {}
    for name, starts in calls.items():
        if placement[name] == "prelude":
            slots[name] = [0]
        elif placement[name] == "readout":
            slots[name] = [layout.n_slots - 1]
        else:
            slots[name] = [layout.first_loop_slot + bisect_right(opens, s) - 1 for s in starts]
    return layout, slots
