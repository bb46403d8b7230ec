"""Fetching and decoding media safely: data: URIs, local files, http(s) with SSRF checks, images.

No network: the HTTP server is started here on 127.0.0.1 in a thread.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.parse
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glimpse.errors import LimitExceededError, MediaError
from glimpse.processing import media
from glimpse.processing.media import (
    Cancellation,
    Cancelled,
    MediaLimits,
    MediaPolicy,
    content_hash,
    decode_data_uri,
    fetch_bytes,
    load_image,
    open_image,
    resolve_local_path,
)


def png_bytes(size: tuple[int, int] = (8, 6), color: tuple = (10, 200, 30), mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, "PNG")
    return out.getvalue()


def jpeg_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(0)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming width x height whose pixel data is a few bytes: decoding it would fail."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


PNG = png_bytes()
SERVER_POLICY = MediaPolicy.for_server()  # no local files, no private URLs
OPEN = MediaPolicy()  # the Python API's defaults


# ---------------------------------------------------------------------------------------------------
# A local HTTP server


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, object] = {}

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {"Content-Length": str(len(body))}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = urllib.parse.urlsplit(self.path).path
        port = self.server.server_address[1]
        if path == "/img.png":
            self._send(200, PNG, {"Content-Type": "image/png", "Content-Length": str(len(PNG))})
        elif path == "/host":
            body = (self.headers.get("Host") or "").encode()
            self._send(200, body)
        elif path == "/redirect":
            self._send(302, headers={"Location": "/img.png", "Content-Length": "0"})
        elif path.startswith("/chain/"):
            n = int(path.rsplit("/", 1)[1])
            target = "/img.png" if n == 0 else f"/chain/{n - 1}"
            self._send(302, headers={"Location": target, "Content-Length": "0"})
        elif path == "/loop":
            self._send(302, headers={"Location": "/loop", "Content-Length": "0"})
        elif path == "/redirect-private":
            location = f"http://127.0.0.1:{port}/img.png"
            self._send(302, headers={"Location": location, "Content-Length": "0"})
        elif path == "/redirect-file":
            self._send(302, headers={"Location": "file:///etc/passwd", "Content-Length": "0"})
        elif path == "/big":
            self._send(200, b"x" * 5000)
        elif path == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(10):
                self.wfile.write(b"3e8\r\n" + b"y" * 1000 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/trickle":  # a 1,000-byte body at one byte per 0.1 s
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"z")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:  # the fetcher hung up
                pass
        else:
            self._send(404, b"not found")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections (the kernel completes the handshake) but never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/never"
    sock.close()


@pytest.fixture
def public_test_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend 'public.test' is a public host that lives at 127.0.0.1; every other host is checked for real."""
    real = media._public_address

    def fake(host: str, port: int) -> str:
        return "127.0.0.1" if host == "public.test" else real(host, port)

    monkeypatch.setattr(media, "_public_address", fake)


# ---------------------------------------------------------------------------------------------------
# data: URIs


def test_data_uri_base64() -> None:
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert fetch_bytes(uri, SERVER_POLICY) == PNG
    assert load_image(uri, SERVER_POLICY).size == (8, 6)


def test_data_uri_variants() -> None:
    raw = bytes(range(256))
    b64 = base64.b64encode(raw).decode()
    assert decode_data_uri("data:;base64," + b64, 1000) == raw
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    assert decode_data_uri("data:application/octet-stream;base64," + wrapped, 1000) == raw
    urlsafe = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert decode_data_uri("data:;base64," + urlsafe, 1000) == raw
    assert decode_data_uri("data:;base64," + urllib.parse.quote(b64, safe=""), 1000) == raw
    assert fetch_bytes("DATA:text/plain,hello%20world%21") == b"hello world!"
    assert fetch_bytes("data:,") == b""


@pytest.mark.parametrize(
    "uri",
    [
        "data:image/png;base64",
        "data:image/png;base64,@@@@",
        "data:image/png;base64,abc%ZZ!",
        "data:;base64,é",
    ],
)
def test_malformed_data_uri(uri: str) -> None:
    with pytest.raises(MediaError):
        fetch_bytes(uri)


