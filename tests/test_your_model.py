"""docs/your-model.md runs as written: its loss for keyword/dict models, and the Hugging Face
Trainer example (train.py, the model group, the sdi-attribute command and what it prints)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sdi_pipeline.inputs.losses import next_token_loss

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "your-model.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", PAGE, flags=re.S)


def files() -> dict[str, str]:
    """The page's Python files, by the name on their first line (``# mymodels.py``)."""
    out = {}
    for lang, body in BLOCKS:
        if lang == "python":
            name = body.splitlines()[0].removeprefix("# ").strip()
            out[name] = body
    return out


def test_the_page_has_the_files_this_test_runs() -> None:
    assert set(files()) == {"myconf/mylosses.py", "mymodels.py", "train.py"}
    assert [lang for lang, _ in BLOCKS].count("bash") == 1
    assert "docs/your-model.md" in (ROOT / "README.md").read_text()


class KeywordDictModel(nn.Module):
    """A model called with keywords that returns a dict, wrapping a plain LM."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, *, input_ids, attention_mask):
        return {"logits": self.head(self.emb(input_ids))}


def test_the_loss_for_keyword_and_dict_models_matches_next_token_loss(tmp_path) -> None:
    namespace: dict = {}
    exec(files()["myconf/mylosses.py"], namespace)
    model = KeywordDictModel()
    ids = torch.tensor([[1, 2, 3, 4], [2, 3, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    got = namespace["dict_lm_loss"](model, batch)

    class Positional(nn.Module):  # the same weights, called as next_token_loss calls
        def forward(self, input_ids):
            return model(input_ids=input_ids, attention_mask=None)["logits"]

    torch.testing.assert_close(got, next_token_loss(Positional(), batch))
    assert got.shape == (2,)


needs_hf = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("transformers", "accelerate")),
    reason="the Trainer example needs the hf extra (transformers, accelerate)",
)


@needs_hf
def test_the_trainer_example_runs_as_written(tmp_path) -> None:
    for name, body in files().items():
        if name != "myconf/mylosses.py":
            (tmp_path / name).write_text(body)
    (yaml,) = [body for lang, body in BLOCKS if lang == "yaml"]
    (tmp_path / "myconf" / "model").mkdir(parents=True)
    (tmp_path / "myconf" / "model" / "mylm.yaml").write_text(yaml)
    train = subprocess.run(
        [sys.executable, "train.py"], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "checkpoint-20",
        "checkpoint-40",
        "checkpoint-60",
    ]
    ((_, command),) = [b for b in BLOCKS if b[0] == "bash"]
    words = shlex.split(command.replace("\\\n", " "))
    assert words[0] == "sdi-attribute"
    program = str(Path(sys.executable).with_name("sdi-attribute"))
    run = subprocess.run(
        [program, *words[1:], "wandb=disabled", "runtime.progress=false"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "mylm").iterdir()
    shown = run.stdout.replace(f"{tmp_path}/", "").replace(run_dir.name, "<run id>")
    (printed,) = [body for lang, body in BLOCKS if lang == "text"]
    for line in printed.splitlines():
        assert line + "\n" in shown, line
    assert (run_dir / "plots" / "sdi_trajectories_query0.png").is_file()
