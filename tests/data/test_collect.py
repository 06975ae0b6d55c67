"""tdhook_fx.collect in one process: what is stored equals the compiled module run batch by batch."""

from __future__ import annotations

import json

import pytest
import torch
from tensordict import MemoryMappedTensor, TensorDict
from torch.utils.data import DataLoader, Dataset

import tdhook_fx
from tdhook_fx.errors import InvalidArgument, MissingInputKey, TdhookFxError
from tdhook_fx.latent import ActivationCaching
from tests.data import workers
from tests.data.workers import Batches, batch, compiled, expected


def assert_stored(got: TensorDict, want: TensorDict, **tolerances) -> None:
    assert got.batch_size == want.batch_size
    for key in want.keys(include_nested=True, leaves_only=True):
        torch.testing.assert_close(got[key], want[key], **tolerances)


def test_every_saved_value_and_output_of_every_batch_in_order(tmp_path):
    stored = tdhook_fx.collect(compiled(), [batch(n) for n in range(5)], tmp_path / "out", outputs=["label", "logits"])
    want = expected(5)
    assert_stored(stored, want)
    assert all(isinstance(value, MemoryMappedTensor) for value in stored.values(include_nested=True, leaves_only=True))
    assert set(stored.keys(include_nested=True, leaves_only=True)) == {
        ("saved", "layers.0"), ("saved", "layers.1"), ("saved", "layers.2"), "label", "logits"
    }
    again = TensorDict.load_memmap(tmp_path / "out")  # later, by anyone: batch dimension = all examples
    assert again.batch_size == torch.Size([20])
    assert_stored(again, want)
    summary = json.loads((tmp_path / "out" / "collect.json").read_text())
    assert (summary["batches"], summary["examples"], summary["rows"]) == (5, 20, 20)
    assert not (tmp_path / "out" / ".collecting").exists()


def test_the_callers_batches_are_left_unchanged(tmp_path):
    batches = [batch(n) for n in range(2)]
    tdhook_fx.collect(compiled(), batches, tmp_path / "out")
    assert set(batches[0].keys()) == {"input_ids", "attention_mask", "label"}


def test_storage_dtype(tmp_path):
    stored = tdhook_fx.collect(compiled(), [batch(n) for n in range(3)], tmp_path / "out", outputs=["label"], dtype=torch.bfloat16)
    want = expected(3)
    assert stored["saved", "layers.0"].dtype == torch.bfloat16
    assert stored["label"].dtype == torch.int64  # only floating-point values are cast
    for key in want["saved"].keys():
        torch.testing.assert_close(stored["saved", key], want["saved", key].to(torch.bfloat16))


def test_token_rows_drop_padding(tmp_path):
    stored = tdhook_fx.collect(compiled(), [batch(n) for n in range(4)], tmp_path / "out", outputs=["label"], mask="attention_mask")
    assert_stored(stored.exclude("position", "example"), expected(4, mask=True))
    masks = torch.cat([batch(n)["attention_mask"] for n in range(4)])
    example, position = masks.nonzero().unbind(1)
    assert torch.equal(stored["example"], example)
    assert torch.equal(stored["position"], position)


def test_flatten_keeps_every_token(tmp_path):
    stored = tdhook_fx.collect(compiled(), [batch(n) for n in range(2)], tmp_path / "out", flatten=True)
    assert stored.batch_size == torch.Size([2 * workers.BATCH * workers.SEQ])
    want = torch.cat([compiled()(batch(n))["saved", "layers.2"].reshape(-1, workers.WIDTH) for n in range(2)])
    torch.testing.assert_close(stored["saved", "layers.2"], want)
    assert stored["position"][: workers.SEQ + 1].tolist() == [*range(workers.SEQ), 0]


def test_a_values_without_a_token_dimension_cannot_be_flattened(tmp_path):
    cm = compiled("save layers[0]")
    batches = [batch(0).set("other", torch.zeros(workers.BATCH, 3, workers.SEQ))]
    with pytest.raises(InvalidArgument, match="cannot flatten tokens of 'other': its second dimension is 3"):
        tdhook_fx.collect(cm, batches, tmp_path / "out", outputs=["other"], mask="attention_mask")


def test_a_method_s_hooked_module(tmp_path):
    s = workers.sample()
    with ActivationCaching(r"layers\.\d+$").prepare(s.model, in_keys=s.in_keys, out_keys=s.out_keys) as hooked:
        stored = tdhook_fx.collect(hooked, [batch(n) for n in range(3)], tmp_path / "out")
    want = expected(3)
    assert set(stored.keys()) == {"cache"}
    for name in ("layers.0", "layers.1", "layers.2"):
        torch.testing.assert_close(stored["cache", name], want["saved", name])


