import os
import warnings

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*bos_token_id.*")

from tests import zoo  # noqa: E402

# Model-level property tests draw few examples by default (each compiles a program);
# HYPOTHESIS_PROFILE=thorough draws many more (the slow CI step).
settings.register_profile("default", max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("thorough", max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run where a GPU is present and skip elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def capture_cache_directory(tmp_path_factory):
    """The persistent capture cache in a temporary folder of this test process, never the
    user's, for the processes the tests start too (models built again by later tests load their
    captures from it)."""
    from tdhook_fx.compiler.capture import disk

    folder = tmp_path_factory.mktemp("capture-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(disk.FOLDER, str(folder))
        patch.delenv(disk.ENVIRONMENT, raising=False)
        yield folder


@pytest.fixture(scope="session")
def samples():
    """Each zoo model built once per test process (captures are cached per model object)."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = zoo.ALL[name]()
        return built[name]

    return get
