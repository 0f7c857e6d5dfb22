"""Hugging Face checkpoints: safetensors files, save_pretrained and Trainer directories.

Tiny models are built from configs (no hub access); Trainer directories are written by hand
with the files the Trainer writes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from sdi_pipeline.errors import CheckpointError
from sdi_pipeline.formats.results import Results
from sdi_pipeline.inputs.checkpoints import (
    CheckpointSpec,
    checkpoint_size,
    file_digest,
    load_checkpoint,
    load_into,
    resolve_checkpoint_paths,
    resolve_eta,
    resolve_eta_and_source,
)


def tiny_gpt2(seed: int, tied: bool = True) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_a_safetensors_file_loads_into_the_model(tmp_path) -> None:
    saved = make_model(seed=1)
    save_file(saved.state_dict(), tmp_path / "step-1.safetensors")
    model = make_model(seed=2)
    load_into(model, load_checkpoint(tmp_path / "step-1.safetensors"), "step-1")
    assert_same_weights(model, saved)


def test_save_pretrained_with_tied_embeddings_fills_the_tied_key(tmp_path) -> None:
    saved = tiny_gpt2(seed=0)
    saved.save_pretrained(tmp_path / "hf")
    # save_pretrained leaves out the tied copy: the head is the input embedding.
    assert "lm_head.weight" not in load_file(tmp_path / "hf" / "model.safetensors")
    model = tiny_gpt2(seed=1)
    load_into(model, load_checkpoint(tmp_path / "hf"), tmp_path / "hf")
    assert_same_weights(model, saved)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_a_sharded_save_loads_every_shard_and_its_digest_covers_them(tmp_path) -> None:
    saved = tiny_gpt2(seed=0)
    saved.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model = tiny_gpt2(seed=1)
    load_into(model, load_checkpoint(tmp_path / "hf"), tmp_path / "hf")
    assert_same_weights(model, saved)

    assert checkpoint_size(tmp_path / "hf") == sum(s.stat().st_size for s in shards)
    before = file_digest(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("{}")  # not weights: the digest stays
    assert file_digest(tmp_path / "hf") == before
    data = bytearray(shards[-1].read_bytes())
    data[-1] ^= 1  # one bit of the last shard's last tensor
    shards[-1].write_bytes(bytes(data))
    assert file_digest(tmp_path / "hf") != before
    shards[0].unlink()  # an incomplete copy is refused when the paths are resolved
    with pytest.raises(CheckpointError, match=r"index\.json lists shard files that are missing"):
        resolve_checkpoint_paths([str(tmp_path / "hf")])


def test_a_file_digest_is_the_sha256_of_its_bytes(tmp_path) -> None:
    (tmp_path / "c.pt").write_bytes(b"weights")
    assert file_digest(tmp_path / "c.pt") == hashlib.sha256(b"weights").hexdigest()


def test_a_pytorch_model_bin_directory_loads_weights_only(tmp_path) -> None:
    saved = tiny_gpt2(seed=0)
    (tmp_path / "hf").mkdir()
    torch.save(saved.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    model = tiny_gpt2(seed=1)
    load_into(model, load_checkpoint(tmp_path / "hf"), tmp_path / "hf")
    assert_same_weights(model, saved)
    # A pickled object in it is refused unless trusted, as for any torch file.
    torch.save(
        {"weights": saved.state_dict(), "obj": GPT2Config()}, tmp_path / "hf" / "pytorch_model.bin"
    )
    with pytest.raises(CheckpointError, match="weights_only loading refuses"):
        load_checkpoint(tmp_path / "hf")


def test_a_missing_key_that_is_not_tied_is_refused_by_name(tmp_path) -> None:
    tiny_gpt2(seed=0).save_pretrained(tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    del weights["transformer.h.1.ln_2.weight"]
    save_file(weights, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys transformer\.h\.1\.ln_2\.weight$"):
        load_into(tiny_gpt2(seed=1), load_checkpoint(tmp_path / "hf"), "hf")
    # A head that is its own parameter in the model is not filled from the embedding.
    tiny_gpt2(seed=0).save_pretrained(tmp_path / "tied")
    with pytest.raises(CheckpointError, match=r"missing keys lm_head\.weight$"):
        load_into(tiny_gpt2(seed=1, tied=False), load_checkpoint(tmp_path / "tied"), "tied")


def test_tied_keys_with_different_values_are_refused(tmp_path) -> None:
    state = tiny_gpt2(seed=0).state_dict()
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="are one tied parameter in the model but differ"):
        load_into(tiny_gpt2(seed=1), load_checkpoint(tmp_path / "c.pt"), "c.pt")


def test_a_corrupt_safetensors_file_is_one_line(tmp_path) -> None:
    save_file(make_model().state_dict(), tmp_path / "c.safetensors")
    data = (tmp_path / "c.safetensors").read_bytes()
    (tmp_path / "c.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*c\.safetensors") as err:
        load_checkpoint(tmp_path / "c.safetensors")
    assert "\n" not in str(err.value)


def test_a_directory_without_weights_is_refused_when_resolved(tmp_path) -> None:
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"checkpoint-5 holds no model weights"):
        resolve_checkpoint_paths([str(tmp_path / "checkpoint-*")])


def write_trainer_checkpoint(
    folder: Path, model: torch.nn.Module, step: int, log: list[dict]
) -> Path:
    """A checkpoint-N directory as the HF Trainer writes it (weights, trainer state, extras)."""
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file(model.state_dict(), path / "model.safetensors")
    state = {"global_step": step, "epoch": step / 10, "log_history": log}
    (path / "trainer_state.json").write_text(json.dumps(state))
    (path / "optimizer.pt").write_bytes(b"not read")
    return path


LOG = [
    {"epoch": 0.2, "learning_rate": 5e-4, "loss": 2.0, "step": 2},
    {"epoch": 0.5, "learning_rate": 4e-4, "loss": 1.5, "step": 5},
    {"epoch": 0.5, "eval_loss": 1.6, "step": 5},  # eval entries carry no learning rate
    {"epoch": 1.2, "learning_rate": 1e-4, "loss": 1.0, "step": 12},
]


def test_trainer_checkpoints_are_ordered_by_step_and_read_eta_at_their_step(tmp_path) -> None:
    for step in (10, 100, 2):
        write_trainer_checkpoint(tmp_path / "out", make_model(seed=step), step, LOG)
    paths = resolve_checkpoint_paths([str(tmp_path / "out" / "checkpoint-*")])
    # Lexical order would be 10, 100, 2.
    assert [Path(p).name for p in paths] == ["checkpoint-2", "checkpoint-10", "checkpoint-100"]
    found = []
    for path in paths:
        data = load_checkpoint(path)
        found.append(resolve_eta_and_source(CheckpointSpec(path), data))
    assert found == [
        (5e-4, "trainer_state.json: learning_rate logged at step 2"),
        (4e-4, "trainer_state.json: learning_rate logged at step 5 (global_step 10)"),
        (1e-4, "trainer_state.json: learning_rate logged at step 12 (global_step 100)"),
    ]
    model = make_model()
    load_into(model, load_checkpoint(paths[1]), paths[1])
    assert_same_weights(model, make_model(seed=10))
    # An eta given (checkpoints.etas) wins, and says so.
    given = resolve_eta_and_source(CheckpointSpec(paths[0], 0.5), data, "checkpoints.etas")
    assert given == (0.5, "checkpoints.etas")


def test_a_trainer_checkpoint_without_a_logged_learning_rate_asks_for_etas(tmp_path) -> None:
    path = write_trainer_checkpoint(tmp_path, make_model(), 1, LOG)
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint-1: trainer_state.json logs no learning_rate at or before "
        r"global_step 1 .*give checkpoints.etas",
    ):
        resolve_eta(CheckpointSpec(path), load_checkpoint(path))
    assert resolve_eta(CheckpointSpec(path, 0.1), load_checkpoint(path)) == 0.1


def test_without_safetensors_installed_the_error_names_the_extra(tmp_path, monkeypatch) -> None:
    save_file(make_model().state_dict(), tmp_path / "c.safetensors")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if it were not installed
    with pytest.raises(CheckpointError, match=r"needs the safetensors package: pip install "):
        load_checkpoint(tmp_path / "c.safetensors")


MODEL_FACTORY = """
from sdi_pipeline.toy.model import LoopedGPT, LoopedGPTConfig

