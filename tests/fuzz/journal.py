"""The machine's step journal: every step of the running example, written with one write(2)
each, so that the steps survive a segfault (hypothesis prints its reproduction only when the
process lives to the end). The parent test reads it back when the child dies.

The journal is the file named by USERBLK_FUZZ_JOURNAL (nothing is written without it); it is
truncated when an example starts. The first example that fails is copied to the same name with
".failure" appended: when a later example (one hypothesis runs while shrinking) crashes the
process, that one still tells what failed first."""
import os


class Journal:
    def __init__(self):
        path = os.environ.get("USERBLK_FUZZ_JOURNAL")
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if path else None
        self.examples = 0
        self.lines = []
        self.failure_saved = False

    def new_example(self, header):
        self.examples += 1
        self.lines = []
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        self.write(f"# example {self.examples}: {header}")

    def write(self, line):
        self.lines.append(line)
        if self.fd is not None:
            os.write(self.fd, (line + "\n").encode())

    def failure(self, text):
        """The running example failed with `text`: keep its steps (the first failure only)."""
        if self.fd is None or self.failure_saved:
            return
        self.failure_saved = True
        with open(self.path + ".failure", "w") as f:
            f.write("\n".join(self.lines + [f"# FAILED: {text}", ""]))


journal = Journal()
