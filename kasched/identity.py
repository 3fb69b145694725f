"""Who is asking: the caller's Unix identity and whether it is a kasched admin."""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    """A user acting through the CLI or the service. Admins may act on any node and environment."""

    user: str
    is_admin: bool = False

    @classmethod
    def from_uid(cls, uid: int, admin_group: str) -> Caller:
        """The identity of Unix user ``uid``: root and members of ``admin_group`` are admins."""
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            return cls(user=str(uid), is_admin=uid == 0)
        return cls(user=entry.pw_name, is_admin=uid == 0 or _in_group(entry, admin_group))

    @classmethod
    def current(cls, admin_group: str) -> Caller:
        return cls.from_uid(os.getuid(), admin_group)


def _in_group(entry: pwd.struct_passwd, group_name: str) -> bool:
    try:
        group = grp.getgrnam(group_name)
    except KeyError:
        return False
    return entry.pw_gid == group.gr_gid or entry.pw_name in group.gr_mem
