"""Opening a file a user named, once and safely: as that user (the kernel decides whether they may
read it), without following a symbolic link in any component of the path, and regular files only.

kaschedd runs as root; a user owns the files and directories they name and may swap any of them for
a symlink, a FIFO or a device at any moment. So the check and the open are one act: the path is
walked one component at a time (``openat`` with ``O_PATH | O_NOFOLLOW``) in a child process that
took the user's identity (``setgroups``/``setresgid``/``setresuid``), and the open descriptor is
passed back to kaschedd over a socket pair (``SCM_RIGHTS``). The final open is non-blocking, so a
FIFO never waits for a writer; what is not a regular file is refused on the descriptor itself.
"""

from __future__ import annotations

import errno
import os
import pwd
import signal
import socket
import stat
from collections.abc import Iterator

from kasched.errors import InputError, NotFoundError, PermissionDenied

CHUNK = 1 << 20
OPEN_TIMEOUT = 30.0  # seconds the child may take to open (a hung network file system)
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def normal(path: str) -> str:
    """``path`` made absolute and normalised without looking at the file system (no symlink is
    followed later, so the lexical ``..`` is the kernel's)."""
    if not path.startswith("/"):
        raise InputError(f"{path!r} is not an absolute path")
    return os.path.normpath(path).replace("//", "/")


def open_regular(path: str, user: str | None = None) -> int:
    """A read-only descriptor on the regular file ``path``, opened as Unix user ``user`` (None: as
    this process), no symlink followed. The caller closes it."""
    path = normal(path)
    if user is None or os.geteuid() != 0:
        code, fd = _walk(path)
    else:
        code, fd = _walk_as(user, path)
    if fd is None:
        raise _error(path, code)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise InputError(f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def chunks(fd: int, limit: int | None, what: str, cap: str = "image_max_size") -> Iterator[bytes]:
    """The content of ``fd`` in chunks, refused past ``limit`` bytes (the file may grow while read);
    ``cap`` names the limit in the error."""
    if limit is not None and os.fstat(fd).st_size > limit:
        raise InputError(f"{what} is larger than {limit} bytes ({cap})")
    size = 0
    while chunk := os.read(fd, CHUNK):
        size += len(chunk)
        if limit is not None and size > limit:
            raise InputError(f"{what} is larger than {limit} bytes ({cap})")
        yield chunk


def read_small(path: str, user: str | None, limit: int, cap: str) -> bytes:
    """The whole content of a small regular file (a description, a script), opened safely."""
    fd = open_regular(path, user)
    try:
        return b"".join(chunks(fd, limit, path, cap))
    finally:
        os.close(fd)


def _walk(path: str) -> tuple[int, int | None]:
    """(0, descriptor), or (errno, None): ``path`` opened one component at a time, never through a
    symlink (``O_NOFOLLOW`` on every component), the last one without blocking."""
    parts = [part for part in path.split("/") if part]
    if not parts:
        return errno.EISDIR, None
    try:
        current = os.open("/", _DIR_FLAGS)
    except OSError as error:
        return error.errno or errno.EIO, None
    try:
        for part in parts[:-1]:
            following = os.open(part, _DIR_FLAGS, dir_fd=current)
            os.close(current)
            current = following
        return 0, os.open(parts[-1], _FILE_FLAGS, dir_fd=current)
    except OSError as error:
        return error.errno or errno.EIO, None
    finally:
        os.close(current)


def _walk_as(user: str, path: str) -> tuple[int, int | None]:
    """:func:`_walk` in a child process that is ``user`` (groups included); the descriptor comes back
    over a socket pair. Root stays root."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return errno.EACCES, None  # a name unknown on this host (a token's user) reads nothing here
    if entry.pw_uid == 0:
        return _walk(path)
    groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the child: syscalls only, then _exit (other threads of kaschedd do not exist here)
        try:
            ours.close()
            os.setgroups(groups)
            os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
            os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
            code, fd = _walk(path)
            if fd is None:
                theirs.sendall(str(code).encode())
            else:
                socket.send_fds(theirs, [b"0"], [fd])
        finally:
            os._exit(0)
    theirs.close()
    try:
        ours.settimeout(OPEN_TIMEOUT)
        message, fds, _, _ = socket.recv_fds(ours, 32, 1)
    except OSError:  # the timeout too: a child stuck on a hung file system
        os.kill(pid, signal.SIGKILL)
        message, fds = b"", []
    finally:
        ours.close()
        os.waitpid(pid, 0)
    if fds:
        return 0, fds[0]
    return int(message) if message.isdigit() and message != b"0" else errno.EIO, None


def _error(path: str, code: int) -> Exception:
    if code == errno.ENOENT:
        return NotFoundError(f"{path} does not exist")
    if code in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"you may not read {path}")
    if code in (errno.ELOOP, errno.ENOTDIR):
        return InputError(f"{path}: a symbolic link (or a non-directory) on the way: kasched follows no link")
    if code == errno.EWOULDBLOCK:
        return InputError(f"{path} is busy (leased by another process)")
    return InputError(f"{path}: {os.strerror(code)}")
