from fixture_eyecandies import *  # noqa
from fixture_model import *  # noqa
from fixture_mvtec import *  # noqa
from fixture_models import *  # noqa
from fixture_synth import *  # noqa

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Keep the tests' derived arrays and ONNX exports out of the user's ~/.cache/cmad."""
    import os

    old = os.environ.get("CMAD_CACHE_DIR")
    os.environ["CMAD_CACHE_DIR"] = str(tmp_path_factory.mktemp("cmad-cache"))
    yield
    if old is None:
        os.environ.pop("CMAD_CACHE_DIR", None)
    else:
        os.environ["CMAD_CACHE_DIR"] = old
