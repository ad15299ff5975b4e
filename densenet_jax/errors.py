"""The one base class of every error a user can cause and fix: a bad config or command line,
data that is missing or unreadable, weights that cannot be fetched or do not fit, a workdir or
checkpoint that cannot be used. Its message is one line that names the bad value; main.py
prints it as `main.py: error: MESSAGE` and exits, without a traceback.

Imports nothing: every module may raise these."""


class UserError(Exception):
  """A problem the user has to fix; str(error) is one line."""
