"""
The exceptions tls4d raises.

Library code raises these with a full sentence that names the file or value at
fault and, where one exists, the fix; the servers and the command line decide
how to report them.
"""


class Tls4dError(Exception):
    """
    Base class of every error tls4d raises on purpose.
    """


class ConfigurationError(Tls4dError):
    """
    A setting, an option or the settings file holds a value tls4d cannot use.
    """


class PEMError(Tls4dError):
    """
    A key or certificate file cannot be read, parsed or used.
    """


class ClientConnectionError(Tls4dError):
    """
    A tls4d client could not reach its server, was refused during the TLS
    handshake, or lost the connection.

    Attributes:
        detail: What Twisted or OpenSSL said of the failure, for debugging;
            None when the message says it all.
    """

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail


class KeyMismatchError(PEMError):
    """
    A certificate does not belong to the private key it is served with.
    """
