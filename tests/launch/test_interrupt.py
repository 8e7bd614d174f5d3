"""Ctrl-C during ``mnn-fast train``: one line saying what was kept, exit 130, the lock released, and
the same command resumes to the bytes an uninterrupted run writes, with or without worker processes.

The run is a real process in its own session; a specialist's job sends SIGINT to that session's
process group, as a terminal's Ctrl-C reaches the parent and every worker at once.
"""
import os
import subprocess
import sys

import pytest
import torch

from helpers import specialist_bytes
from mnn_fast import cli

ARGS = ["--dataset", "digits", "--model", "mlp", "--switch-epochs", "1", "--specialist-epochs", "2"]  # TINY_RUN

DRIVER = '''
import os, signal, sys, time
import mnn_fast.training.pipeline as pipeline

# As a shell starts a command: the test runner's workers may have SIGINT ignored, which a child inherits.
signal.signal(signal.SIGINT, signal.default_int_handler)
# The switch trains at the test process's thread count, as the reference run's did: its bits depend on it.
import torch
torch.set_num_threads(int(os.environ["MNN_TEST_THREADS"]))

_train = pipeline.train_specialist


def _interrupting(job):
    state = _train(job)
    if job.expert == 2:  # after a few specialists are written: Ctrl-C, as a terminal sends it
        os.killpg(os.getpgid(0), signal.SIGINT)
        time.sleep(60)
    return state


pipeline.train_specialist = _interrupting  # module level: spawned workers import this file too
if __name__ == "__main__":
    from mnn_fast.cli import main
    sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_is_one_line_and_the_same_command_resumes_byte_identical(workers, serial, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    run = tmp_path / "run"
    argv = ["train", str(run), *ARGS, "--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MNN_TEST_THREADS": str(torch.get_num_threads())}
    done = subprocess.run([sys.executable, str(driver), *argv], capture_output=True, text=True, timeout=300,
                          start_new_session=True, env=env)
    assert done.returncode == 130, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr[-2000:]
    # Progress bars redraw with carriage returns; what is left besides them is the one line.
    lines = [line.rsplit("\r", 1)[-1].strip() for line in done.stderr.splitlines()]
    said = [line for line in lines if line.startswith("mnn-fast")]
    assert said == [f"mnn-fast train: interrupted; the finished files in {run} are kept, and the same command "
                    "resumes from them"], done.stderr[-2000:]
    written = sorted(p.name for p in (run / "specialists").glob("*.safetensors"))
    assert "expert_0002.safetensors" not in written and len(written) < 10
    # Nothing half-written: every final file is whole (a write cut short leaves only a temporary
    # .NAME.*.tmp beside it, which the next run removes).
    from mnn_fast import io

    for name in written:
        io.load_tensors(run / "specialists" / name)
    # The lock went with the process: the same command resumes here, to the serial run's bytes.
    assert cli.main(argv) == 0
    assert specialist_bytes(run) == serial
    assert not list(run.rglob("*.tmp"))


def test_a_connection_lost_after_ctrl_c_prints_no_traceback_but_other_errors_still_do(capsys):
    # the resource sharer thread reports a worker killed mid-handover through sys.excepthook
    import sys

    from mnn_fast.launch.local import quiet_lost_connections

    before = sys.excepthook
    with quiet_lost_connections():
        for error in (ConnectionResetError(104, "Connection reset by peer"), BrokenPipeError(), EOFError()):
            sys.excepthook(type(error), error, None)
        assert capsys.readouterr().err == ""
        sys.excepthook(ValueError, ValueError("a real bug"), None)
        assert "ValueError: a real bug" in capsys.readouterr().err
    assert sys.excepthook is before