def test_data_uri_over_limit() -> None:
    uri = "data:;base64," + base64.b64encode(b"z" * 4000).decode()
    with pytest.raises(LimitExceededError) as err:
        fetch_bytes(uri, max_bytes=1000)
    assert err.value.status == 413
    assert fetch_bytes(uri, max_bytes=4000) == b"z" * 4000
    with pytest.raises(LimitExceededError):
        fetch_bytes("data:," + "a" * 2000, max_bytes=1000)


def test_unsupported_scheme_and_empty() -> None:
    with pytest.raises(MediaError, match="scheme"):
        fetch_bytes("ftp://example.com/a.png")
    with pytest.raises(MediaError, match="empty"):
        fetch_bytes("   ")
    with pytest.raises(MediaError):
        fetch_bytes(123)  # type: ignore[arg-type]


def test_content_hash() -> None:
    assert content_hash(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# ---------------------------------------------------------------------------------------------------
# Local files


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "a.png").write_bytes(PNG)
    (allowed / "name with space.png").write_bytes(PNG)
    (outside / "secret.png").write_bytes(PNG)
    return allowed, outside


def test_any_local_file_by_default(dirs: tuple[Path, Path]) -> None:
    allowed, outside = dirs
    assert fetch_bytes(str(outside / "secret.png")) == PNG
    assert fetch_bytes(outside / "secret.png") == PNG
    assert fetch_bytes((outside / "secret.png").as_uri()) == PNG
    assert load_image(str(allowed / "a.png")).size == (8, 6)


def test_files_inside_the_allowed_dir(dirs: tuple[Path, Path]) -> None:
    allowed, _ = dirs
    policy = MediaPolicy.for_server(str(allowed))
    assert fetch_bytes((allowed / "a.png").as_uri(), policy) == PNG
    assert fetch_bytes(str(allowed / "a.png"), policy) == PNG
    assert fetch_bytes((allowed / "name with space.png").as_uri(), policy) == PNG
    assert fetch_bytes("file://localhost" + str(allowed / "a.png"), policy) == PNG


def test_files_outside_the_allowed_dir(dirs: tuple[Path, Path]) -> None:
    allowed, outside = dirs
    policy = MediaPolicy.for_server(str(allowed))
    escapes = [
        (outside / "secret.png").as_uri(),
        str(outside / "secret.png"),
        f"file://{allowed}/../outside/secret.png",
        f"{allowed}/../outside/secret.png",
        f"file://{allowed}/%2E%2E/outside/secret.png",
        "file:///etc/passwd",
    ]
    for source in escapes:
        with pytest.raises(MediaError, match="outside the allowed media directory"):
            fetch_bytes(source, policy)
    # A sibling whose name starts with the allowed name is not inside it.
    sibling = allowed.parent / (allowed.name + "2")
    sibling.mkdir()
    (sibling / "x.png").write_bytes(PNG)
    with pytest.raises(MediaError, match="outside"):
        fetch_bytes(str(sibling / "x.png"), policy)


def test_symlink_escapes_are_refused(dirs: tuple[Path, Path]) -> None:
    allowed, outside = dirs
    (allowed / "link.png").symlink_to(outside / "secret.png")
    (allowed / "linkdir").symlink_to(outside, target_is_directory=True)
    (allowed / "inner.png").symlink_to(allowed / "a.png")
    policy = MediaPolicy.for_server(str(allowed))
    for name in ("link.png", "linkdir/secret.png"):
        with pytest.raises(MediaError, match="outside"):
            fetch_bytes((allowed / name).as_uri(), policy)
    assert fetch_bytes((allowed / "inner.png").as_uri(), policy) == PNG


