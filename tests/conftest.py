import shutil

import pytest

from pipeline.cli import main
from pipeline.data.shapes import write_shapes

TINY_IMAGES = 16


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """A tiny generated shapes set, shared read-only by the tests that do not modify it."""
    root = tmp_path_factory.mktemp("data") / "shapes"
    write_shapes(root, images=TINY_IMAGES, seed=0)
    return root


@pytest.fixture
def shapes_copy(shapes_root, tmp_path):
    """A private copy of the tiny set, for tests that break or change it."""
    return shutil.copytree(shapes_root, tmp_path / "shapes")


@pytest.fixture
def rcnn(tmp_path, shapes_root):
    """Run the CLI in-process on the tiny set with a private cache and reports folder."""
    def run(*args, data=None, cache=None):
        return main([*args, "--data", str(data or shapes_root), "--cache", str(cache or tmp_path / "cache"),
                     "--reports", str(tmp_path / "reports")])
    return run
