import contextlib
import shutil

import pytest
from tiny import SCHEDULER, STAGES, method_options, options

import pipeline.cli
from pipeline.cli import main
from pipeline.data.shapes import write_shapes
from pipeline.engine import runner

TINY_IMAGES = 16


def pytest_addoption(parser):
    parser.addoption("--rcnn-scheduler", metavar="SPEC", default=None,
                     help="run the tests' rcnn commands on this Dask scheduler (e.g. local:2) instead of the config's")


def pytest_configure(config):
    spec = config.getoption("--rcnn-scheduler")
    SCHEDULER[:] = ["--scheduler", spec] if spec else []


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
    """Run the CLI in-process on the tiny set with a private cache and reports folder (on the scheduler of
    --rcnn-scheduler, unless `scheduler` names one: threads for a test that patches what the stages run)."""
    def run(*args, data=None, cache=None, scheduler=None):
        return main([*args, "--data", str(data or shapes_root), "--cache", str(cache or tmp_path / "cache"),
                     "--reports", str(tmp_path / "reports"), *(["--scheduler", scheduler] if scheduler else SCHEDULER)])
    return run


class SealableConfig(dict):
    """A config tree that raises on any read while sealed: what a stage may read is its keyed params only."""
    sealed = False

    def __init__(self, mapping):
        super().__init__({key: SealableConfig(value) if isinstance(value, dict) else value
                          for key, value in mapping.items()})

    def _check(self):
        if SealableConfig.sealed:
            raise AssertionError("a stage read the config outside its keyed params")

    def __getitem__(self, key):
        self._check()
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._check()
        return super().get(key, default)

    def __iter__(self):
        self._check()
        return super().__iter__()

    def items(self):
        self._check()
        return super().items()


@contextlib.contextmanager
def config_sealed_while_stages_run():
    """Inside, every config the CLI loads is sealed while its planned stages run (pipeline.engine.runner.run_stages):
    a stage that reads the config instead of the params its key covers fails. Yields the count of sealed runs."""
    sealed_runs = []
    load_config, run_stages = pipeline.cli.load_config, runner.run_stages

    def sealing_run_stages(plans, run, *args, **kwargs):
        SealableConfig.sealed = True
        try:
            return run_stages(plans, run, *args, **kwargs)
        finally:
            SealableConfig.sealed = False
            sealed_runs.append([plan.stage.name for plan in plans])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline.cli, "load_config", lambda *args: SealableConfig(load_config(*args)))
        patch.setattr(pipeline.cli, "run_stages", sealing_run_stages)
        patch.setattr(runner, "run_stages", sealing_run_stages)  # what runner.run_in_turn calls
        yield sealed_runs


@pytest.fixture(scope="session")
def timing_run(shapes_root, tmp_path_factory):
    """One `rcnn timing-table` on the tiny set (test_methods' settings): every method trained, evaluated and
    timed, with the config sealed while the stages run. Tests read it or copy its cache."""
    work = tmp_path_factory.mktemp("methods")
    with config_sealed_while_stages_run() as sealed_runs:
        assert main(["timing-table", *method_options(shapes_root, work / "cache", work / "reports")]) == 0
    assert "timing-table" in sealed_runs[-1]
    return shapes_root, work / "cache", work / "reports"


@pytest.fixture(scope="session")
def tiny_run(shapes_root, tmp_path_factory):
    """One full `rcnn run` of the tiny preset (test_rcnn_pipeline's settings), with the config sealed while
    the stages run; tests only read it or copy its cache."""
    work = tmp_path_factory.mktemp("rcnn")
    with config_sealed_while_stages_run() as sealed_runs:
        assert main(["run", *options(shapes_root, work / "cache", work / "reports")]) == 0
    assert sealed_runs == [STAGES]
    return shapes_root, work / "cache", work / "reports"
