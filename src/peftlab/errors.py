"""The one exception type the CLI turns into a clean message and a non-zero exit code."""


class PeftlabError(Exception):
    """A problem the user can fix: the message says what was expected, what was found and how to fix it."""


class Interrupted(PeftlabError):
    """The user stopped a command (Ctrl-C); the message says what was kept and how to go on."""


class WriteFailed(PeftlabError, OSError):
    """A file or folder could not be written (read-only, disk full, no permission): one line naming the path, the
    reason and what was kept. Also an OSError (errno, strerror, filename = the path), for code that catches those."""

    def __init__(self, path, number: int | None, reason: str, kept: str):
        OSError.__init__(self, number, reason, str(path))
        self.message = f"cannot write {path}: {reason}; {kept}"

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # pickled across processes (Ray, multiprocessing) with its own arguments
        return _rebuild_write_failed, (self.filename, self.errno, self.strerror, self.message)


def _rebuild_write_failed(path, number, reason, message) -> WriteFailed:
    error = WriteFailed(path, number, reason, "")
    error.message = message
    return error


WRITE_ONLY_ERRNOS = ("EROFS", "ENOSPC", "EDQUOT", "EFBIG")  # errors no read gives


def os_error_line(error: OSError, kept: str) -> str:
    """One line for an operating-system error raised outside peftlab's own writers (a library's write, a log line
    appended): the path, the reason and `kept` (what was kept)."""
    import errno

    name = errno.errorcode.get(error.errno) if error.errno else None
    if error.filename is None or error.strerror is None:
        return str(error)
    reason = f"{error.strerror} ({name})" if name else error.strerror
    action = "cannot write" if name in WRITE_ONLY_ERRNOS else "cannot use"
    return f"{action} {error.filename}: {reason}; {kept}"
