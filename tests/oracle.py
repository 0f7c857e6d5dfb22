"""An exact per-step gradient oracle for the toy model, independent of the capture hooks.

The looped model is unrolled by hand with ``torch.func.functional_call``, giving the shared
block a *separate copy* of its parameters at every loop step. The per-example gradient with
respect to copy t is, by definition, the step-t gradient g[i, t]; ``torch.func.vmap`` over
``torch.func.grad`` gives it for every example without any hook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from sdi_pipeline.toy.model import LoopedGPT

PRELUDE = ("tok_emb", "pos_emb")
READOUT = ("ln_f", "head")


def _params(model: LoopedGPT, prefix: str) -> dict[str, torch.Tensor]:
    module = model.get_submodule(prefix)
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def oracle_step_gradients(
    model: LoopedGPT,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    *,
    n_loops: int,
    with_edges: bool,
) -> tuple[torch.Tensor, list[str]]:
    """Exact per-example per-slot gradients (B, slots, D) of the parity loss.

    Slots are [prelude] + loop steps + [readout]; the flattened parameter order is sorted by
    full parameter name (the featurizer's order). Returns the tensor and the name order.
    """
    pre = {m: _params(model, m) for m in PRELUDE}
    steps = [_params(model, "block") for _ in range(n_loops)]
    post = {m: _params(model, m) for m in READOUT}

    def loss_one(pre, steps, post, tok, tgt):
        tok = tok[None]
        pos = torch.arange(tok.shape[1])[None]
        h = functional_call(model.tok_emb, pre["tok_emb"], (tok,))
        h = h + functional_call(model.pos_emb, pre["pos_emb"], (pos,))
        for params in steps:
            h = functional_call(model.block, params, (h,))
        h = functional_call(model.ln_f, post["ln_f"], (h,))
        logits = functional_call(model.head, post["head"], (h,))
        return F.cross_entropy(logits[:, -1], tgt[None])

    g_pre, g_steps, g_post = vmap(grad(loss_one, argnums=(0, 1, 2)), in_dims=(None,) * 3 + (0, 0))(
        pre, steps, post, tokens, targets
    )
    b = tokens.shape[0]
    # Full names of every analysed parameter and where its gradient lives in each slot.
    slots: list[dict[str, torch.Tensor]] = []
    if with_edges:
        slots.append({f"{m}.{n}": g for m in PRELUDE for n, g in g_pre[m].items()})
    for t in range(n_loops):
        slots.append({f"block.{n}": g for n, g in g_steps[t].items()})
    if with_edges:
        slots.append({f"{m}.{n}": g for m in READOUT for n, g in g_post[m].items()})
    names = sorted({n for s in slots for n in s})
    shapes = {n: g.shape[1:] for s in slots for n, g in s.items()}
    rows = []
    for s in slots:
        parts = [
            s[n].reshape(b, -1) if n in s else torch.zeros(b, shapes[n].numel()) for n in names
        ]
        rows.append(torch.cat(parts, dim=1))
    return torch.stack(rows, dim=1), names


def per_example_gradients(model, names: list[str], batch: dict, loss_fn) -> torch.Tensor:
    """(B, #params) by plain autograd, one example at a time: each example's ordinary
    gradient of the named parameters, concatenated in that order."""
    rows = []
    for i in range(next(iter(batch.values())).shape[0]):
        model.zero_grad(set_to_none=True)
        loss_fn(model, {k: v[i : i + 1] for k, v in batch.items()}).sum().backward()
        rows.append(torch.cat([model.get_parameter(n).grad.reshape(-1) for n in names]))
    return torch.stack(rows)
