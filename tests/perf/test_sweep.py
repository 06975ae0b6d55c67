"""tdhook_fx.perf.sweep: every (site, position) entry equals that one patch run with the hook reference."""

import pytest
import torch
from tensordict import TensorDict

from tdhook_fx import reference
from tdhook_fx.errors import BindingError, ResolutionError, TdhookFxError
from tdhook_fx.perf.sweep import sweep
from tests import zoo

CASES = {  # model: (swept sites, positions)
    "mlp": ("*", None),
    "cnn": ("{0,2,4}", [0, 3, 7]),  # in-place ReLU; positions are channels
    "tiny_transformer": ("blocks[*]", [0, 2, 5]),
    "gpt2": ("transformer.h[*]", [0, 3, 6]),
    "llama": ("model.layers[*]", [0, 6]),
}


def with_source(sample, source="patched"):
    td = sample.example.clone()
    for key, value in zip(sample.in_keys, zoo.source_inputs(sample)):
        td[source, key] = value
    return td


def reference_patch(sample, td, site, index, source="patched"):
    text = f"patch {site}[{index}]" + (f" from {source}" if source != "patched" else "")
    return reference.run(sample.model, text, td, in_keys=sample.in_keys, out_keys=sample.out_keys)


def assert_matches_reference(sample, td, result, index_of, metric=None, source="patched"):
    (sites, positions) = result.batch_size
    assert sites > 0 and positions > 0
    for i in range(sites):
        for j in range(positions):
            site, position = result["site"][i], int(result[i, j]["position"])
            want = reference_patch(sample, td, site, index_of(position), source)
            if metric is None:
                for key in sample.out_keys:
                    torch.testing.assert_close(result[key][i, j], want[key], rtol=1e-4, atol=1e-5)
            else:
                run = td.copy()
                for key in sample.out_keys:
                    run[key] = want[key]
                torch.testing.assert_close(result["metric"][i, j], metric(run), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [n if n != "llama" else pytest.param(n, marks=pytest.mark.slow) for n in CASES])
def test_sweep_equals_one_reference_patch_per_entry(name, samples):
    sample = samples(name)
    sites, positions = CASES[name]
    td = with_source(sample)
    result = sweep(
        sample.model, sites, td, positions=positions, in_keys=sample.in_keys, out_keys=sample.out_keys, chunk_size=3
    )
    assert_matches_reference(sample, td, result, lambda p: f":, {p}")


def test_metric_positions_and_last_dimension(samples):
    sample = samples("gpt2")
    td = with_source(sample, source="corrupt")

    def last_token_logit_gap(run):
        return run["logits"][:, -1, 0] - run["logits"][:, -1, 1]

    result = sweep(
        sample.model, "transformer.h[1].mlp", td, positions=[0, 5, -1], dim=-1, metric=last_token_logit_gap,
        source="corrupt", in_keys=sample.in_keys, out_keys=sample.out_keys,
    )
    assert tuple(result.batch_size) == (1, 3)
    assert result["metric"].shape == (1, 3, 2)
    assert result["position"].tolist() == [[0, 5, -1]]
    assert result["site"] == ["transformer.h.1.mlp"]
    assert_matches_reference(sample, td, result, lambda p: f"..., {p}", last_token_logit_gap, source="corrupt")


@pytest.mark.parametrize("how", ["one_at_a_time", "tiny_budget", "no_vmap"])
def test_chunking_and_fallback_give_the_same_result(how, samples, monkeypatch):
    sample = samples("tiny_transformer")
    td = with_source(sample)
    options = {"in_keys": sample.in_keys, "out_keys": sample.out_keys}
    whole = sweep(sample.model, "blocks[*]", td, **options)
    if how == "one_at_a_time":
        other = sweep(sample.model, "blocks[*]", td, chunk_size=1, **options)
    elif how == "tiny_budget":
        other = sweep(sample.model, "blocks[*]", td, memory_budget=1, **options)
    else:
        def refuse(*args, **kwargs):
            raise RuntimeError("vmap: no batching rule for this op")

        monkeypatch.setattr(torch.func, "vmap", refuse)
        with pytest.warns(UserWarning, match="one at a time"):
            other = sweep(sample.model, "blocks[*]", td, **options)
    torch.testing.assert_close(other["logits"], whole["logits"], rtol=1e-5, atol=1e-6)


