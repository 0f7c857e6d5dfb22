"""Token datasets in every format, their error messages, PadCollate, and the LM losses."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Subset

from sdi_pipeline.errors import SDIError
from sdi_pipeline.inputs.data import PadCollate, TokenDataset, token_dataset
from sdi_pipeline.inputs.losses import answer_token_loss, next_token_loss

ROWS = np.arange(24, dtype=np.int32).reshape(6, 4)
RAGGED = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]


def _ids(ds: TokenDataset) -> list[list[int]]:
    """All rows as lists, checking each item's form on the way."""
    out = []
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"input_ids"}
        ids = item["input_ids"]
        assert ids.dtype == torch.int64 and ids.dim() == 1
        out.append(ids.tolist())
    return out


def _write_jsonl(path: Path, rows: list[list[int]], column: str = "input_ids") -> Path:
    lines = [json.dumps({column: r, "text": "x"}) for r in rows]
    path.write_text("\n".join(lines) + "\n\n")  # trailing blank lines are not rows
    return path


# --- formats ------------------------------------------------------------------------------------


def test_npy_2d_is_memory_mapped(tmp_path: Path) -> None:
    path = tmp_path / "tokens.npy"
    np.save(path, ROWS)
    ds = token_dataset(str(path))
    assert ds.format == "npy" and len(ds) == 6
    assert _ids(ds) == ROWS.tolist()
    assert ds[-1]["input_ids"].tolist() == ROWS[-1].tolist()
    assert isinstance(ds._source._array, np.memmap)  # type: ignore[attr-defined]
    again = pickle.loads(pickle.dumps(ds))  # no array in the pickle; remapped on demand
    assert again._source._array is None  # type: ignore[attr-defined]
    assert _ids(again) == ROWS.tolist()


def test_npy_ragged_refused_by_default_and_allowed(tmp_path: Path) -> None:
    path = tmp_path / "ragged.npy"
    arr = np.empty(len(RAGGED), dtype=object)
    arr[:] = [np.asarray(r, dtype=np.int64) for r in RAGGED]
    np.save(path, arr, allow_pickle=True)
    with pytest.raises(SDIError, match=r"ragged.npy is an object array.*allow_pickle=True"):
        token_dataset(str(path))
    ds = token_dataset(str(path), allow_pickle=True)
    assert _ids(ds) == RAGGED


def test_pt_tensor_list_and_dict(tmp_path: Path) -> None:
    torch.save(torch.from_numpy(ROWS).to(torch.int16), tmp_path / "t.pt")
    assert _ids(token_dataset(str(tmp_path / "t.pt"))) == ROWS.tolist()

    torch.save([torch.tensor(r) for r in RAGGED], tmp_path / "l.pt")
    assert _ids(token_dataset(str(tmp_path / "l.pt"))) == RAGGED

    torch.save({"input_ids": torch.from_numpy(ROWS), "other": torch.zeros(2)}, tmp_path / "d.pt")
    assert _ids(token_dataset(str(tmp_path / "d.pt"))) == ROWS.tolist()
    torch.save({"toks": [torch.tensor(r) for r in RAGGED]}, tmp_path / "k.pt")
    assert _ids(token_dataset(str(tmp_path / "k.pt"), key="toks")) == RAGGED


def test_h5_lazy_pickles_and_loads_through_dataloader(tmp_path: Path) -> None:
    path = tmp_path / "tokens.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("input_ids", data=ROWS.astype(np.uint16))
        f.create_dataset("other", data=ROWS)
    ds = token_dataset(str(path))
    assert ds._source._file is None  # type: ignore[attr-defined]  # nothing opened yet
    assert _ids(ds) == ROWS.tolist()
    assert ds._source._file is not None  # type: ignore[attr-defined]  # handle kept for reuse

    again = pickle.loads(pickle.dumps(ds))  # an open h5py handle cannot be pickled
    assert again._source._file is None  # type: ignore[attr-defined]
    assert _ids(again) == ROWS.tolist()

    loader = DataLoader(Subset(again, range(1, 5)), batch_size=3, shuffle=False, num_workers=0)
    batches = [b["input_ids"] for b in loader]
    assert [b.shape for b in batches] == [(3, 4), (1, 4)]
    assert torch.cat(batches).tolist() == ROWS[1:5].tolist()

    assert _ids(token_dataset(str(path), key="other", format="hdf5")) == ROWS.tolist()


