"""The one exception type that means "the user gave us bad input".

Library code raises `UserError("what is wrong; how to fix it")`; the CLI prints that single
line to stderr and exits with status 2 (no traceback). Anything else is a bug: exit 1.
"""


class UserError(ValueError):
    """Bad input: the message is one line naming the problem and the fix."""