# ---- where batches come from ----------------------------------------------------------------------


class Examples(Dataset):
    """A map-style dataset of single examples (dicts of tensors) that counts what it loads."""

    def __init__(self, count: int):
        self.examples = torch.cat([batch(n) for n in range(count // workers.BATCH)])
        self.loaded = []

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        self.loaded.append(index)
        return {key: self.examples[key][index] for key in ("input_ids", "attention_mask", "label")}


def test_a_dataloader_of_dicts(tmp_path):
    loader = DataLoader(Examples(12), batch_size=workers.BATCH)
    stored = tdhook_fx.collect(compiled(), loader, tmp_path / "out", outputs=["label"])
    assert_stored(stored, expected(3))


def test_a_tensordict_of_examples_cut_into_batches(tmp_path):
    examples = torch.cat([batch(n) for n in range(3)])
    stored = tdhook_fx.collect(compiled(), examples, tmp_path / "out", outputs=["label"], batch_size=5)
    assert_stored(stored, expected(3))
    summary = json.loads((tmp_path / "out" / "collect.json").read_text())
    assert summary["batches"] == 3  # 12 examples: 5 + 5 + 2


def test_a_generator(tmp_path):
    stored = tdhook_fx.collect(compiled(), (batch(n) for n in range(3)), tmp_path / "out", outputs=["label"])
    assert_stored(stored, expected(3))


def test_a_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    examples = torch.cat([batch(n) for n in range(3)])
    table = datasets.Dataset.from_dict({
        "text": [f"sentence {i}" for i in range(12)],  # not a tensor: left out
        **{key: examples[key].tolist() for key in ("input_ids", "attention_mask", "label")},
    })
    stored = tdhook_fx.collect(compiled(), table, tmp_path / "out", outputs=["label"], batch_size=workers.BATCH)
    assert_stored(stored, expected(3))
    streamed = tdhook_fx.collect(
        compiled(), table.to_iterable_dataset(), tmp_path / "streamed", outputs=["label"], batch_size=workers.BATCH
    )
    assert_stored(streamed, expected(3))


def test_a_shuffling_or_already_split_dataloader_is_refused(tmp_path):
    from torch.utils.data.distributed import DistributedSampler

    with pytest.raises(InvalidArgument, match="shuffle=False"):
        tdhook_fx.collect(compiled(), DataLoader(Examples(8), batch_size=4, shuffle=True), tmp_path / "a")
    split = DataLoader(Examples(8), batch_size=4, sampler=DistributedSampler(Examples(8), num_replicas=2, rank=0))
    with pytest.raises(InvalidArgument, match="give every rank the whole DataLoader"):
        tdhook_fx.collect(compiled(), split, tmp_path / "b")


# ---- resuming ------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def test_a_rerun_continues_after_the_last_complete_batch(tmp_path):
    fetched = tmp_path / "fetched"

    def interrupted():
        for number in range(6):
            if number == 4:
                raise Interrupted
            yield batch(number)

    with pytest.raises(Interrupted):
        tdhook_fx.collect(compiled(), interrupted(), tmp_path / "out", outputs=["label"])
    assert not (tmp_path / "out" / "meta.json").exists()
    stored = tdhook_fx.collect(compiled(), Batches(6, log=str(fetched)), tmp_path / "out", outputs=["label"])
    assert fetched.read_text().split() == ["4", "5"]  # batches 0-3 were complete: not run again
    assert_stored(stored, expected(6))


def test_a_dataloader_loads_only_the_batches_still_missing(tmp_path):
    dataset = Examples(16)
    loader = DataLoader(dataset, batch_size=workers.BATCH)
    with pytest.raises(Interrupted):
        tdhook_fx.collect(compiled(), _until(2), tmp_path / "out", outputs=["label"])
    stored = tdhook_fx.collect(compiled(), loader, tmp_path / "out", outputs=["label"])
    assert sorted(dataset.loaded) == list(range(8, 16))
    assert_stored(stored, expected(4))


def test_rows_of_an_interrupted_batch_are_cut_away(tmp_path):
    with pytest.raises(Interrupted):
        tdhook_fx.collect(compiled(), _until(3), tmp_path / "out", outputs=["label"])
    part = tmp_path / "out" / ".collecting" / "rank-0"
    for data in part.glob("*.bin"):  # as if killed while writing batch 3: half its rows, half a journal line
        with open(data, "ab") as file:
            file.write(b"\x01" * 37)
    with open(part / "journal.jsonl", "ab") as file:
        file.write(b'{"batch":3,"ro')
    stored = tdhook_fx.collect(compiled(), [batch(n) for n in range(5)], tmp_path / "out", outputs=["label"])
    assert_stored(stored, expected(5))


def _until(stop: int):
    for number in range(stop):
        yield batch(number)
    raise Interrupted


def test_a_finished_collection_is_returned_as_it_is(tmp_path):
    tdhook_fx.collect(compiled(), [batch(n) for n in range(3)], tmp_path / "out")
    fetched = tmp_path / "fetched"
    stored = tdhook_fx.collect(compiled(), Batches(3, log=str(fetched)), tmp_path / "out")
    assert not fetched.exists()
    assert_stored(stored, expected(3).exclude("label"))


def test_other_settings_are_refused_unless_overwriting(tmp_path):
    tdhook_fx.collect(compiled(), [batch(n) for n in range(3)], tmp_path / "out")
    with pytest.raises(TdhookFxError, match="other settings"):
        tdhook_fx.collect(compiled(), [batch(n) for n in range(3)], tmp_path / "out", dtype=torch.float16)
    with pytest.raises(TdhookFxError, match="holds a collection of 3 batches; these are 4"):
        tdhook_fx.collect(compiled(), [batch(n) for n in range(4)], tmp_path / "out")
    stored = tdhook_fx.collect(compiled(), [batch(n) for n in range(4)], tmp_path / "out", overwrite=True)
    assert stored.batch_size == torch.Size([16])


def test_a_directory_of_other_files_is_never_touched(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TdhookFxError, match="holds other files"):
        tdhook_fx.collect(compiled(), [batch(0)], tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_damaged_journal_is_refused(tmp_path):
    with pytest.raises(Interrupted):
        tdhook_fx.collect(compiled(), _until(2), tmp_path / "out")
    journal = tmp_path / "out" / ".collecting" / "rank-0" / "journal.jsonl"
    journal.write_bytes(b'{"batch": -1, "rows": 4, "examples": 4}\n')
    with pytest.raises(TdhookFxError, match="not a journal line written by tdhook_fx"):
        tdhook_fx.collect(compiled(), [batch(n) for n in range(3)], tmp_path / "out")
    (tmp_path / "out" / ".collecting" / "rank-0" / "layout.json").write_text('{"leaves": [{"key": ["a"], "dtype": "nn", "shape": []}], "constants": {}}')
    with pytest.raises(TdhookFxError, match="unknown dtype 'nn'"):
        tdhook_fx.collect(compiled(), [batch(n) for n in range(3)], tmp_path / "out")


# ---- mistakes ------------------------------------------------------------------------------------


def test_batches_of_another_shape_are_refused_with_the_fix(tmp_path):
    batches = [batch(0), batch(1, seq=workers.SEQ + 2)]
    with pytest.raises(TdhookFxError, match=r"batch 1 gives other rows.*saved\.layers\.0: 6x8 float32 before, saved\.layers\.0: 8x8 float32 now") as error:
        tdhook_fx.collect(compiled(), batches, tmp_path / "out")
    assert "mask=" in str(error.value)
    stored = tdhook_fx.collect(compiled(), batches, tmp_path / "tokens", mask="attention_mask")  # token rows fit
    assert stored["position"].max() >= workers.SEQ


def test_nothing_to_store_or_a_missing_entry(tmp_path):
    with pytest.raises(InvalidArgument, match="saves nothing"):
        tdhook_fx.collect(compiled("steer layers[0] *= 2"), [batch(0)], tmp_path / "a")
    with pytest.raises(MissingInputKey, match="no entry 'nope'"):
        tdhook_fx.collect(compiled(), [batch(0)], tmp_path / "b", outputs=["nope"])
    with pytest.raises(TdhookFxError, match="no batches"):
        tdhook_fx.collect(compiled(), [], tmp_path / "c")


def test_progress_bar(tmp_path, capsys):
    tdhook_fx.collect(compiled(), [batch(n) for n in range(3)], tmp_path / "a", progress=True)
    err = capsys.readouterr().err
    assert "collect" in err and "3/3" in err
    tdhook_fx.collect(compiled(), [batch(n) for n in range(3)], tmp_path / "b")  # not a terminal: no bar
    assert capsys.readouterr().err == ""


def test_each_rank_takes_every_world_th_batch():
    from tdhook_fx.data import shard
    from tdhook_fx.data.ranks import Ranks

    assert list(shard(range(7))) == list(range(7))  # one process: all of them
    shares = [list(Ranks(rank, 3).share(range(8))) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4, 7], [2, 5]]
