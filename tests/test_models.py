"""Real architectures researchers loop (GPT-2 blocks with Conv1D and tied embeddings, a Llama
decoder layer, ALBERT, nn.TransformerEncoderLayer): exact mode equals an independent
per-step oracle, the inferred layout is the true one, and sketched SDI converges."""

from __future__ import annotations

import copy

import pytest
import torch
from oracle import per_example_gradients
from torch import nn

from sdi_pipeline.engine.featurizer import StepFeaturizer
from sdi_pipeline.engine.slots import SlotLayout
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.errors import UnsupportedModel
from sdi_pipeline.jobs import scores
from sdi_pipeline.toy.parity import make_parity_dataset, parity_loss

pytest.importorskip("transformers")
from sdi_pipeline.examples.models import build_example

N_LOOPS = 3
ALBERT_CORE = "mlm.albert.encoder.albert_layer_groups.0"
# (architecture, looped module, handlers the model needs)
CASES = [
    ("looped_gpt2", "core", {"Conv1DHandler", "OpacusHandler"}),
    ("looped_llama", "core", {"LinearHandler", "GenericHandler"}),
    ("albert", ALBERT_CORE, {"LinearHandler", "OpacusHandler"}),
    ("looped_encoder", "core", {"LinearHandler", "OpacusHandler", "GenericHandler"}),
]


def _model(architecture: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = build_example(architecture, **{"n_loops": N_LOOPS, "d_model": 16, **kwargs})
    with torch.no_grad():  # non-trivial weights: the default init gives tiny gradients
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    data = make_parity_dataset(n, n_bits=5, seed=seed)
    return {"tokens": data.tokens, "target": data.targets}


class _Unrolled(nn.Module):
    """Call k of the wrapped module runs its own copy k: one parameter set per loop step."""

    def __init__(self, module: nn.Module, n: int) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(module) for _ in range(n))
        self.calls = 0

    def forward(self, *args, **kwargs):
        module = self.copies[self.calls % len(self.copies)]
        self.calls += 1
        return module(*args, **kwargs)


def _oracle(
    model: nn.Module, core: str, featurizer: StepFeaturizer, batch, edges: dict[str, str]
) -> torch.Tensor:
    """(B, slots, params) per-step gradients by plain autograd on an unrolled copy of the
    model. ``edges`` maps a prelude/readout parameter name to "prelude"/"readout"; a tied
    parameter used in both is given its own copy for the readout use."""
    unrolled = copy.deepcopy(model)
    parent, _, leaf = core.rpartition(".")
    holder = unrolled.get_submodule(parent) if parent else unrolled
    unrolled_core = _Unrolled(unrolled.get_submodule(core), N_LOOPS)
    if isinstance(holder, nn.ModuleList):
        holder[int(leaf)] = unrolled_core
    else:
        setattr(holder, leaf, unrolled_core)
    if "lm_head.weight" in edges:  # untie the output embedding from the input one
        unrolled.lm_head.weight = nn.Parameter(unrolled.lm_head.weight.detach().clone())
    slot_params: list[dict[str, nn.Parameter]] = []
    prelude = {n: unrolled.get_parameter(n) for n, r in edges.items() if r == "prelude"}
    readout = {
        ("wte.weight" if n == "lm_head.weight" else n): unrolled.get_parameter(n)
        for n, r in edges.items()
        if r == "readout"
    }
    if prelude:
        slot_params.append(prelude)
    for copy_ in unrolled_core.copies:
        slot_params.append({f"{core}.{n}": p for n, p in copy_.named_parameters()})
    if readout:
        slot_params.append(readout)
    offsets, width = {}, 0
    for p in featurizer.params:
        offsets[p.name], width = width, width + p.numel
    n = batch["tokens"].shape[0]
    out = torch.zeros(n, len(slot_params), width)
    unrolled.eval()
    for i in range(n):
        unrolled.zero_grad(set_to_none=True)
        unrolled_core.calls = 0
        parity_loss(unrolled, {k: v[i : i + 1] for k, v in batch.items()}).sum().backward()
        for s, params in enumerate(slot_params):
            for name, p in params.items():
                if p.grad is not None:
                    out[i, s, offsets[name] : offsets[name] + p.numel()] = p.grad.reshape(-1)
    return out


@pytest.mark.parametrize(("architecture", "core", "handlers"), CASES, ids=[c[0] for c in CASES])
def test_exact_mode_equals_the_per_step_oracle(architecture: str, core: str, handlers) -> None:
    model = _model(architecture)
    batch = _batch(4, seed=1)
    featurizer = StepFeaturizer(model, [core], None)
    feats = featurizer.featurize([batch], parity_loss)
    assert feats.layout == SlotLayout(N_LOOPS)
    assert featurizer.assignment is not None and featurizer.assignment.startswith(
        f"{N_LOOPS} loop steps of {core}"
    )
    assert {type(h).__name__ for h in featurizer.handlers.values()} == handlers
    expected = _oracle(model, core, featurizer, batch, {})
    scale = float(expected.abs().max())
    torch.testing.assert_close(feats.values, expected, rtol=1e-4, atol=1e-5 * scale)
    # Every step and every parameter carries gradient: the comparison is not vacuous.
    assert bool((expected.norm(dim=2) > 1e-4 * scale).all())


