"""Everyday analysis: printed top-k listings group identical training inputs; results as an
xarray Dataset with labelled dims and the stored top-k as a pandas table."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
from pipeline_helpers import parity, run_all, toy_config

from sdi_pipeline.errors import ConfigError
from sdi_pipeline.formats.results import Results
from sdi_pipeline.inputs.build import build_dataset
from sdi_pipeline.report.summary import (
    DistinctExample,
    distinct_top,
    example_key,
    print_summary,
    trajectory_rows,
)

PER_TOKEN = {
    "loss": {"_target_": "sdi_pipeline.toy.parity.parity_loss", "_partial_": True,
             "per_token": True},
    "query_tokens": "all",
}  # fmt: skip


def test_distinct_top_counts_copies_anywhere_in_the_stored_list() -> None:
    inputs = {1: "a", 2: "a", 3: "b", 4: "c", 5: "a", 6: "d", 7: "c"}
    ranked = [(1, 0.9), (2, 0.9), (3, 0.5), (4, 0.4), (5, 0.3), (6, 0.2), (7, 0.1)]
    lines = distinct_top(ranked, inputs.__getitem__, k=2)
    # "c" (#4) is the third distinct input: not listed, and its copy #7 is not counted.
    assert lines == [DistinctExample(1, 0.9, [2, 5]), DistinctExample(3, 0.5, [])]
    assert len(distinct_top(ranked, inputs.__getitem__, k=10)) == 4


def test_example_key_is_exact() -> None:
    import torch

    tokens = torch.tensor([1, 0, 2])
    a = {"tokens": tokens, "target": torch.tensor(1)}
    assert example_key(a) == example_key({"target": torch.tensor(1), "tokens": tokens.clone()})
    assert example_key(a) != example_key({"tokens": tokens, "target": torch.tensor(0)})
    assert example_key(np.array([1, 2], np.int64)) != example_key(np.array([1, 2], np.int32))


def _listings(out: str, query: int) -> dict[str, list[str]]:
    """The printed listings of one query: title -> its example lines."""
    block = out.split(f"\nquery {query}:")[1].split("\nquery ")[0]
    listings: dict[str, list[str]] = {}
    title = ""
    for line in block.splitlines():
        if line.startswith("  top "):
            title = line.strip()
            listings[title] = []
        elif line.startswith("    train #"):
            listings[title].append(line.strip())
    return listings


@pytest.mark.parametrize("n_bits", [3, 1])
def test_printed_top_k_lists_distinct_inputs_with_their_copies(
    tmp_path, capsys, n_bits: int
) -> None:
    # 40 training examples of n bits: every input many times over.
    train = parity(40, 1) | {"n_bits": n_bits}
    run = run_all(toy_config(tmp_path, data={"train": train}, merge={"topk": 10}))
    data = build_dataset(run.load_config(), "train")
    print_summary(run, "parity_loss", k=3)
    out = capsys.readouterr().out
    with Results.open(run.path) as res:
        raw = [i for i, _ in res.topk(0)]
        assert len(raw) == 10  # the stored top-k keeps every copy
        assert len({example_key(data[i]) for i in raw}) < 10
        listings = _listings(out, 0)
        assert len(listings) == 2  # overall, and at the peak step
        for title, lines in listings.items():
            step = re.search(r"at (step \d+)", title)
            stored = [i for i, _ in res.topk(0, step=step.group(1) if step else None)]
            distinct = len({example_key(data[i]) for i in stored})
            assert len(lines) == min(3, distinct), (title, lines)
            if distinct < 3:  # 1 bit: 20 copies of each input, the stored 10 hold one or two
                assert f"only {distinct} distinct among the 10 stored" in title
            firsts = []
            for line in lines:
                first = int(re.match(r"train #(\d+)", line).group(1))
                firsts.append(first)
                same = [i for i in stored if example_key(data[i]) == example_key(data[first])]
                assert same[0] == first  # the best-ranked copy is the one listed
                copies = re.search(r"\(\+(\d+) identical: ([^)]*)\)", line)
                assert int(copies.group(1) if copies else 0) == len(same) - 1
                if copies:  # the first copies are named, in rank order
                    named = [int(i) for i in re.findall(r"#(\d+)", copies.group(2))]
                    assert named == same[1 : 1 + len(named)]
            assert len({example_key(data[i]) for i in firsts}) == len(firsts)
            # The listing follows the stored ranking.
            assert firsts == sorted(firsts, key=stored.index) and firsts[0] == stored[0]
        # The trajectories plot's rows: the same distinct inputs in the same order as the
        # printed top overall, copies grouped, each row that input's SDI across steps.
        rows, labels = trajectory_rows(res, 0, lambda i: example_key(data[i]))
        shown = [int(re.match(r"train #(\d+)", label).group(1)) for label in labels]
        overall = next(lines for title, lines in listings.items() if "overall" in title)
        printed = [int(re.match(r"train #(\d+)", line).group(1)) for line in overall]
        assert shown[: len(printed)] == printed
        assert len({example_key(data[i]) for i in shown}) == len(shown)
        copies = [i for i, _ in res.topk(0) if example_key(data[i]) == example_key(data[shown[0]])]
        assert labels[0] == f"train #{shown[0]}" + (
            f" (+{len(copies) - 1} identical)" if len(copies) > 1 else ""
        )
        for row, i in zip(rows, shown, strict=True):
            np.testing.assert_allclose(row, res.trajectory(i, 0), rtol=1e-6)
    assert (run.path / "plots" / "sdi_trajectories_query0.png").is_file()


@pytest.fixture(scope="module")
def token_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tokens")
    return run_all(toy_config(tmp_path, analysis=PER_TOKEN, merge={"step_matrix": True}))


def test_to_xarray_labels_train_query_step_and_token(token_run) -> None:
    with Results.open(token_run.path) as res:
        ds = res.to_xarray()
        assert ds.tracin.dims == ("train", "query")
        assert ds.sdi.dims == ("train", "query", "step")
        assert ds.sdi_tokens.dims == ("train", "query", "step", "token")
        assert ds.sdi_matrix.dims == ("train", "query", "train_step", "step")
        assert list(ds.step.values) == res.slot_names == ["step 1", "step 2", "step 3", "step 4"]
        assert ds.sizes["train"] == res.n_train and ds.sizes["token"] == 7  # 6 bits and "="
        np.testing.assert_array_equal(ds.token_position.values, res.token_positions)
        np.testing.assert_array_equal(ds.sdi.sel(step="step 3").values, res.sdi[:, :, 2])
        np.testing.assert_array_equal(ds.tracin.values, res.tracin[...])
        np.testing.assert_array_equal(ds.energy.values, res.energy())
        np.testing.assert_array_equal(ds.token_energy.values[2], res.token_map(2))
        # The parity loss lives at the answer token: every other token's SDI is zero.
        answer = ds.sdi_tokens.isel(token=-1)
        np.testing.assert_allclose(answer.values, ds.sdi.values, rtol=1e-5, atol=1e-7)
        assert float(abs(ds.sdi_tokens.isel(token=slice(0, -1))).max()) == 0.0
        assert ds.attrs["config_hash"] == res.config_hash
        rows = res.to_xarray(train=slice(5, 9))
        assert list(rows.train.values) == [5, 6, 7, 8]
        np.testing.assert_array_equal(rows.sdi.values, res.sdi[5:9])


def test_topk_frame_holds_every_stored_ranking(token_run) -> None:
    with Results.open(token_run.path) as res:
        overall = res.topk_frame()
        assert list(overall.columns) == [
            "query", "slot", "token", "position", "rank", "train_index", "score"
        ]  # fmt: skip
        assert len(overall) == res.n_query * res.k and set(overall.slot) == {"overall"}
        assert overall.token.isna().all() and overall.position.isna().all()
        q3 = overall[overall["query"] == 3].sort_values("rank")
        assert list(zip(q3.train_index, q3.score, strict=True)) == res.topk(3)
        assert q3["rank"].tolist() == list(range(1, res.k + 1))

        neg = res.topk_frame("per_step", "negative")
        at = neg[(neg["query"] == 1) & (neg.slot == "step 2")].sort_values("rank")
        expected = res.topk(1, step="step 2", sign="negative")
        assert list(zip(at.train_index, at.score, strict=True)) == expected

        tok = res.topk_frame("per_token")
        assert len(tok) == res.n_query * 4 * 7 * res.k
        last = tok[(tok["query"] == 0) & (tok.slot == "step 4") & (tok.token == 6)]
        assert set(last.position) == {6}
        expected = res.topk(0, step="step 4", token=6)
        assert list(zip(last.train_index, last.score, strict=True)) == expected
        with pytest.raises(ConfigError, match="scope must be one of overall, per_step"):
            res.topk_frame("per_query")


def test_notebook_helpers_say_which_package_to_install(token_run, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "xarray", None)  # import xarray raises ImportError
    monkeypatch.setitem(sys.modules, "pandas", None)
    with Results.open(token_run.path) as res:
        with pytest.raises(ConfigError, match=r"^to_xarray\(\) needs xarray: pip install xarray$"):
            res.to_xarray()
        with pytest.raises(ConfigError, match=r"^topk_frame\(\) needs pandas: pip install pandas$"):
            res.topk_frame()
