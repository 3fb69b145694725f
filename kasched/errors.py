"""The one error hierarchy of kasched.

Every error a user can cause or meet is a :class:`KaschedError`; the CLI prints its message as one
line and exits with its ``exit_code``. Errors of the libraries we drive (paramiko, pyghmi, sqlalchemy)
are wrapped into one of these at the boundary where we call them.
"""

from __future__ import annotations


class KaschedError(Exception):
    """Base of every kasched error. ``str(error)`` is a complete, one-line message for a user."""

    exit_code = 1

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class ConfigError(KaschedError):
    """The service configuration is missing, unreadable or invalid."""

    exit_code = 2


class InputError(KaschedError):
    """A user's input (a YAML file, a command-line value, a node range) is invalid."""

    exit_code = 2


class NotFoundError(KaschedError):
    """A named thing (node, environment, grant, deployment) does not exist."""

    exit_code = 3


class ConflictError(KaschedError):
    """The request conflicts with what exists (a duplicate name, MAC or IP; a busy node)."""

    exit_code = 4


class NodesBeingGivenBack(ConflictError):
    """The nodes are busy only with their revert after an ended job: a deployment may wait for them."""


class PermissionDenied(KaschedError):
    """The caller may not do this; the message says why."""

    exit_code = 5


class IntegrityError(KaschedError):
    """Data does not match what was recorded (a checksum mismatch)."""

    exit_code = 6


class DatabaseError(KaschedError):
    """The database could not be reached or refused an operation."""

    exit_code = 7


class DriverError(KaschedError):
    """A hardware or protocol driver (IPMI, SSH, boot profile) failed for a node."""

    exit_code = 8

    def __init__(self, message: str, *, node: str | None = None) -> None:
        self.node = node
        super().__init__(message, field=node)


class DriverTimeout(DriverError):
    """A driver operation on a node did not answer in time."""


class LabError(KaschedError):
    """The virtual lab could not be built, inspected or removed."""

    exit_code = 9


class AuthenticationError(KaschedError):
    """A request over TCP (or a server certificate) could not be authenticated: no, bad, expired or
    replayed credential. kaschedd answers 401."""

    exit_code = 10