def test_jsonl_indexed_and_parsed_on_demand(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "tokens.jsonl", RAGGED)
    ds = token_dataset(str(path))
    assert ds.format == "jsonl" and len(ds) == len(RAGGED)
    assert _ids(ds) == RAGGED
    assert _ids(pickle.loads(pickle.dumps(ds))) == RAGGED

    other = _write_jsonl(tmp_path / "lines.json", RAGGED, column="tokens")
    assert _ids(token_dataset(str(other), column="tokens")) == RAGGED


def test_jsonl_bad_line_is_reported_when_read(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input_ids": [1, 2]}\n{"input_ids": [1.5, 2]}\nnot json\n')
    ds = token_dataset(str(path))
    with pytest.raises(SDIError, match=r"bad.jsonl line 2 column 'input_ids' holds float64"):
        ds[1]
    with pytest.raises(SDIError, match=r"bad.jsonl line 3 is not valid JSON"):
        ds[2]


def test_hf_save_to_disk(tmp_path: Path) -> None:
    import datasets  # a dev dependency: this test runs wherever the tests do

    path = tmp_path / "hf"
    datasets.Dataset.from_dict({"input_ids": RAGGED, "text": ["a"] * len(RAGGED)}).save_to_disk(
        str(path)
    )
    ds = token_dataset(str(path))
    assert ds.format == "hf"
    assert _ids(ds) == RAGGED
    assert _ids(token_dataset(str(path), offset=1, limit=2)) == RAGGED[1:3]
    with pytest.raises(SDIError, match=r"no column 'tokens'.*input_ids, text"):
        token_dataset(str(path), column="tokens")


def test_hf_directory_without_datasets_package(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "state.json").write_text("{}")
    with pytest.raises(SDIError, match=r"needs the `datasets` package: pip install datasets"):
        token_dataset(str(tmp_path / "hf"))


def test_offset_and_limit_select_a_window(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", ROWS)
    ds = token_dataset(str(tmp_path / "a.npy"), offset=2, limit=3)
    assert len(ds) == 3 and _ids(ds) == ROWS[2:5].tolist()
    with pytest.raises(IndexError):
        ds[3]
    # limit is a cap: a window running past the end stops at the last row
    assert _ids(token_dataset(str(tmp_path / "a.npy"), offset=4, limit=10)) == ROWS[4:].tolist()
    path = _write_jsonl(tmp_path / "a.jsonl", RAGGED)
    assert _ids(token_dataset(str(path), offset=1, limit=2)) == RAGGED[1:3]
    assert _ids(token_dataset(str(path), offset=3)) == RAGGED[3:]


def test_hydra_instantiate(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", ROWS)
    cfg = OmegaConf.create(
        {
            "train": {
                "_target_": "sdi_pipeline.inputs.data.token_dataset",
                "path": str(tmp_path / "a.npy"),
                "limit": 2,
            },
            "collate": {"_target_": "sdi_pipeline.inputs.data.PadCollate", "pad_id": 7},
            "loss": {"_target_": "sdi_pipeline.inputs.losses.next_token_loss", "_partial_": True},
        }
    )
    ds = instantiate(cfg.train)
    assert len(ds) == 2
    assert instantiate(cfg.collate).pad_id == 7
    assert callable(instantiate(cfg.loss))


# --- user mistakes ------------------------------------------------------------------------------


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(SDIError, match=r"nope.npy does not exist"):
        token_dataset(str(tmp_path / "nope.npy"))
    (tmp_path / "a.csv").write_text("1,2\n")
    with pytest.raises(SDIError, match=r"cannot tell the format of .*a.csv.*set format="):
        token_dataset(str(tmp_path / "a.csv"))
    with pytest.raises(SDIError, match=r"unknown format 'parquet'"):
        token_dataset(str(tmp_path / "a.csv"), format="parquet")
    with pytest.raises(SDIError, match=r"cannot tell the format of directory"):
        token_dataset(str(tmp_path))
    (tmp_path / "junk.npy").write_bytes(b"not an npy file")
    with pytest.raises(SDIError, match=r"junk.npy is not a readable .npy file"):
        token_dataset(str(tmp_path / "junk.npy"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(SDIError, match=r"junk.pt could not be loaded with torch.load"):
        token_dataset(str(tmp_path / "junk.pt"))
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(SDIError, match=r"junk.h5 is not a readable HDF5 file"):
        token_dataset(str(tmp_path / "junk.h5"))


def test_float_data_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "f.npy", ROWS.astype(np.float32))
    with pytest.raises(SDIError, match=r"f.npy holds float32 values; token ids must be integers"):
        token_dataset(str(tmp_path / "f.npy"))
    torch.save(torch.zeros(2, 3), tmp_path / "f.pt")
    with pytest.raises(SDIError, match=r"f.pt holds torch.float32 values"):
        token_dataset(str(tmp_path / "f.pt"))
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("input_ids", data=ROWS.astype(np.float64))
    with pytest.raises(SDIError, match=r"f.h5\['input_ids'\] holds float64"):
        token_dataset(str(tmp_path / "f.h5"))
    _write_jsonl(tmp_path / "f.jsonl", [[0.5, 1.0]])  # type: ignore[list-item]
    with pytest.raises(SDIError, match=r"f.jsonl line 1 column 'input_ids' holds float64"):
        token_dataset(str(tmp_path / "f.jsonl"))  # the first row is read when built


def test_wrong_ndim_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "flat.npy", np.arange(10))
    with pytest.raises(SDIError, match=r"flat.npy has shape \(10,\); expected a 2-D \(N, T\)"):
        token_dataset(str(tmp_path / "flat.npy"))
    torch.save(torch.zeros(2, 3, 4, dtype=torch.long), tmp_path / "cube.pt")
    with pytest.raises(SDIError, match=r"cube.pt has shape \(2, 3, 4\)"):
        token_dataset(str(tmp_path / "cube.pt"))
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f.create_dataset("input_ids", data=np.arange(5))
    with pytest.raises(SDIError, match=r"flat.h5\['input_ids'\] has shape \(5,\)"):
        token_dataset(str(tmp_path / "flat.h5"))
    torch.save([torch.zeros(2, 2, dtype=torch.long)], tmp_path / "nested.pt")
    with pytest.raises(SDIError, match=r"nested.pt row 0 is 2-D"):
        token_dataset(str(tmp_path / "nested.pt"))


def test_missing_key_or_column(tmp_path: Path) -> None:
    torch.save({"tokens": torch.from_numpy(ROWS)}, tmp_path / "d.pt")
    with pytest.raises(SDIError, match=r"d.pt is a dict with no key 'input_ids' \(its keys: tok"):
        token_dataset(str(tmp_path / "d.pt"))
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("tokens", data=ROWS)
        f.create_group("grp")
    with pytest.raises(SDIError, match=r"d.h5 has no dataset 'input_ids' \(top-level keys: grp"):
        token_dataset(str(tmp_path / "d.h5"))
    with pytest.raises(SDIError, match=r"d.h5\['grp'\] is an HDF5 Group, not a dataset"):
        token_dataset(str(tmp_path / "d.h5"), key="grp")
    _write_jsonl(tmp_path / "d.jsonl", RAGGED, column="tokens")
    with pytest.raises(SDIError, match=r"d.jsonl line 1 has no column 'input_ids'.*text, tokens"):
        token_dataset(str(tmp_path / "d.jsonl"))
    torch.save("a string", tmp_path / "s.pt")
    with pytest.raises(SDIError, match=r"s.pt holds a str; expected a 2-D integer tensor"):
        token_dataset(str(tmp_path / "s.pt"))


def test_empty_dataset_and_bad_window(tmp_path: Path) -> None:
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), dtype=np.int64))
    with pytest.raises(SDIError, match=r"empty.npy contains no rows"):
        token_dataset(str(tmp_path / "empty.npy"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SDIError, match=r"empty.jsonl contains no rows"):
        token_dataset(str(tmp_path / "empty.jsonl"))
    np.save(tmp_path / "a.npy", ROWS)
    with pytest.raises(SDIError, match=r"offset=6 is beyond the end of .*a.npy, which has 6 rows"):
        token_dataset(str(tmp_path / "a.npy"), offset=6)
    with pytest.raises(SDIError, match=r"offset must be a non-negative integer, got -1"):
        token_dataset(str(tmp_path / "a.npy"), offset=-1)
    with pytest.raises(SDIError, match=r"limit must be a positive integer or None, got 0"):
        token_dataset(str(tmp_path / "a.npy"), limit=0)


# --- PadCollate ---------------------------------------------------------------------------------


def test_pad_collate_ragged_and_equal() -> None:
    collate = PadCollate(pad_id=9)
    out = collate([{"input_ids": torch.tensor(r)} for r in RAGGED])
    assert out["input_ids"].dtype == torch.int64 and out["attention_mask"].dtype == torch.int64
    assert out["input_ids"].tolist() == [
        [1, 2, 3, 9],
        [4, 9, 9, 9],
        [5, 6, 9, 9],
        [7, 8, 9, 10],
    ]
    assert out["attention_mask"].tolist() == [
        [1, 1, 1, 0],
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 1],
    ]
    same = PadCollate()([{"input_ids": torch.tensor([1, 2])}, {"input_ids": torch.tensor([3, 4])}])
    assert same["input_ids"].tolist() == [[1, 2], [3, 4]]
    assert same["attention_mask"].tolist() == [[1, 1], [1, 1]]


