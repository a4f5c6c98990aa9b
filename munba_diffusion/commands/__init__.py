"""The command lines (the top of the import graph): each parses its configuration and runs the library."""

from __future__ import annotations

import errno


def error_line(error: BaseException, output_dir: str) -> str:
    """One line for an error that stopped an evaluation: its own message (first line), or for a failed write what to
    do about it (every file is written atomically, so nothing half-written is left and a rerun resumes)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" ({error.filename})" if error.filename else ""
        return (
            f"no space left on the device of --output_dir {output_dir}{where}; free some space or pass another "
            "--output_dir, then run the command again (finished work is kept: images, checkpoints)"
        )
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {error.filename or output_dir} ({error.strerror}); pass an --output_dir you can write to"
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
