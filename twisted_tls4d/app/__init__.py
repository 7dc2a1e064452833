"""The application server: a length-prefixed JSON protocol over mutual TLS."""
