"""Running Python in a child process with a time limit, so that a segfault, an abort or a hang
is reported as a failed test (with the child's output) instead of taking pytest down."""
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class Result:
    def __init__(self, returncode, stdout, stderr, timed_out):
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out

    @property
    def crashed(self):
        """Killed by a signal (SIGSEGV, SIGABRT...)."""
        return self.returncode is not None and self.returncode < 0

    def describe(self):
        if self.timed_out:
            what = "did not finish in time (killed)"
        elif self.crashed:
            try:
                sig = signal.Signals(-self.returncode).name
            except ValueError:
                sig = str(-self.returncode)
            what = f"died of {sig}"
        else:
            what = f"exited with status {self.returncode}"
        return (f"the child process {what}\n--- stdout ---\n{self.stdout[-20000:]}\n"
                f"--- stderr ---\n{self.stderr[-20000:]}")


def run_python(args, *, timeout, env=None):
    """`python -X faulthandler ARGS` in the repository with `timeout` seconds."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["PYTHONFAULTHANDLER"] = "1"
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", *args], cwd=REPO,
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return Result(proc.returncode, out, err, False)
    except subprocess.TimeoutExpired:
        # ask for the stacks first (faulthandler prints them on SIGABRT), then make sure
        os.killpg(proc.pid, signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        return Result(proc.returncode, out, err, True)


def run_snippet(code, *, timeout=60):
    """Run `code` (a few lines of Python) in a child process."""
    return run_python(["-c", code], timeout=timeout)
