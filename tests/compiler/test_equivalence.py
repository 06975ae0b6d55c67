"""The core property: a compiled program does exactly what the hook reference does.

Hypothesis draws a valid program over each zoo model's real sites (save, set, steer, patch,
prune, stop, with indices and runtime values) and the inputs it runs on (compiled on the zoo's
example, run on others); every output and saved value must match.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensordict import TensorDict

from tdhook_fx.testing import inputs_like
from tests.compiler.properties import check_against_reference

MODELS = ["mlp", "cnn", "tiny_transformer", "gpt2", "bert", "llama", "gpt_neox", "minilm"]


@pytest.mark.parametrize("name", MODELS)
def test_compiled_program_equals_hook_reference(name, samples):
    check_against_reference(samples(name))


EXAMPLE = TensorDict(
    input_ids=torch.tensor([[3, 50, 7], [9, 4, 12]]), attention_mask=torch.ones(2, 3, dtype=torch.long),
    embeds=torch.zeros(2, 3, 4), batch_size=[2],
)


@given(inputs_like(EXAMPLE, ["input_ids", "attention_mask", "embeds"]))
def test_drawn_inputs_keep_shapes_dtypes_and_the_vocabulary(inputs):
    for key, drawn in zip(["input_ids", "attention_mask", "embeds"], inputs):
        assert drawn.shape == EXAMPLE[key].shape and drawn.dtype == EXAMPLE[key].dtype
    ids, mask, embeds = inputs
    assert 3 <= ids.min() and ids.max() <= 50
    assert torch.equal(mask, EXAMPLE["attention_mask"])
    assert embeds.std() > 0


@given(st.data())
def test_drawing_inputs_for_a_missing_key_names_the_key(data):
    with pytest.raises(KeyError, match=r"no input at key 'ids'; its keys: \['attention_mask', 'embeds', 'input_ids'\]"):
        data.draw(inputs_like(EXAMPLE, ["ids"]))