def test_allowed_dir_given_through_a_symlink(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    allowed, _ = dirs
    (tmp_path / "alias").symlink_to(allowed, target_is_directory=True)
    policy = MediaPolicy.for_server(str(tmp_path / "alias"))
    assert fetch_bytes((allowed / "a.png").as_uri(), policy) == PNG
    assert fetch_bytes(str(tmp_path / "alias" / "a.png"), policy) == PNG


def test_local_files_refused_without_allowed_dir(dirs: tuple[Path, Path]) -> None:
    allowed, _ = dirs
    for source in ((allowed / "a.png").as_uri(), str(allowed / "a.png")):
        with pytest.raises(MediaError, match="allowed-local-media-path"):
            fetch_bytes(source, SERVER_POLICY)


def test_local_file_errors(dirs: tuple[Path, Path]) -> None:
    allowed, _ = dirs
    policy = MediaPolicy.for_server(str(allowed))
    with pytest.raises(MediaError, match="no such file"):
        fetch_bytes(str(allowed / "missing.png"), policy)
    with pytest.raises(MediaError, match="not a regular file"):
        fetch_bytes(str(allowed), policy)
    with pytest.raises(MediaError):
        fetch_bytes("file://otherhost/etc/passwd")
    with pytest.raises(LimitExceededError):
        fetch_bytes(str(allowed / "a.png"), policy, max_bytes=10)


def test_resolve_local_path(dirs: tuple[Path, Path]) -> None:
    allowed, outside = dirs
    policy = MediaPolicy.for_server(str(allowed))
    assert resolve_local_path((allowed / "a.png").as_uri(), policy) == (allowed / "a.png").resolve()
    assert (
        resolve_local_path(str(allowed / "a.png"), policy, max_bytes=10_000) == (allowed / "a.png").resolve()
    )
    with pytest.raises(MediaError, match="outside"):
        resolve_local_path(str(outside / "secret.png"), policy)
    with pytest.raises(LimitExceededError):
        resolve_local_path(str(allowed / "a.png"), policy, max_bytes=10)
    with pytest.raises(MediaError):
        resolve_local_path(str(allowed / "a.png"), SERVER_POLICY)


# ---------------------------------------------------------------------------------------------------
# Images


def test_truncated_png_and_jpeg() -> None:
    for data in (png_bytes((200, 200), (1, 2, 3))[:-30], jpeg_bytes()[:-200]):
        with pytest.raises(MediaError) as err:
            load_image(data)
        assert err.value.status == 400


def test_garbage_and_unsupported_formats() -> None:
    with pytest.raises(MediaError, match="PNG, JPEG"):
        load_image(b"definitely not an image")
    with pytest.raises(MediaError):
        load_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")


@pytest.mark.parametrize("size", [(9000, 9000), (20000, 20000)])
def test_decompression_bomb_header(size: tuple[int, int]) -> None:
    # Almost no pixel data: reaching the decoder would give a MediaError, not a 413.
    with pytest.raises(MediaError):
        load_image(png_header_only(100, 100))
    start = time.monotonic()
    with pytest.raises(LimitExceededError) as err:
        load_image(png_header_only(*size))
    assert err.value.status == 413
    assert time.monotonic() - start < 1.0
    assert "64000000" in err.value.message


def test_pixel_limit_is_configurable() -> None:
    limits = MediaLimits(max_image_pixels=100)
    with pytest.raises(LimitExceededError, match="11x10"):
        load_image(png_bytes((11, 10)), limits=limits)
    assert load_image(png_bytes((10, 10)), limits=limits).size == (10, 10)
    with pytest.raises(LimitExceededError):
        load_image(Image.new("RGB", (11, 10)), limits=limits)


def test_modes_become_rgb() -> None:
    transparent = load_image(png_bytes((4, 4), (255, 0, 0, 0), "RGBA"))
    assert transparent.mode == "RGB" and transparent.getpixel((0, 0)) == (255, 255, 255)
    half = load_image(png_bytes((4, 4), (0, 0, 0, 128), "RGBA")).getpixel((0, 0))
    assert all(126 <= c <= 128 for c in half)
    assert load_image(png_bytes((4, 4), 77, "L")).getpixel((1, 1)) == (77, 77, 77)
    assert load_image(png_bytes((4, 4), (77, 0), "LA")).getpixel((1, 1)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0])
    out = io.BytesIO()
    palette.save(out, "PNG", transparency=0)
    assert load_image(out.getvalue()).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    out = io.BytesIO()
    Image.fromarray(np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)).save(out, "PNG")
    image = load_image(out.getvalue())
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 4, 128, 255]


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif)
    assert load_image(out.getvalue()).size == (20, 40)