def test_gpt2_with_tied_embeddings_targeted_as_prelude_and_readout() -> None:
    """wte is used by the embedding (prelude) and, tied, by the head (readout): each use is
    its own slot, and the slots sum to the whole per-example gradient."""
    model = _model("looped_gpt2")
    assert model.lm_head.weight is model.wte.weight
    batch = _batch(4, seed=2)
    targets = ["wte", "wpe", "core", "ln_f", "lm_head"]
    featurizer = StepFeaturizer(model, targets, None)
    feats = featurizer.featurize([batch], parity_loss)
    assert feats.layout == SlotLayout(N_LOOPS, prelude=True, readout=True)
    assert featurizer.assignment == (
        f"{N_LOOPS} loop steps of core.* (6 modules), prelude: wpe, wte, readout: lm_head, ln_f"
    )
    edges = {
        "wte.weight": "prelude",
        "wpe.weight": "prelude",
        "ln_f.weight": "readout",
        "ln_f.bias": "readout",
        "lm_head.weight": "readout",
    }
    expected = _oracle(model, "core", featurizer, batch, edges)
    scale = float(expected.abs().max())
    torch.testing.assert_close(feats.values, expected, rtol=1e-4, atol=1e-5 * scale)
    # The sum over slots is the ordinary per-example gradient of every parameter.
    whole = per_example_gradients(model, [p.name for p in featurizer.params], batch, parity_loss)
    torch.testing.assert_close(feats.summed(), whole, rtol=1e-4, atol=1e-5 * scale)


def test_albert_with_two_groups_needs_its_loop_entry_declared() -> None:
    # Four layers in two groups: group 0 runs twice, then group 1 twice.
    model = _model("albert", n_loops=4, n_groups=2)
    groups = "mlm.albert.encoder.albert_layer_groups.*"
    featurizer = StepFeaturizer(model, [groups], SketchSpec(m=64))
    with pytest.raises(UnsupportedModel, match=r"cannot tell the loop's passes.*ALBERT"):
        featurizer.featurize([_batch(2, seed=3)], parity_loss)
    # Declared, each layer application is a step (the exact values: tests/test_loops.py).
    declared = StepFeaturizer(model, [groups], SketchSpec(m=64), loop_entry=groups)
    assert declared.featurize([_batch(2, seed=3)], parity_loss).layout.loop_steps == 4
    # One group is a loop again.
    one = StepFeaturizer(model, ["mlm.albert.encoder.albert_layer_groups.0"], SketchSpec(m=64))
    assert one.featurize([_batch(2, seed=3)], parity_loss).layout.loop_steps == 2


@pytest.mark.parametrize(("architecture", "core", "handlers"), CASES, ids=[c[0] for c in CASES])
def test_sketched_sdi_error_falls_with_m(architecture: str, core: str, handlers) -> None:
    model = _model(architecture)
    train, query = _batch(12, seed=4), _batch(3, seed=5)
    exact = StepFeaturizer(model, [core], None)
    truth = scores.query_step_sdi(
        exact.featurize([train], parity_loss).values, exact.featurize([query], parity_loss).values
    )
    errors = []
    for m in (256, 4096):
        err = []
        for seed in range(3):
            sketch = StepFeaturizer(model, [core], SketchSpec(m=m, seed=seed))
            sdi = scores.query_step_sdi(
                sketch.featurize([train], parity_loss).values,
                sketch.featurize([query], parity_loss).values,
            )
            err.append(float((sdi - truth).norm() / truth.norm()))
        errors.append(sum(err) / len(err))
    # 16x the buckets: the error should shrink about 4x (1/sqrt(m)); ask for 2.5x.
    assert errors[1] < errors[0] / 2.5, errors


def test_an_example_config_runs_end_to_end(tmp_path, capsys) -> None:
    """`sdi-attribute model=looped_llama` on briefly trained checkpoints: the run names
    itself after the model, says what it inferred, and its results have the loop steps."""
    from pipeline_helpers import cli_overrides

    from sdi_pipeline.examples.train import train_example
    from sdi_pipeline.formats.results import Results
    from sdi_pipeline.launch.attribute_cli import run

    train_example("looped_llama", tmp_path / "ex", steps=3, n_checkpoints=2, progress=False,
                  n_loops=2, d_model=16)  # fmt: skip
    overrides = cli_overrides(tmp_path, "model=looped_llama", "launcher.workers=1")
    overrides[0] = f"checkpoints.paths=[{tmp_path / 'ex'}/ckpt-*.pt]"
    assert run(overrides) == 0
    out = capsys.readouterr().out
    assert "targets: 2 loop steps of core.* (9 modules)" in out
    with Results.open(tmp_path / "runs" / "looped_llama") as res:
        assert res.slot_names == ["step 1", "step 2"]
        assert res.assignment == "2 loop steps of core.* (9 modules)"
        assert res.n_train == 40


def test_transformers_looped_lm_config_runs_end_to_end(tmp_path, capsys) -> None:
    """`sdi-attribute model=inkling2_loop`: transformers' Inkling2LoopForCausalLM, its loop
    layer's gates from pass 2 summed per pass, convolution weights lifted to their callers."""
    pytest.importorskip("transformers.models.inkling2_loop")
    from pipeline_helpers import cli_overrides

    from sdi_pipeline.examples.train import train_example
    from sdi_pipeline.formats.results import Results
    from sdi_pipeline.launch.attribute_cli import run

    train_example("inkling2_loop", tmp_path / "ex", steps=2, n_checkpoints=1, progress=False)
    overrides = cli_overrides(
        tmp_path, "model=inkling2_loop", "launcher.workers=1", "data.train.limit=8",
        "data.query.limit=2",
    )  # fmt: skip
    overrides[0] = f"checkpoints.paths=[{tmp_path / 'ex'}/ckpt-*.pt]"
    assert run(overrides) == 0
    out = capsys.readouterr().out
    assert "targets: 3 loop steps of lm.model.layers.1.*" in out
    assert "in steps 2-3 only" in out and "read without a call" in out
    with Results.open(tmp_path / "runs" / "inkling2_loop") as res:
        assert res.slot_names == ["step 1", "step 2", "step 3"]
        assert res.n_train == 8