def test_pad_collate_keeps_other_keys_and_works_in_a_dataloader(tmp_path: Path) -> None:
    out = PadCollate()(
        [{"input_ids": torch.tensor([1]), "target": 1}, {"input_ids": [2, 3], "target": 0}]
    )
    assert out["target"].tolist() == [1, 0]
    path = _write_jsonl(tmp_path / "a.jsonl", RAGGED)
    loader = DataLoader(
        Subset(token_dataset(str(path)), range(0, 3)), batch_size=2, collate_fn=PadCollate()
    )
    shapes = [tuple(b["input_ids"].shape) for b in loader]
    assert shapes == [(2, 3), (1, 2)]


def test_pad_collate_errors() -> None:
    with pytest.raises(SDIError, match=r"PadCollate got an empty batch"):
        PadCollate()([])
    with pytest.raises(SDIError, match=r"example 0 is dict with keys tokens"):
        PadCollate()([{"tokens": torch.tensor([1])}])
    with pytest.raises(SDIError, match=r"pad_id must be an integer"):
        PadCollate(pad_id=0.5)  # type: ignore[arg-type]


# --- losses -------------------------------------------------------------------------------------


class TinyLM(nn.Module):
    """Embedding then a linear head: logits at position t depend on token t only."""

    def __init__(self, vocab: int = 11, dim: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(input_ids))


