"""
The SQL server's users: names, access levels and salted scrypt hashes of
their passwords, kept in ``ROOT/Settings/sql-users.json`` (readable by its
owner only), and the ``tls4d users`` command that manages them.

No password is stored or logged in clear; checking one compares hashes in
constant time, and costs as much for an unknown user as for a known one.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any

import attrs

from twisted_tls4d.errors import ConfigurationError
from twisted_tls4d.settings import DEFAULT_ROOT
from twisted_tls4d.sql import wire

#: The users file, relative to the server root.
USERS_FILE = Path("Settings") / "sql-users.json"

#: scrypt's cost parameters for new hashes (16 MiB of memory, ~50 ms).
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1

#: Bytes of salt and of hash.
_SALT_BYTES = 16
_HASH_BYTES = 32

#: What a user name may be made of.
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")

#: A hash checked for unknown users, so that they take as long as known ones.
_DUMMY_SALT = b"tls4d-no-such-user"


def users_file(root: Path) -> Path:
    """
    Returns:
        The users file of the server root ``root``.
    """
    return root / USERS_FILE


@attrs.frozen
class PasswordHash:
    """
    A salted scrypt hash of a password, with its cost parameters.
    """

    salt: bytes
    digest: bytes = attrs.field(repr=False)
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P

    @classmethod
    def of(cls, password: str) -> PasswordHash:
        """
        Returns:
            The hash of ``password`` with a new random salt.
        """
        salt = secrets.token_bytes(_SALT_BYTES)
        return cls(salt, _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P))

    def matches(self, password: str) -> bool:
        """
        Returns:
            Whether ``password`` has this hash, compared in constant time.
        """
        digest = _scrypt(password, self.salt, self.n, self.r, self.p)
        return hmac.compare_digest(digest, self.digest)

    def to_json(self) -> dict[str, Any]:
        """
        Returns:
            The hash as the users file stores it.
        """
        return {
            "n": self.n,
            "r": self.r,
            "p": self.p,
            "salt": base64.b64encode(self.salt).decode("ascii"),
            "hash": base64.b64encode(self.digest).decode("ascii"),
        }

    @classmethod
    def from_json(cls, value: Any) -> PasswordHash:
        """
        Raises:
            ValueError: ``value`` is not a stored hash.
        """
        return cls(
            base64.b64decode(value["salt"], validate=True),
            base64.b64decode(value["hash"], validate=True),
            int(value["n"]),
            int(value["r"]),
            int(value["p"]),
        )


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    """
    Returns:
        scrypt of the UTF-8 password.
    """
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=256 * n * r * p,
        dklen=_HASH_BYTES,
    )


@attrs.frozen
class User:
    """
    One user of the SQL server.

    Attributes:
        name: The user name.
        access: ``read-only``, ``read-write`` or ``full``.
        password: The hash of the user's password.
    """

    name: str
    access: str
    password: PasswordHash


_DUMMY = PasswordHash(_DUMMY_SALT, bytes(_HASH_BYTES))


def check_name(name: str) -> None:
    """
    Raises:
        ConfigurationError: ``name`` is not a valid user name.
    """
    if not _NAME.fullmatch(name):
        msg = (
            f"{name!r} is not a valid user name; use 1 to 64 letters, digits "
            "and the characters _ . @ -."
        )
        raise ConfigurationError(msg)


def check_access(access: str) -> None:
    """
    Raises:
        ConfigurationError: ``access`` is not an access level.
    """
    if access not in wire.ACCESS_LEVELS:
        levels = ", ".join(wire.ACCESS_LEVELS)
        msg = f"{access!r} is not an access level; use one of {levels}."
        raise ConfigurationError(msg)


class UserStore:
    """
    The users, as read from and written to a users file.
    """

    def __init__(self, users: dict[str, User]) -> None:
        self.users = users

    @classmethod
    def load(cls, path: Path) -> UserStore:
        """
        Args:
            path: The users file; a missing file holds no users.

        Returns:
            Its users.

        Raises:
            ConfigurationError: The file cannot be read or is not a users
                file.
        """
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls({})
        except (OSError, UnicodeDecodeError, ValueError) as e:
            msg = f"Cannot read the SQL users file {path}: {e}."
            raise ConfigurationError(msg) from e
        users = {}
        try:
            for name, entry in document["users"].items():
                check_access(entry["access"])
                users[name] = User(
                    name, entry["access"], PasswordHash.from_json(entry["scrypt"])
                )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            msg = (
                f"The SQL users file {path} is damaged ({e!r}); restore it or "
                "remove it and add the users again with 'tls4d users add'."
            )
            raise ConfigurationError(msg) from e
        return cls(users)

    def save(self, path: Path) -> None:
        """
        Write the users to ``path`` atomically, readable by its owner only.

        Raises:
            OSError: The file cannot be written.
        """
        document = {
            "version": 1,
            "users": {
                user.name: {"access": user.access, "scrypt": user.password.to_json()}
                for user in sorted(self.users.values(), key=lambda u: u.name)
            },
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".new")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)

    def get(self, name: str) -> User | None:
        """
        Returns:
            The user called ``name``, or None.
        """
        return self.users.get(name)

    def verify(self, name: str, password: str) -> str | None:
        """
        Check a password, taking as long for an unknown user as for a known
        one.

        Returns:
            The user's access level if the password is the user's, else None.
        """
        user = self.users.get(name)
        expected = user.password if user is not None else _DUMMY
        matches = expected.matches(password)
        return user.access if user is not None and matches else None

    def add(self, name: str, password: str, access: str) -> None:
        """
        Raises:
            ConfigurationError: The name or access level is invalid, or the
                user exists.
        """
        check_name(name)
        check_access(access)
        if name in self.users:
            msg = f"User {name!r} exists; use 'tls4d users passwd {name}' instead."
            raise ConfigurationError(msg)
        self.users[name] = User(name, access, PasswordHash.of(password))

    def set_password(self, name: str, password: str) -> None:
        """
        Raises:
            ConfigurationError: There is no such user.
        """
        user = self.existing(name)
        self.users[name] = attrs.evolve(user, password=PasswordHash.of(password))

    def set_access(self, name: str, access: str) -> None:
        """
        Raises:
            ConfigurationError: There is no such user, or the access level is
                invalid.
        """
        check_access(access)
        self.users[name] = attrs.evolve(self.existing(name), access=access)

    def remove(self, name: str) -> None:
        """
        Raises:
            ConfigurationError: There is no such user.
        """
        self.existing(name)
        del self.users[name]

    def existing(self, name: str) -> User:
        """
        Returns:
            The user called ``name``.

        Raises:
            ConfigurationError: There is no such user.
        """
        user = self.users.get(name)
        if user is None:
            msg = f"There is no SQL user {name!r}; 'tls4d users list' shows them."
            raise ConfigurationError(msg)
        return user


def add_parser(commands: Any) -> None:
    """
    Add the ``users`` subcommand to the ``tls4d`` command.

    Args:
        commands: The subparsers object of the ``tls4d`` parser.
    """
    parser: argparse.ArgumentParser = commands.add_parser(
        "users",
        help="manage the SQL server's users and passwords",
        description=(
            "Add, remove and list the users who may log in to the SQL server "
            "with a password, and set their passwords and access levels. "
            "Passwords are read from the terminal (twice), or as one line of "
            "standard input, and stored as salted scrypt hashes in "
            "ROOT/Settings/sql-users.json. Changes apply to the next login, "
            "without a restart. A user named like a client certificate's "
            "common name gives that certificate its access level."
        ),
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (
        ("add", "add a user"),
        ("remove", "remove a user"),
        ("passwd", "set a user's password"),
        ("access", "set a user's access level"),
        ("list", "list the users and their access levels"),
    ):
        sub = actions.add_parser(action, help=text)
        if action != "list":
            sub.add_argument("name", metavar="NAME")
        if action == "add":
            sub.add_argument(
                "--access",
                choices=wire.ACCESS_LEVELS,
                default=wire.READ_WRITE,
                help="what the user may do (default: %(default)s)",
            )
        if action == "access":
            sub.add_argument("level", choices=wire.ACCESS_LEVELS, metavar="LEVEL")
        sub.add_argument(
            "--root",
            type=Path,
            default=DEFAULT_ROOT,
            help="the server root (default: %(default)s)",
        )
    parser.set_defaults(run=_run)


def _read_password(name: str) -> str:
    """
    Returns:
        A new password for ``name``, typed twice at the terminal, or the first
        line of standard input.

    Raises:
        ConfigurationError: The password is empty or the two typed differ.
    """
    if sys.stdin.isatty():
        password = getpass.getpass(f"Password for {name}: ")
        if getpass.getpass("Again: ") != password:
            msg = "The two passwords differ; nothing was changed."
            raise ConfigurationError(msg)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        msg = "The password is empty; nothing was changed."
        raise ConfigurationError(msg)
    return password


def _run(args: argparse.Namespace) -> int:
    """
    Run ``tls4d users``.

    Returns:
        0.

    Raises:
        ConfigurationError: The root, user, access level or password is not
            usable.
    """
    if not (args.root / "Resources").is_dir() and args.action != "list":
        msg = (
            f"{args.root} is not a tls4d server root (it has no Resources "
            "folder); give --root, or start the server once to create it."
        )
        raise ConfigurationError(msg)
    path = users_file(args.root)
    store = UserStore.load(path)
    if args.action == "list":
        for user in sorted(store.users.values(), key=lambda u: u.name):
            print(f"{user.name}\t{user.access}")
        return 0
    if args.action == "add":
        check_name(args.name)
        if store.get(args.name) is not None:
            msg = f"User {args.name!r} exists; use 'tls4d users passwd' instead."
            raise ConfigurationError(msg)
        store.add(args.name, _read_password(args.name), args.access)
        done = f"Added SQL user {args.name!r} with {args.access} access."
    elif args.action == "passwd":
        store.existing(args.name)
        store.set_password(args.name, _read_password(args.name))
        done = f"Changed the password of SQL user {args.name!r}."
    elif args.action == "access":
        store.set_access(args.name, args.level)
        done = f"SQL user {args.name!r} now has {args.level} access."
    else:
        store.remove(args.name)
        done = f"Removed SQL user {args.name!r}."
    store.save(path)
    print(done)
    return 0
