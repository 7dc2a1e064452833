"""
The twistd plugin of tls4d: ``twistd -n tls4d --web --app --sql``. Every
``twistd --help`` imports this module, so it names the real module
(`twisted_tls4d.tap`) without importing it.
"""

from twisted.application.service import ServiceMaker

tls4d = ServiceMaker(
    "tls4d",
    "twisted_tls4d.tap",
    "The web, application and SQL servers of a server root, over TLS.",
    "tls4d",
)
