"""User errors, and the one boundary every entry point runs behind.

A mistake the user can fix (a config field out of range, a damaged checkpoint, a missing file)
raises a UserError (or FileNotFoundError / FileExistsError) whose message names the thing and
the fix, one line per problem. The entry points (clipdistill_jax.main, teacher_cache, the
`clipdistill` CLI, scripts/*.py) run behind `boundary()` (or call `report()`), which prints
each line as `error: ...` and exits 1 without a traceback. Anything else is a bug and keeps
its traceback. CLIPDISTILL_TRACEBACK=1 shows the traceback of user errors too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

TRACEBACK_ENV = "CLIPDISTILL_TRACEBACK"


class UserError(Exception):
  """A mistake the user can fix; the message names the thing and the fix.

  starts_fresh_line: other threads may still be writing to stderr when it is reported (a
  failed background save: orbax's and tensorstore's threads), so the report begins with a
  newline and cannot continue a line of theirs.
  """

  starts_fresh_line = False


# Missing / existing files are the user's to fix wherever they surface.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError)


def show_traceback() -> bool:
  """Whether CLIPDISTILL_TRACEBACK asks for tracebacks of user errors ('1', 'true', 'yes')."""
  return os.environ.get(TRACEBACK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def error_lines(error: BaseException, prog: str | None = None) -> list[str]:
  """`[prog: ]error: ...`, one per line of the message (a ConfigError lists every problem)."""
  prefix = f"{prog}: error: " if prog else "error: "
  lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
  return [prefix + line for line in lines]


def report(error: BaseException, prog: str | None = None) -> int:
  """Prints a user error as `error:` lines on stderr and returns the exit status 1; re-raises
  it instead when CLIPDISTILL_TRACEBACK=1. For entry points that return their status."""
  if show_traceback():
    raise error
  text = "".join(line + "\n" for line in error_lines(error, prog))
  # One write: a thread printing to stderr meanwhile cannot split the lines.
  sys.stderr.write("\n" + text if getattr(error, "starts_fresh_line", False) else text)
  sys.stderr.flush()
  return 1


@contextlib.contextmanager
def boundary(prog: str | None = None) -> Iterator[None]:
  """Runs the body; a user error becomes `error:` lines on stderr and SystemExit(1).

  Other exceptions (bugs) pass with their traceback; so do user errors when
  CLIPDISTILL_TRACEBACK=1. For entry points that exit (absl's app.run).
  """
  try:
    yield
  except USER_ERRORS as e:
    raise SystemExit(report(e, prog)) from None
