"""`openelm` on a pseudo-terminal, as a person runs it: progress is drawn only on a terminal, so
this is where the bars, the first line of a long job and Ctrl-C in the middle of work are seen.
What the run draws is collected with the time each piece arrived."""

import fcntl
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import List, Optional, Tuple


class Terminal:
    """`openelm ARGV` with stdin, stdout and stderr on one pseudo-terminal (in `cwd`, offline)."""

    def __init__(self, argv, cwd: Path, env: Optional[dict] = None, columns: int = 160):
        master, slave = pty.openpty()
        # a new pseudo-terminal is 0 columns wide, where tqdm draws nothing: size it as a window
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        self.master, self.pieces = master, []  # (seconds since start, text)
        self.start = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "openelm_mlx", *map(str, argv)],
            cwd=cwd,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OPENELM_TOKENIZER": "", **(env or {})},
            stdin=slave,
            stdout=slave,
            stderr=slave,
            # Ctrl-C as in a terminal, even under a test run started in the background (`pytest &`)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        os.close(slave)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 1 << 16)
            except OSError:  # EIO: every end of the terminal closed (the run ended)
                break
            if not data:
                break
            self.pieces.append((time.monotonic() - self.start, data.decode(errors="replace")))

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.pieces)

    def wait_for(self, fragment: str, timeout: float = 120) -> float:
        """Seconds since the start when `fragment` was first drawn; fails if the run ends first."""
        deadline = time.monotonic() + timeout
        while fragment not in self.text:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                self.finish()
                raise AssertionError(f"{fragment!r} never appeared:\n{self.text}")
            time.sleep(0.02)
        return time.monotonic() - self.start

    def stop(self, sig: int, timeout: float = 60) -> Tuple[float, int]:
        """Send `sig`; (seconds until the run exited, its exit status)."""
        sent = time.monotonic()
        self.process.send_signal(sig)
        status = self.process.wait(timeout)
        return time.monotonic() - sent, status

    def finish(self, timeout: float = 300) -> int:
        status = self.process.wait(timeout)
        self.reader.join(10)
        os.close(self.master)
        return status

    def screens(self) -> List[str]:
        """Each state the terminal's last line went through (what a \\r redraw replaced)."""
        return [part for part in self.text.replace("\n", "\r").split("\r") if part.strip()]
