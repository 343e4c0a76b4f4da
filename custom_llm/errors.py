"""The one kind of error a user sees: a problem they can fix, printed as one line (cli.run)."""


class UserError(Exception):
    """A problem the user can fix. Printed as one line; exit status 2 for usage errors."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def cannot_read(path: str, err: OSError) -> UserError:
    """The one-line error for a file that is there but cannot be read: what the system said,
    never a guess (a permission problem is not a damaged file)."""
    if isinstance(err, IsADirectoryError):
        return UserError(f"{path} is a folder, not a file", 2)
    if isinstance(err, PermissionError):
        return UserError(f"{path} cannot be read (permission denied): check its permissions")
    return UserError(f"{path} cannot be read ({err.strerror or err})")
