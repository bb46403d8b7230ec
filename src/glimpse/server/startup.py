"""What `glimpse serve` checks before it loads the model, so a bad start fails in a second with one line,
not after minutes of loading with a traceback: the address can be bound (the socket is kept and handed to
uvicorn, so nothing can take the port while the model loads) and the TLS files make a usable certificate.
The flags' own values (the port's range, the JSON lists) are checked when they are parsed; the chat
template is read with the tokenizer, before the model (glimpse.engine)."""

from __future__ import annotations

import errno
import socket
import ssl

from glimpse.server.config import ServerConfig


class StartupError(Exception):
    """A server configuration that can't be served (the port taken, a TLS file unreadable)."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port as uvicorn binds one (IPv6 for an address with a colon, else IPv4;
    SO_REUSEADDR, so a port whose last connections are in TIME_WAIT is free), not yet listening: uvicorn
    listens on it once the app is ready."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except socket.gaierror as e:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: the host is unknown ({e.strerror})") from None
    except OSError as e:
        sock.close()
        reason = "the port is in use" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
        raise StartupError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def check_tls(certfile: str | None, keyfile: str | None) -> None:
    """The certificate and key load into a TLS context (files readable, PEM, key matching certificate)."""
    if certfile is None:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as e:
        files = f"--ssl-certfile {certfile}" + (f" --ssl-keyfile {keyfile}" if keyfile else "")
        raise StartupError(f"cannot serve HTTPS with {files}: {e.strerror or e}") from None


def prepare_to_serve(server: ServerConfig) -> socket.socket:
    """Every check that needs no model; the bound socket to serve on."""
    check_tls(server.ssl_certfile, server.ssl_keyfile)
    return bind_socket(server.host, server.port)


__all__ = ["StartupError", "bind_socket", "check_tls", "prepare_to_serve"]