def build():
    return LoopedGPT(LoopedGPTConfig(d_model=32, n_heads=4, d_mlp=64, n_loops=4))
"""
DATA_FACTORY = """
from sdi_pipeline.toy.parity import make_parity_dataset

def parity(n, seed):
    return make_parity_dataset(n, n_bits=6, seed=seed)
"""
MODEL_GROUP = """# @package _global_
model:
  _target_: cwdmodels.build
analysis:
  targets: [block]
"""
DATA_GROUP = """# @package _global_
data:
  train: {_target_: confdata.parity, n: 24, seed: 1}
  query: {_target_: confdata.parity, n: 3, seed: 2}
  batch_size: 8
  block_size: 12
analysis:
  loss: {_target_: sdi_pipeline.toy.parity.parity_loss, _partial_: true}
"""


def test_trainer_checkpoints_through_sdi_attribute_with_the_users_factories(tmp_path) -> None:
    """As a user runs it: the installed command in their folder, a model factory there, a
    data factory next to their configs; the jobs import both; eta comes from the Trainer."""
    work, conf = tmp_path / "work", tmp_path / "myconf"
    for folder in (work, conf / "model", conf / "data"):
        folder.mkdir(parents=True)
    (work / "cwdmodels.py").write_text(MODEL_FACTORY)
    (conf / "confdata.py").write_text(DATA_FACTORY)
    (conf / "model" / "cwdlm.yaml").write_text(MODEL_GROUP)
    (conf / "data" / "mine.yaml").write_text(DATA_GROUP)
    for step in (10, 2):
        write_trainer_checkpoint(work / "out", make_model(seed=step), step, LOG)
    command = [
        str(Path(sys.executable).with_name("sdi-attribute")),
        "--config-dir", "../myconf", "model=cwdlm", "data=mine",
        "checkpoints=files", "checkpoints.paths=[out/checkpoint-*]",
        f"run.root={tmp_path / 'runs'}", "sketch.m=64", "launcher.workers=1",
        "runtime.progress=false", "wandb=disabled",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out, ckpts = proc.stdout, work.resolve() / "out"
    assert f"checkpoint 0: {ckpts}/checkpoint-2, eta 0.0005 from trainer_state.json" in out
    assert f"checkpoint 1: {ckpts}/checkpoint-10, eta 0.0004 from trainer_state.json" in out
    assert "[sdi] loss: sdi_pipeline.toy.parity.parity_loss (from data=mine)" in out
    assert "\nloss: sdi_pipeline.toy.parity.parity_loss (from data=mine)\n" in out  # summary
    (run_path,) = (tmp_path / "runs" / "cwdlm").iterdir()  # named after the model group
    with Results.open(run_path) as res:
        assert res.etas == [5e-4, 4e-4]
    worker_log = (run_path / "logs" / "worker-0000.log").read_text()
    assert "eta 0.0004 from trainer_state.json: learning_rate logged at step 5" in worker_log
    # A job started elsewhere (as on a cluster node) still imports the factories.
    shutil.rmtree(run_path / "query")
    job = [sys.executable, "-m", "sdi_pipeline.launch.cli", "query", f"run_dir={run_path}"]
    proc = subprocess.run(job, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (run_path / "query" / "ckpt-001.h5").is_file()


def tiny_mixtral(seed: int) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    return MixtralForCausalLM(config)


def test_a_folder_in_the_original_layout_loads_through_the_class_loader(tmp_path) -> None:
    # transformers 5 saves Mixtral's fused experts unfused (w1/w2/w3 per expert): the raw
    # keys do not fit the model, the class's own loader converts them.
    saved = tiny_mixtral(seed=1)
    saved.save_pretrained(tmp_path / "hf")
    raw = load_checkpoint(tmp_path / "hf")
    assert set(raw["state_dict"]) != set(saved.state_dict())
    model = tiny_mixtral(seed=2)
    load_into(model, raw, tmp_path / "hf")
    assert_same_weights(model, saved)


def test_the_class_loader_never_unpickles_an_untrusted_folder(tmp_path) -> None:
    saved = tiny_mixtral(seed=1)
    saved.save_pretrained(tmp_path / "hf")
    # The same folder as an older save_pretrained wrote it: pickled weights only.
    weights = tmp_path / "hf" / "model.safetensors"
    torch.save(load_file(weights), tmp_path / "hf" / "pytorch_model.bin")
    weights.unlink()
    data = load_checkpoint(tmp_path / "hf")  # weights_only: tensors only
    with pytest.raises(CheckpointError, match=r"checkpoints\.trust=true") as err:
        load_into(tiny_mixtral(seed=2), data, tmp_path / "hf")
    assert "\n" not in str(err.value)
    model = tiny_mixtral(seed=2)
    load_into(model, data, tmp_path / "hf", trust=True)
    assert_same_weights(model, saved)