def test_next_token_loss_matches_hand_computation_with_padding() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    batch = PadCollate(pad_id=0)([{"input_ids": torch.tensor(r)} for r in RAGGED[:1] + RAGGED[2:]])
    # rows: [1,2,3,0] mask [1,1,1,0]; [5,6,0,0] mask [1,1,0,0]; [7,8,9,10] mask all 1
    loss = next_token_loss(model, batch)
    assert loss.shape == (3,)

    def ce(prev: int, nxt: int) -> torch.Tensor:
        logits = model(torch.tensor([[prev]]))[0, 0]
        return -F.log_softmax(logits, dim=-1)[nxt]

    expected = torch.stack(
        [
            (ce(1, 2) + ce(2, 3)) / 2,
            ce(5, 6),
            (ce(7, 8) + ce(8, 9) + ce(9, 10)) / 3,
        ]
    )
    torch.testing.assert_close(loss, expected)
    # Padding does not change an example's loss: the same row alone, unpadded.
    alone = next_token_loss(model, {"input_ids": torch.tensor([[5, 6]])})
    torch.testing.assert_close(alone, loss[1:2])
    # Per-example losses carry per-example gradients (nothing was reduced over the batch).
    loss[0].backward()
    assert model.emb.weight.grad is not None and model.emb.weight.grad[5].abs().sum() == 0


def test_next_token_loss_without_mask_and_errors() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    loss = next_token_loss(model, {"input_ids": ids})
    assert loss.shape == (2,)
    full = F.cross_entropy(
        model(ids)[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1), reduction="none"
    )
    torch.testing.assert_close(loss, full.view(2, 2).mean(dim=1))

    short = PadCollate()([{"input_ids": torch.tensor([1])}, {"input_ids": torch.tensor([1, 2])}])
    with pytest.raises(SDIError, match=r"1 of 2 example\(s\) in the batch have no target"):
        next_token_loss(model, short)
    with pytest.raises(SDIError, match=r"needs a batch dict with 'input_ids'"):
        next_token_loss(model, {"tokens": ids})


def test_answer_token_loss_uses_last_real_position() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    batch = PadCollate()(
        [
            {"input_ids": torch.tensor([1, 2, 3]), "target": 4},
            {"input_ids": torch.tensor([5]), "target": 6},
        ]
    )
    loss = answer_token_loss(model, batch)
    assert loss.shape == (2,)
    expected = torch.stack(
        [
            F.cross_entropy(model(torch.tensor([[3]]))[0, -1], torch.tensor(4)),
            F.cross_entropy(model(torch.tensor([[5]]))[0, -1], torch.tensor(6)),
        ]
    )
    torch.testing.assert_close(loss, expected)
    with pytest.raises(SDIError, match=r"needs batch\['target'\]"):
        answer_token_loss(model, {"input_ids": torch.tensor([[1, 2]])})
