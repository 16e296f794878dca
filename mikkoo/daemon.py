"""Detach mikkoo from the terminal and keep its pidfile.

This replaces helper's ``helper.unix.Daemon``: in helper 2.5.0, the latest
release, constructing it raises ImportError (it imports a NullHandler that
the package no longer exports), and its "already running" check greps the
output of ``ps`` for the command line.
"""
from __future__ import annotations

import grp
import os
import pwd
import sys
from collections.abc import Callable

DEFAULT_PIDFILE = '/tmp/mikkoo.pid'


class DaemonError(Exception):
    """Raised when the daemon cannot be started; the message names the cause."""


class Pidfile:
    """A pidfile that refuses to start a second daemon on the same path."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    def check(self) -> None:
        """Raise DaemonError if a live process owns the pidfile.

        A pidfile naming a process that no longer exists is stale and is
        removed.
        """
        pid = self.read()
        if pid is None:
            return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os.unlink(self.path)
            return
        except PermissionError:
            pass
        raise DaemonError(f'mikkoo is already running as pid {pid} (pidfile {self.path})')

    def read(self) -> int | None:
        try:
            with open(self.path, encoding='ascii') as handle:
                return int(handle.read().strip())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise DaemonError(f'cannot read pidfile {self.path}: {error}') from None

    def write(self, uid: int, gid: int) -> None:
        try:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as error:
            raise DaemonError(f'cannot write pidfile {self.path}: {error.strerror}; '
                              'set Daemon/pidfile to a writable path') from None
        with os.fdopen(descriptor, 'w', encoding='ascii') as handle:
            handle.write(f'{os.getpid()}\n')
        if os.getuid() == 0 and (uid, gid) != (0, 0):
            # The daemon removes its pidfile after dropping privileges.
            os.chown(self.path, uid, gid)

    def remove(self) -> None:
        try:
            if self.read() == os.getpid():
                os.unlink(self.path)
        except (OSError, DaemonError):
            pass


def run_detached(run: Callable[[], int], pidfile_path: str | None, user: str | None,
                 group: str | None) -> int:
    """Fork into the background, drop privileges and return ``run()``'s status.

    Only the daemon process returns; the calling process exits with status
    0 once the daemon is forked. Raises DaemonError, before forking, when
    the pidfile is taken or unwritable or the user or group is unknown.
    """
    uid, gid = _ids(user, group)
    pidfile = Pidfile(pidfile_path or DEFAULT_PIDFILE)
    pidfile.check()
    directory = os.path.dirname(pidfile.path)
    if not os.access(directory, os.W_OK):
        raise DaemonError(f'cannot write pidfile {pidfile.path}: directory {directory} '
                          'is not writable; set Daemon/pidfile to a writable path')

    # Fork twice so that the daemon is not a session leader and can never
    # acquire a controlling terminal again.
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)

    pidfile.write(uid, gid)
    _drop_privileges(uid, gid)
    os.chdir('/')
    os.umask(0o022)
    _redirect_standard_streams()
    try:
        return run()
    finally:
        pidfile.remove()


def _ids(user: str | None, group: str | None) -> tuple[int, int]:
    try:
        uid = pwd.getpwnam(user).pw_uid if user else os.getuid()
        if group:
            gid = grp.getgrnam(group).gr_gid
        elif user:
            gid = pwd.getpwnam(user).pw_gid
        else:
            gid = os.getgid()
    except KeyError as error:
        raise DaemonError(f'unknown user or group in the Daemon section: {error}') from None
    return uid, gid


def _drop_privileges(uid: int, gid: int) -> None:
    if gid != os.getgid():
        os.setgroups([gid])
        os.setgid(gid)
    if uid != os.getuid():
        os.setuid(uid)


def _redirect_standard_streams() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_RDWR)
    for stream in (0, 1, 2):
        os.dup2(null, stream)
    os.close(null)
