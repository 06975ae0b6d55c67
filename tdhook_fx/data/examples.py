"""Examples for the command line's `collect`: a dataset from disk, or random inputs like a sample's.

`load_examples(path)` reads a TensorDict saved with `td.memmap(path)` (tensordict's format,
non-tensor pickles refused) or a Hugging Face dataset saved with `save_to_disk` (needs the
`datasets` package). `random_examples(example, in_keys, count, sources)` makes `count` inputs
shaped like a sample's (token ids in its range, floats from a normal distribution, masks
copied), seeded, plus the same again at `(source, key)` for each patch source.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tensordict import TensorDict, TensorDictBase

from tdhook_fx.compiler.capture import join_keys, key_name
from tdhook_fx.errors import CommandLineError


def load_examples(path: Path):
    """A TensorDict memmap directory, or a `datasets` directory (`save_to_disk`)."""
    if not path.is_dir():
        raise CommandLineError(f"no such dataset directory: {path}")
    if (path / "meta.json").is_file():
        examples = TensorDict.load_memmap(path, allow_pickle=False)
        if examples.batch_dims != 1:
            raise CommandLineError(f"{path}: the TensorDict has batch size {list(examples.batch_size)}; it must be [examples]")
        return examples
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        try:
            import datasets
        except ImportError:
            raise CommandLineError(f"{path} is a Hugging Face dataset: pip install datasets to read it") from None
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            raise CommandLineError(f"{path} holds several splits ({', '.join(loaded)}): pass the directory of one")
        return loaded
    raise CommandLineError(
        f"{path} is neither a TensorDict saved with td.memmap(path) (meta.json) nor a Hugging Face dataset "
        "saved with save_to_disk"
    )


def random_examples(example: TensorDictBase, in_keys, count: int, sources=()) -> TensorDict:
    """`count` seeded inputs shaped like `example`'s, and the same again at `(source, key)` for each source."""
    generator = torch.Generator().manual_seed(0)
    examples = TensorDict(batch_size=[count])
    for prefix in (None, *dict.fromkeys(sources)):
        for key in in_keys:
            x = example.get(key)
            shape = (count, *x.shape[1:])
            if x.is_floating_point():
                made = torch.randn(shape, generator=generator, dtype=x.dtype)
            elif key_name(key) == "attention_mask" or x.dtype == torch.bool:
                made = x[:1].expand(shape).clone()
            else:
                made = torch.randint(0, int(x.max()) + 1, shape, generator=generator, dtype=x.dtype)
            examples.set(key if prefix is None else join_keys(prefix, key), made)
    return examples
