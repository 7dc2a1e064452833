"""
The operations of the application server and the API for an application's
own: the `Request` a handler receives, the caller's `Identity`, and the
`Registry` that names each handler.

A handler is a function ``handler(request, **args)``: it receives the
`Request` (the caller's identity among it) and the request's ``args`` as
keyword arguments, and returns the answer's ``result`` (any value JSON can
express), a Deferred firing with it, or a coroutine. Raising `AppError`
makes an error answer with that code; any other exception becomes an
``internal_error`` answer, logged by the server, and serving goes on. A
handler must not block: slow work belongs in a thread
(`twisted.internet.threads.deferToThread`) or returns a Deferred.

An application gives the server its handlers as a `Registry`::

    from twisted_tls4d.app import AppError, Registry

    ops = Registry()

    @ops.op
    def greet(request, name="world"):
        return f"Hello {name}, from {request.identity.common_name}"

and ``twistd tls4d --app-handlers myapp:ops`` serves them beside the
built-in operations (`BUILTIN_OPS`), which it may not replace.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, overload

import attrs
from cryptography import x509

from twisted_tls4d import pki
from twisted_tls4d._peer import common_name
from twisted_tls4d.app.wire import INVALID_ARGS, AppError, RequestId
from twisted_tls4d.errors import ConfigurationError

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

#: The longest op name, in characters.
MAX_OP_LENGTH = 64

#: What an op name may look like: a letter, then letters, digits, ``_``,
#: ``.`` or ``-``.
_OP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*")


@attrs.frozen
class Identity:
    """
    Who made a request: the client certificate the TLS handshake verified.

    Attributes:
        certificate: The certificate itself.
        common_name: Its subject's common name (its whole subject when it
            has none): the name ``--app-allow`` lists.
        subject: Its subject, as an RFC 4514 string.
        issuer: Its issuer, as an RFC 4514 string.
        fingerprint_sha256: Its SHA-256 fingerprint, colon-separated upper-case
            hex pairs as ``openssl x509 -fingerprint -sha256`` prints it.
    """

    certificate: x509.Certificate = attrs.field(repr=False)
    common_name: str
    subject: str
    issuer: str
    fingerprint_sha256: str

    @classmethod
    def from_certificate(cls, certificate: x509.Certificate) -> Identity:
        """
        Args:
            certificate: A verified client certificate.

        Returns:
            The identity it proves.
        """
        return cls(
            certificate=certificate,
            common_name=common_name(certificate),
            subject=certificate.subject.rfc4514_string(),
            issuer=certificate.issuer.rfc4514_string(),
            fingerprint_sha256=pki.fingerprint_sha256(certificate),
        )

    def to_json(self) -> dict[str, str]:
        """
        Returns:
            The identity as the ``whoami`` operation answers it.
        """
        return {
            "subject": self.subject,
            "common_name": self.common_name,
            "issuer": self.issuer,
            "fingerprint_sha256": self.fingerprint_sha256,
        }


class Connection:
    """
    What a handler may do with the connection its request came on, beyond
    answering; the server provides it, tests may provide their own.
    """

    def notify(self, topic: str, data: Any) -> int:
        """
        Send a notification to the other connections subscribed to
        ``topic``.

        Returns:
            How many connections of this server process it was sent to
            (those of the other processes, with ``--workers``, get it too).
        """
        raise NotImplementedError

    def sql(self, statement: str, parameters: Any = ()) -> Deferred[dict[str, Any]]:
        """
        Run a statement in this connection's database session.

        Returns:
            A Deferred firing with the result as the ``sql`` op answers it.
        """
        raise NotImplementedError


@attrs.frozen
class Request:
    """
    One request, checked for shape, with what the server knows of its sender.

    Attributes:
        id: The id the client chose; the answer carries it back.
        op: The operation's name.
        args: The operation's arguments (``{}`` when the request had none);
            a handler also receives them as keyword arguments.
        identity: Who sent it, from the verified client certificate.
        peer: The client's address, ``host:port``, for logs.
        connection: The connection it came on (see `notify` and `sql`).
    """

    id: RequestId
    op: str
    args: dict[str, Any]
    identity: Identity
    peer: str
    connection: Connection = attrs.field(factory=Connection, repr=False)

    @property
    def peer_certificate(self) -> x509.Certificate:
        """The client's certificate (``identity.certificate``)."""
        return self.identity.certificate

    def notify(self, topic: str, data: Any = None) -> int:
        """
        Send a notification to every other connection subscribed to
        ``topic``, as the ``notify`` op does.

        Args:
            topic: The topic's name.
            data: Any value JSON can express.

        Returns:
            How many connections of this server process it was sent to; with
            ``--workers``, the subscribers of the other processes get it too,
            uncounted (the ``notify`` op waits for their count).

        Raises:
            AppError: The topic is not a valid name, or the notification is
                over the frame size limit (``invalid_args``).
        """
        return self.connection.notify(topic, data)

    def sql(
        self, statement: str, parameters: Sequence[Any] = ()
    ) -> Deferred[dict[str, Any]]:
        """
        Run one statement in the database session of the request's
        connection, as the ``sql`` op does (whether or not the server offers
        that op to clients), so that it shares the client's transaction.

        Args:
            statement: One SQL statement, with a ``?`` for each parameter.
            parameters: Their values, in order: None, numbers, strings,
                bytes, or the ``sql`` op's ``{"blob": BASE64}``.

        Returns:
            A Deferred firing with ``{"columns", "rows", "changes",
            "in_transaction"}``, or failing with `AppError` (``sql_error``,
            ``result_too_large``, ``unavailable``).
        """
        return self.connection.sql(statement, parameters)