def test_gif_and_webp() -> None:
    for fmt in ("GIF", "WEBP", "BMP", "TIFF"):
        out = io.BytesIO()
        Image.new("RGB", (5, 7), (200, 10, 10)).save(out, fmt)
        image = load_image(out.getvalue())
        assert image.mode == "RGB" and image.size == (5, 7)


# ---------------------------------------------------------------------------------------------------
# http(s)


def test_http_fetch_from_local_server(server: str) -> None:
    assert fetch_bytes(f"{server}/img.png", OPEN) == PNG
    assert load_image(f"{server}/img.png", OPEN).size == (8, 6)


def test_private_url_refused_by_server_policy(server: str) -> None:
    for url in (f"{server}/img.png", server.replace("127.0.0.1", "localhost") + "/img.png"):
        with pytest.raises(MediaError, match="non-public address") as err:
            fetch_bytes(url, SERVER_POLICY)
        assert "--allow-private-media-urls" in err.value.message
        assert err.value.status == 400


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1]/x",
        "http://0.0.0.0/x",
        "http://2130706433/x",
        "http://[::ffff:127.0.0.1]/x",
        "http://10.1.2.3/x",
    ],
)
def test_private_literals_refused_before_connecting(url: str) -> None:
    with pytest.raises(MediaError, match="non-public"):
        fetch_bytes(url, SERVER_POLICY)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "224.0.1.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::127.0.0.1",
        "64:ff9b::7f00:1",
        "2002:7f00:1::",
        "2002:a00:1::",
    ],
)
def test_non_public_addresses(address: str) -> None:
    assert not media._address_is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "::ffff:8.8.8.8"])
def test_public_addresses(address: str) -> None:
    assert media._address_is_public(ipaddress.ip_address(address))


def test_pinned_request_keeps_the_host_name(server: str, public_test_host: None) -> None:
    port = server.rsplit(":", 1)[1]
    assert fetch_bytes(f"http://public.test:{port}/host", SERVER_POLICY) == f"public.test:{port}".encode()
    assert fetch_bytes(f"http://public.test:{port}/img.png", SERVER_POLICY) == PNG


def test_redirects_are_followed_and_rechecked(server: str, public_test_host: None) -> None:
    port = server.rsplit(":", 1)[1]
    assert fetch_bytes(f"http://public.test:{port}/redirect", SERVER_POLICY) == PNG
    assert fetch_bytes(f"{server}/chain/4", OPEN) == PNG  # 5 redirects: allowed
    with pytest.raises(MediaError, match="redirected more than 5"):
        fetch_bytes(f"{server}/chain/5", OPEN)
    with pytest.raises(MediaError, match="redirected more than 5"):
        fetch_bytes(f"{server}/loop", OPEN)
    with pytest.raises(MediaError, match="non-public address"):
        fetch_bytes(f"http://public.test:{port}/redirect-private", SERVER_POLICY)
    with pytest.raises(MediaError, match="http"):
        fetch_bytes(f"{server}/redirect-file", OPEN)


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_pinned_https_keeps_sni_and_certificate_checks(
    tmp_path: Path, public_test_host: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connecting to the checked IP must still present and verify the real host name over TLS."""
    good_key, good_cert = _self_signed(tmp_path, "public.test")
    bad_key, bad_cert = _self_signed(tmp_path, "other.test")
    trust = ssl.create_default_context(cafile=str(good_cert))
    trust.load_verify_locations(cafile=str(bad_cert))
    monkeypatch.setattr(media, "tls_context", lambda trust_env: trust)  # what every fetch verifies with
    for key, cert, works in ((good_key, good_cert, True), (bad_key, bad_cert, False)):
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cert), str(key))
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"https://public.test:{httpd.server_address[1]}/host"
            if works:
                assert fetch_bytes(url, SERVER_POLICY) == f"public.test:{httpd.server_address[1]}".encode()
            else:
                with pytest.raises(MediaError, match="could not fetch"):
                    fetch_bytes(url, SERVER_POLICY)
        finally:
            httpd.shutdown()
            httpd.server_close()


def test_fetches_share_one_tls_context(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the CA bundle is ~100 ms of CPU holding the GIL: done once, not once per fetch (which
    stalled the server's event loop while media was fetched)."""
    built = []
    real = ssl.create_default_context
    monkeypatch.setattr(media, "_tls_contexts", {})
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: built.append(1) or real(*a, **k))
    for _ in range(3):
        assert fetch_bytes(f"{server}/img.png", OPEN) == PNG
    assert len(built) == 1