def test_site_labels_are_plain_strings(samples):
    sample = samples("mlp")
    result = sweep(sample.model, "{0,2}", with_source(sample), positions=[0, 1])
    assert type(result["site"]) is list and result["site"] == ["0", "2"]
    assert repr(result["site"]) == "['0', '2']"  # not nested LinkedList([...]) stacks
    assert result[1]["site"] == ["0", "2"] and result["position"][1].tolist() == [0, 1]


def test_progress_bar_counts_every_run(samples, capsys):
    sample = samples("mlp")
    sweep(sample.model, "{0,2}", with_source(sample), progress=True)
    err = capsys.readouterr().err
    assert "patching sweep" in err and "32/32" in err


def test_the_model_is_left_unchanged(samples):
    sample = samples("cnn")
    state = {k: v.clone() for k, v in sample.model.state_dict().items()}
    sweep(sample.model, "{0,2}", with_source(sample), positions=[0, 1])
    for key, value in sample.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not sample.model.training


def test_errors_name_the_problem_and_the_fix(samples):
    sample = samples("mlp")
    td = with_source(sample)
    with pytest.raises(BindingError, match=r"no source input at \('other', 'input'\)"):
        sweep(sample.model, "0", td, source="other")
    with pytest.raises(TdhookFxError, match="out of range for dimension 1 of 0"):
        sweep(sample.model, "0", td, positions=[16])
    with pytest.raises(TdhookFxError, match="has no dimension 2"):
        sweep(sample.model, "0", td, dim=2)
    with pytest.raises(TdhookFxError, match="names part of a tensor"):
        sweep(sample.model, "0[:, 1]", td)
    with pytest.raises(ResolutionError, match="unknown module path"):
        sweep(sample.model, "nope", td)
    sample.model.train()
    try:
        with pytest.raises(TdhookFxError, match="eval mode"):
            sweep(sample.model, "0", td)
    finally:
        sample.model.eval()


def test_in_place_change_after_the_site_is_not_seen_by_the_sweep():
    torch.manual_seed(5)
    model = zoo.InPlaceAfterSite().eval()
    td = TensorDict(input=torch.randn(4, 6), batch_size=[4])
    td["patched", "input"] = torch.randn(4, 6)
    result = sweep(model, "{lin1,lin2}", td, positions=[0, 2])
    for i, site in enumerate(["lin1", "lin2"]):
        for j, position in enumerate([0, 2]):
            want = reference.run(model, f"patch {site}[:, {position}]", td)["output"]
            torch.testing.assert_close(result["output"][i, j], want)


# ---- many prompts, streamed in batches to disk -----------------------------------------------------


def prompts(sample, number: int, size: int = 3) -> TensorDict:
    """Batch `number` of prompts for `sample`, with its source prompts at ("patched", in_key)."""
    generator = torch.Generator().manual_seed(500 + number)
    td = TensorDict(batch_size=[size])
    for key in sample.in_keys:
        example = sample.example[key]
        shape = (size, *example.shape[1:])
        for target in (key, ("patched", key)):
            td[target] = torch.randint(0, 50, shape, generator=generator)
    return td


def last_token_gap(run):
    return run["logits"][:, -1, 0] - run["logits"][:, -1, 1]  # one value per prompt