#: What answers one operation: the request and its args in, the result out.
Handler = Callable[..., Any]


@attrs.frozen
class _Signature:
    """
    What a handler accepts, read once when it is registered.

    Attributes:
        signature: Its signature, the request parameter included.
        names: The argument names it lists, for error messages.
        takes_any: Whether it takes ``**kwargs``.
        required: The argument names without a default.
        first: The name of the request's parameter.
        plain: Whether every parameter after the request's can be given by
            name, so that a call's names alone tell whether it fits.
    """

    signature: inspect.Signature
    names: tuple[str, ...]
    takes_any: bool
    required: frozenset[str] = frozenset()
    first: str = ""
    plain: bool = False

    def fits(self, args: Mapping[str, Any]) -> bool:
        """
        Returns:
            Whether ``args`` fit the handler, read from their names alone
            when the handler is plain, else by binding them.
        """
        if self.plain and self.first not in args:
            names = args.keys()
            if (self.takes_any or names <= set(self.names)) and self.required <= names:
                return True
        return False


def _read_signature(name: str, handler: Handler) -> _Signature:
    """
    Raises:
        ConfigurationError: The handler is not callable or cannot take the
            request as its first argument.
    """
    if not callable(handler):
        msg = f"The handler of op {name!r} is {handler!r}, which is not callable."
        raise ConfigurationError(msg)
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError) as e:
        msg = f"The handler of op {name!r} has no signature Python can read ({e})."
        raise ConfigurationError(msg) from e
    parameters = list(signature.parameters.values())
    positional = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    )
    if not parameters or parameters[0].kind not in positional:
        msg = (
            f"The handler of op {name!r} must take the request as its first "
            "positional parameter: def handler(request, ...)."
        )
        raise ConfigurationError(msg)
    rest = (
        parameters[1:] if parameters[0].kind != inspect.Parameter.VAR_POSITIONAL else []
    )
    names = tuple(
        p.name
        for p in rest
        if p.kind
        in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )
    takes_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)
    by_name = (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
        inspect.Parameter.VAR_KEYWORD,
    )
    required = frozenset(
        p.name
        for p in rest
        if p.default is inspect.Parameter.empty
        and p.kind != inspect.Parameter.VAR_KEYWORD
    )
    return _Signature(
        signature,
        names,
        takes_any,
        required=required,
        first=parameters[0].name,
        plain=parameters[0].kind != inspect.Parameter.VAR_POSITIONAL
        and all(p.kind in by_name for p in rest),
    )


