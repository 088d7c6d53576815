"""The one exception type the CLI turns into a clean message and a non-zero exit code."""


class PeftlabError(Exception):
    """A problem the user can fix: the message says what was expected, what was found and how to fix it."""


class Interrupted(PeftlabError):
    """The user stopped a command (Ctrl-C); the message says what was kept and how to go on."""