def test_http_errors(server: str) -> None:
    with pytest.raises(MediaError, match="HTTP 404"):
        fetch_bytes(f"{server}/missing", OPEN)
    with pytest.raises(MediaError):
        fetch_bytes("http://127.0.0.1:1/x", OPEN)  # connection refused
    with pytest.raises(MediaError):
        fetch_bytes("http://exa mple.com/x", OPEN)


def test_oversize_download(server: str) -> None:
    for path in ("/big", "/big-chunked"):
        with pytest.raises(LimitExceededError) as err:
            fetch_bytes(server + path, OPEN, max_bytes=1000)
        assert err.value.status == 413
    assert len(fetch_bytes(f"{server}/big", OPEN, max_bytes=5000)) == 5000
    assert len(fetch_bytes(f"{server}/big-chunked", OPEN, max_bytes=10_000)) == 10_000


def test_timeout(silent_server: str) -> None:
    limits = MediaLimits(media_fetch_timeout=0.5)
    start = time.monotonic()
    with pytest.raises(MediaError, match=r"timed out after 0\.5 s"):
        fetch_bytes(silent_server, OPEN, limits)
    assert time.monotonic() - start < 3.0


def cancel_after(seconds: float) -> Cancellation:
    cancel = Cancellation()
    threading.Timer(seconds, cancel.set).start()
    return cancel


def test_cancelling_stops_a_trickling_download(server: str) -> None:
    start = time.monotonic()
    with pytest.raises(Cancelled):
        fetch_bytes(f"{server}/trickle", OPEN, cancel=cancel_after(0.3))
    assert time.monotonic() - start < 2.0  # not the 100 s the body would take


def test_cancelling_wakes_a_fetch_waiting_on_a_silent_server(silent_server: str) -> None:
    """A server that never answers: the fetch is blocked in a read, which the cancellation wakes."""
    start = time.monotonic()
    with pytest.raises(Cancelled):
        fetch_bytes(silent_server, OPEN, MediaLimits(media_fetch_timeout=30), cancel=cancel_after(0.3))
    assert time.monotonic() - start < 2.0


def test_a_cancelled_fetch_never_connects(server: str) -> None:
    cancel = Cancellation()
    cancel.set()
    with pytest.raises(Cancelled):
        fetch_bytes(f"{server}/img.png", OPEN, cancel=cancel)
    assert fetch_bytes(f"{server}/img.png", OPEN, cancel=Cancellation()) == PNG  # an unset one: no effect


def test_cancellation_hooks() -> None:
    cancel = Cancellation()
    calls: list[str] = []
    with cancel.on_cancel(lambda: calls.append("inside")):
        pass
    with cancel.on_cancel(lambda: calls.append("during")):
        cancel.set()
        cancel.set()  # a second set runs nothing again
    with cancel.on_cancel(lambda: calls.append("after")):  # already set: at once
        pass
    assert calls == ["during", "after"]
    assert cancel.is_set()
    with pytest.raises(Cancelled):
        cancel.check()


def test_open_image_reads_only_the_header() -> None:
    image = open_image(png_header_only(300, 200))  # no pixel data at all: decoding would fail
    assert image.size == (300, 200)
    with pytest.raises(LimitExceededError):
        open_image(png_header_only(300, 200), MediaLimits(max_image_pixels=50_000))


def test_policy_defaults() -> None:
    assert OPEN.allow_local_files and OPEN.allow_private_urls and OPEN.allowed_local_media_path is None
    assert not SERVER_POLICY.allow_local_files and not SERVER_POLICY.allow_private_urls
    assert MediaPolicy.for_server("/tmp").allow_local_files
    limits = MediaLimits()
    assert (limits.max_image_pixels, limits.max_video_bytes, limits.max_video_seconds) == (
        64_000_000,
        2_147_483_648,
        21600,
    )
    assert (limits.max_video_frames, limits.max_pdf_pages, limits.media_fetch_timeout) == (1024, 32, 30.0)
    assert os.fspath(Path("/x")) == "/x"