def check_op_name(name: object) -> str:
    """
    Args:
        name: A proposed op name.

    Returns:
        The name.

    Raises:
        ConfigurationError: It is not a string of 1 to `MAX_OP_LENGTH`
            letters, digits, ``_``, ``.`` or ``-`` starting with a letter.
    """
    if (
        not isinstance(name, str)
        or len(name) > MAX_OP_LENGTH
        or not _OP_NAME.fullmatch(name)
    ):
        msg = (
            f"{name!r} is not a valid op name; use up to {MAX_OP_LENGTH} letters, "
            "digits, '_', '.' or '-', starting with a letter."
        )
        raise ConfigurationError(msg)
    return name


class Registry:
    """
    The handlers of an application's operations, by op name.

    Register a function with the `op` decorator (the function's name is the
    op's, or give one) or with `add`; pass the registry to
    `twisted_tls4d.app.protocol.AppServerFactory`, or name it with
    ``--app-handlers module:attribute``.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._signatures: dict[str, _Signature] = {}

    @overload
    def op(self, name: Handler, /) -> Handler: ...

    @overload
    def op(self, name: str | None = None, /) -> Callable[[Handler], Handler]: ...

    def op(
        self, name: str | Handler | None = None, /
    ) -> Handler | Callable[[Handler], Handler]:
        """
        Register the decorated function as an op's handler: ``@ops.op`` names
        the op after the function, ``@ops.op("orders.list")`` names it.

        Returns:
            The function, unchanged, or a decorator.

        Raises:
            ConfigurationError: As `add`.
        """
        if callable(name):
            handler = name
            self.add(handler.__name__, handler)
            return handler

        def register(handler: Handler) -> Handler:
            self.add(name if isinstance(name, str) else handler.__name__, handler)
            return handler

        return register

    def add(self, name: str, handler: Handler) -> None:
        """
        Register ``handler`` as the handler of op ``name``.

        Args:
            name: The op's name.
            handler: ``handler(request, **args)``.

        Raises:
            ConfigurationError: The name is invalid or taken, or the handler
                cannot take the request as its first argument.
        """
        check_op_name(name)
        if name in self._handlers:
            msg = f"The op {name!r} is registered twice; give each op one handler."
            raise ConfigurationError(msg)
        self._signatures[name] = _read_signature(name, handler)
        self._handlers[name] = handler

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def __iter__(self) -> Iterator[str]:
        return iter(self._handlers)

    def __len__(self) -> int:
        return len(self._handlers)

    def names(self) -> list[str]:
        """
        Returns:
            The op names registered, sorted.
        """
        return sorted(self._handlers)

    def merged(self, other: Registry) -> Registry:
        """
        Returns:
            A new registry with the ops of both.

        Raises:
            ConfigurationError: An op is in both.
        """
        both = Registry()
        for registry in (self, other):
            for name, handler in registry._handlers.items():
                if name in both:
                    msg = (
                        f"The application's handlers define op {name!r}, which "
                        "the server has built in; rename the application's op."
                    )
                    raise ConfigurationError(msg)
                both._handlers[name] = handler
                both._signatures[name] = registry._signatures[name]
        return both

    def call(self, request: Request) -> Any:
        """
        Run the handler of ``request.op`` with the request and its args.

        Returns:
            What the handler returned.

        Raises:
            KeyError: No handler has that name.
            AppError: The args do not fit the handler (``invalid_args``), or
                the handler raised it.
            Exception: Whatever else the handler raised.
        """
        handler = self._handlers[request.op]
        accepted = self._signatures[request.op]
        if not accepted.fits(request.args):
            try:
                accepted.signature.bind(request, **request.args)
            except TypeError as e:
                raise AppError(INVALID_ARGS, _misfit(request, accepted, e)) from e
        return handler(request, **request.args)


def _misfit(request: Request, accepted: _Signature, error: TypeError) -> str:
    """
    Returns:
        A sentence saying why the request's args do not fit the handler.
    """
    given = ", ".join(repr(name) for name in sorted(request.args))[:200]
    if not accepted.names and not accepted.takes_any:
        return f"The {request.op!r} operation takes no arguments; got {given}."
    takes = ", ".join(accepted.names) or "any arguments"
    return f"The {request.op!r} operation takes {takes}; {error}."


def ping(request: Request, /) -> str:
    """
    Answer that the server is there.

    Returns:
        ``"pong"``.
    """
    return "pong"


def echo(request: Request, /, **args: Any) -> dict[str, Any]:
    """
    Send the arguments back.

    Returns:
        The request's ``args`` object, unchanged.
    """
    return args


def whoami(request: Request, /) -> dict[str, str]:
    """
    Tell the client how the server sees it.

    Returns:
        The client certificate's ``subject`` (RFC 4514), its ``common_name``,
        its ``issuer`` (RFC 4514) and its ``fingerprint_sha256`` (colon-separated
        upper-case hex, as ``openssl x509 -fingerprint -sha256`` shows it).
    """
    return request.identity.to_json()


def _simple_ops() -> Registry:
    registry = Registry()
    for handler in (ping, echo, whoami):
        registry.op(handler)
    return registry


#: The operations of the unversioned first release, which a client may call
#: without ``hello``.
LEGACY_OPS: frozenset[str] = frozenset({"ping", "echo", "whoami"})

#: Every op the server answers itself; an application may not define these.
BUILTIN_OPS: frozenset[str] = frozenset(
    {"hello", "ping", "echo", "whoami", "sql", "subscribe", "unsubscribe", "notify"}
)

#: The built-in operations that need nothing of the server but the request.
SIMPLE_OPS = _simple_ops()

#: Kept for programs of the first release: the simple ops by name.
DEFAULT_OPS: Mapping[str, Handler] = {"ping": ping, "echo": echo, "whoami": whoami}


def load_registry(spec: str) -> Registry:
    """
    Load an application's handlers from ``module:attribute``, as
    ``--app-handlers`` names them.

    Args:
        spec: A module's import path and the name in it of a `Registry` (or
            of a mapping from op names to handlers), separated by a colon.

    Returns:
        The handlers.

    Raises:
        ConfigurationError: The spec is malformed, the module cannot be
            imported, the attribute is missing or not handlers, or an op
            name is invalid or built in.
    """
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        msg = (
            f"--app-handlers {spec!r} is not MODULE:ATTRIBUTE; write e.g. "
            "myapp.ops:registry."
        )
        raise ConfigurationError(msg)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        msg = (
            f"--app-handlers {spec}: cannot import module {module_name!r} "
            f"({type(e).__name__}: {e}); check that it is on PYTHONPATH and "
            "imports without error."
        )
        raise ConfigurationError(msg) from e
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError as e:
            msg = f"--app-handlers {spec}: module {module_name!r} has no {attribute!r}."
            raise ConfigurationError(msg) from e
    if isinstance(value, Registry):
        registry = value
    elif isinstance(value, Mapping):
        registry = Registry()
        for name, handler in value.items():
            registry.add(name, handler)
    else:
        msg = (
            f"--app-handlers {spec} is {type(value).__name__}, not a "
            "twisted_tls4d.app.Registry or a mapping of op names to handlers."
        )
        raise ConfigurationError(msg)
    clash = sorted(BUILTIN_OPS & set(registry))
    if clash:
        msg = (
            f"--app-handlers {spec} defines op {clash[0]!r}, which the server has "
            "built in; rename the application's op."
        )
        raise ConfigurationError(msg)
    return registry