def test_streamed_to_disk_equals_one_sweep_per_batch(samples, tmp_path):
    sample = samples("tiny_transformer")
    options = dict(positions=[0, 2, 5], metric=last_token_gap, in_keys=sample.in_keys, out_keys=sample.out_keys)
    batches = [prompts(sample, n) for n in range(3)]
    stored = sweep(sample.model, "blocks[*]", batches, path=tmp_path / "sweep", **options)
    assert stored.batch_size == torch.Size([9])
    assert stored["metric"].shape == (9, 2, 3)
    assert stored["site"] == ["blocks.0", "blocks.1"] and stored["position"] == [0, 2, 5]
    for n, td in enumerate(batches):
        one = sweep(sample.model, "blocks[*]", td, **options)
        torch.testing.assert_close(stored["metric"][3 * n : 3 * n + 3], one["metric"].movedim(2, 0))
    again = TensorDict.load_memmap(tmp_path / "sweep")
    torch.testing.assert_close(again["metric"], stored["metric"])
    assert again["site"] == ["blocks.0", "blocks.1"]


def test_streamed_outputs_and_a_tensordict_of_many_prompts(samples, tmp_path):
    sample = samples("mlp")
    td = TensorDict(input=torch.randn(7, 16), batch_size=[7])
    td["patched", "input"] = torch.randn(7, 16)
    stored = sweep(sample.model, "{0,2}", td, positions=[1, 4], path=tmp_path / "sweep", batch_size=3)
    whole = sweep(sample.model, "{0,2}", td, positions=[1, 4])
    torch.testing.assert_close(stored["output"], whole["output"].movedim(2, 0))


def test_a_streamed_sweep_resumes_after_the_last_complete_batch(samples, tmp_path):
    sample = samples("mlp")
    batches = [with_source(sample) for _ in range(4)]
    for n, td in enumerate(batches):
        td.apply_(lambda x: x + n)
    runs = []

    def first_output(run):
        runs.append(1)
        return run["output"][:, 0]

    def interrupted():
        yield from batches[:2]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(sample.model, "{0,2}", interrupted(), positions=[0, 1], metric=first_output, path=tmp_path / "sweep")
    runs.clear()
    stored = sweep(sample.model, "{0,2}", batches, positions=[0, 1], metric=first_output, path=tmp_path / "sweep")
    assert len(runs) == 2 * 2 * 2  # only batches 2 and 3: 2 sites x 2 positions each
    whole = sweep(sample.model, "{0,2}", torch.cat(batches), positions=[0, 1], metric=first_output)
    torch.testing.assert_close(stored["metric"], whole["metric"].movedim(2, 0))


def test_streaming_needs_per_prompt_values_and_a_path(samples, tmp_path):
    sample = samples("mlp")
    batches = [with_source(sample)]
    with pytest.raises(TdhookFxError, match="one row per prompt"):
        sweep(sample.model, "0", batches, positions=[0], metric=lambda run: run["output"].mean(), path=tmp_path / "a")
    with pytest.raises(BindingError, match="path="):
        sweep(sample.model, "0", batches, positions=[0])


def test_heatmap_of_a_sweep_in_memory_and_on_disk(samples, tmp_path):
    pytest.importorskip("matplotlib")
    from tdhook_fx.plotting import sweep_heatmap

    sample = samples("tiny_transformer")
    options = dict(positions=[0, 2, 5], metric=last_token_gap, in_keys=sample.in_keys, out_keys=sample.out_keys)
    batches = [prompts(sample, n) for n in range(2)]
    stored = sweep(sample.model, "blocks[*]", batches, path=tmp_path / "sweep", **options)
    figure = sweep_heatmap(stored, chunk=4)  # averaged over the 6 prompts, 4 rows at a time
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["blocks.0", "blocks.1"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "2", "5"]
    torch.testing.assert_close(torch.as_tensor(ax.images[0].get_array()), stored["metric"].mean(0))
    one = sweep(sample.model, "blocks[*]", batches[0], **options)
    image = sweep_heatmap(one).axes[0].images[0].get_array()
    torch.testing.assert_close(torch.as_tensor(image), one["metric"].mean(-1))
    figure.savefig(tmp_path / "sweep.png")
