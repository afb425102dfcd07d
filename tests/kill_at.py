"""Run `rcnn ARGV...` in this process and SIGKILL it at an exact point of a stage's life: deterministic kills.

    python tests/kill_at.py EVENT STAGE N ARGV...

EVENT, for stage STAGE:
    record       right after its N-th shard record is written (in this run)
    checkpoint   right after its training loop wrote its N-th checkpoint (in this run)
    finalize     when its finalize begins: every shard recorded, no report, no manifest (N unused)
    manifest     when its manifest is about to be written: the report is written (N unused)
    written      right after its manifest is written, before anything else runs (N unused)
The kill comes from the process itself at that point, so a test never races the scheduler for it. If the run
ends without reaching the point, the process exits with status 3.
"""
import os
import signal
import subprocess
import sys

from pipeline import training
from pipeline.cli import main
from pipeline.engine import runner
from pipeline.engine.cache import StageCache

EVENTS = ("record", "checkpoint", "finalize", "manifest", "written")


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at(event: str, stage: str, count: int) -> None:
    """Patch the engine so that this process kills itself at the event (module docstring)."""
    seen = [0]

    def counted() -> bool:
        seen[0] += 1
        return seen[0] == count

    if event == "record":
        commit_shard = StageCache.commit_shard

        def commit_then_kill(self, *args, **kwargs):
            record = commit_shard(self, *args, **kwargs)
            if self.stage == stage and counted():
                kill()
            return record
        StageCache.commit_shard = commit_then_kill
    elif event == "checkpoint":
        save = training._save

        def save_then_kill(path, *args, **kwargs):
            save(path, *args, **kwargs)
            if path.parent.parent.name == stage and counted():
                kill()
        training._save = save_then_kill
    elif event == "finalize":
        finalize_stage = runner.finalize_stage

        def kill_then_finalize(plan):
            if plan.stage.name == stage:
                kill()
            return finalize_stage(plan)
        runner.finalize_stage = kill_then_finalize
    else:
        write_manifest = StageCache.write_manifest

        def write_with_kill(self, manifest):
            if self.stage == stage and event == "manifest":
                kill()
            write_manifest(self, manifest)
            if self.stage == stage and event == "written":
                kill()
        StageCache.write_manifest = write_with_kill


def run_killed_at(event: str, stage: str, count: int, argv: list[str], timeout: float = 600) -> None:
    """Run `rcnn ARGV...` in a child process that SIGKILLs itself at the event; fail unless it did."""
    finished = subprocess.run([sys.executable, __file__, event, stage, str(count), *argv], capture_output=True,
                              text=True, timeout=timeout)
    assert finished.returncode == -signal.SIGKILL, (
        f"rcnn {' '.join(argv[:1])} was not killed at {event} {count} of {stage} (exit {finished.returncode}): "
        f"{finished.stderr[-1000:]}")


if __name__ == "__main__":
    event, stage, count, *argv = sys.argv[1:]
    assert event in EVENTS, f"EVENT is one of {', '.join(EVENTS)}"
    kill_at(event, stage, int(count))
    main(argv)
    sys.exit(3)
