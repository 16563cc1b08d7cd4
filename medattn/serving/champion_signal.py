"""A "the champion changed" signal shared by every API worker of one service, through its state dir.

Each API worker that serves the model in process follows the ``champion`` alias on its own (a
poll every ``MEDATTN_POLL_SECONDS``). After an Accept, a Roll back or an admin ``/reload``,
handled by ONE worker, the others would go on serving the old version until their next poll.
So the worker that moved the alias (or reloaded) rewrites ``<state_dir>/champion.signal``, and
every worker looks at that file's identity (one ``stat``, microseconds) before each prediction:
when it changed, the worker reloads the champion before answering. A prediction that starts
after the Accept's answer is therefore served by the new champion, whichever worker takes it.

The file is replaced atomically (write + rename), so its inode changes on every signal; its
content (a random token and the time) is for people reading the folder. A missing or unreadable
file is "no signal yet". Alias moves made outside the service (``medattn model promote``) reach
the workers by their poll, or at once after an admin ``POST /reload``, which signals too.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Optional

SIGNAL_FILENAME = "champion.signal"

Stamp = Optional[tuple[int, int, int]]  # (inode, mtime ns, size); None while no signal was written


class ChampionSignal:
    """The signal file of one state dir: :meth:`send` after moving the alias, :meth:`stamp` to look."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / SIGNAL_FILENAME

    def stamp(self) -> Stamp:
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return info.st_ino, info.st_mtime_ns, info.st_size

    def send(self, reason: str) -> Stamp:
        """Tell every worker to reload the champion; returns the new stamp (None if unwritable)."""
        text = f"{secrets.token_hex(8)} {time.time():.6f} {reason}\n"
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
            return None  # the poll still brings every worker round; never fail an Accept for this
        return self.stamp()
