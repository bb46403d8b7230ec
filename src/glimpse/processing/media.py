"""Fetching media bytes and decoding images safely, for the Python API and the HTTP server alike.

A request names media as a local path, a `file://`, `data:` or `http(s)://` URL. Everything that can go
wrong with user input becomes a MediaError (400) or a LimitExceededError (413) whose message says what
was wrong and what is allowed, so the server never answers 5xx for bad input. The server refuses local
files outside --allowed-local-media-path and URLs that resolve to private addresses (SSRF); the Python
API, which is trusted, allows both by default.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import ipaddress
import json
import os
import re
import socket
import ssl
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageOps

from glimpse.errors import LimitExceededError, MediaError
from glimpse.settings import POSITIVE, Rule, check_settings, setting

MAX_REDIRECTS = 5
USER_AGENT = "glimpse-vl media fetcher"  # some hosts refuse requests that don't say who asks
# Formats we decode. Restricting Pillow's plugins keeps exotic decoders (EPS runs Ghostscript) away
# from untrusted bytes.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")  # JPEG covers MPO (phone photos)
_FORMAT_NAMES = "PNG, JPEG, WebP, GIF, BMP, TIFF or AVIF"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_WHITESPACE = re.compile(rb"\s+")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


MEDIA_KINDS = ("image", "video", "file")  # the content-part kinds counted per prompt
DEFAULT_LIMIT_MM_PER_PROMPT = {"image": 16, "video": 2, "file": 4}


def parse_limit_mm_per_prompt(text: str) -> dict[str, int]:
    """`'{"image": 4}'` (a flag's JSON) or `image=4,video=1` (vLLM's other form): kinds not named keep
    their defaults."""
    try:
        if "=" in text and not text.lstrip().startswith("{"):
            given = {kind.strip(): int(n) for kind, n in (pair.split("=") for pair in text.split(","))}
        else:
            given = json.loads(text)
    except ValueError:
        raise ValueError(
            f"limit_mm_per_prompt must be a JSON object like '{json.dumps(DEFAULT_LIMIT_MM_PER_PROMPT)}' "
            "or KIND=N pairs like 'image=4,video=1'"
        ) from None
    if not isinstance(given, dict):
        raise ValueError("limit_mm_per_prompt must be a JSON object")
    return {**DEFAULT_LIMIT_MM_PER_PROMPT, **given}


def _counts_per_kind(value: dict) -> bool:
    return all(
        kind in MEDIA_KINDS and isinstance(n, int) and not isinstance(n, bool) and n >= 0
        for kind, n in value.items()
    )


@dataclass(frozen=True)
class MediaLimits:
    """Limits on a request's media (API.md's server defaults); the byte limits apply to one item."""

    limit_mm_per_prompt: dict[str, int] = setting(
        default_factory=lambda: dict(DEFAULT_LIMIT_MM_PER_PROMPT),
        help='media items per request, e.g. \'{"image": 16, "video": 2, "file": 4}\' or image=16,video=2 '
        "(kinds left out keep their defaults; PDF pages do not count as images)",
        rule=Rule(f"a map from {', '.join(MEDIA_KINDS)} to an integer >= 0", _counts_per_kind),
        parse=parse_limit_mm_per_prompt, metavar="JSON",
    )  # fmt: skip
    max_image_pixels: int = setting(64_000_000, help="pixels per image", rule=POSITIVE)
    max_video_bytes: int = setting(2_147_483_648, help="bytes per video", rule=POSITIVE)
    max_video_seconds: float = setting(21600.0, help="seconds per video", rule=POSITIVE)
    max_video_frames: int = setting(1024, help="frames sampled per video", rule=POSITIVE)
    max_pdf_pages: int = setting(32, help="pages per PDF", rule=POSITIVE)
    max_image_bytes: int = setting(268_435_456, help="bytes per image", rule=POSITIVE)
    max_pdf_bytes: int = setting(268_435_456, help="bytes per PDF", rule=POSITIVE)
    max_media_bytes: int = setting(
        268_435_456, help="bytes per media item of a kind without its own limit", rule=POSITIVE
    )
    media_fetch_timeout: float = setting(
        30.0, help="seconds for a whole http(s) media fetch, redirects included", rule=POSITIVE
    )

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass
class MediaPolicy:
    """Which sources are allowed. The defaults are the Python API's (trusted); see `for_server`."""

    allowed_local_media_path: str | None = None  # None: any local file (when allow_local_files)
    allow_local_files: bool = True
    allow_private_urls: bool = True

    @classmethod
    def for_server(
        cls, allowed_local_media_path: str | None = None, allow_private_urls: bool = False
    ) -> MediaPolicy:
        """The server's policy: local files only inside the given directory, none without one."""
        return cls(
            allowed_local_media_path=allowed_local_media_path,
            allow_local_files=allowed_local_media_path is not None,
            allow_private_urls=allow_private_urls,
        )


class Cancelled(Exception):
    """The request that wanted this media work is gone (its client disconnected): nobody waits for it."""


class Cancellation(threading.Event):
    """Set when the request that owns some media work is cancelled.

    The work checks it between chunks, pages and frames (`check`); a read that may block for long
    registers a way to wake itself up (`on_cancel`), run by whoever cancels.
    """

    def __init__(self) -> None:
        super().__init__()
        self._hooks_lock = threading.Lock()
        self._hooks: list[Callable[[], None]] = []

    def set(self) -> None:
        with self._hooks_lock:
            super().set()
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()

    def check(self) -> None:
        """Raise Cancelled once the request is cancelled."""
        if self.is_set():
            raise Cancelled("the request was cancelled")

    @contextmanager
    def on_cancel(self, hook: Callable[[], None]) -> Iterator[None]:
        """Within the block, `hook()` runs (once, on the cancelling thread) when the request is cancelled;
        at once if it already is."""
        with self._hooks_lock:
            already = self.is_set()
            if not already:
                self._hooks.append(hook)
        if already:
            hook()
        try:
            yield
        finally:
            with self._hooks_lock:
                if hook in self._hooks:
                    self._hooks.remove(hook)


def content_hash(data) -> str:
    """sha256 hex of media bytes (bytes or any C-contiguous buffer, e.g. a numpy array, hashed in place):
    the key of the encoder and prefix caches."""
    return hashlib.sha256(data).hexdigest()


def _short(source: str, limit: int = 120) -> str:
    """A source fit for an error message: data: URIs and long URLs are cut."""
    return source if len(source) <= limit else source[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------
# Dispatch


def fetch_bytes(
    source: str | os.PathLike[str],
    policy: MediaPolicy | None = None,
    limits: MediaLimits | None = None,
    max_bytes: int | None = None,
    cancel: Cancellation | None = None,
) -> bytes:
    """The bytes behind a local path, `file://`, `data:` or `http(s)://` source, at most `max_bytes`.

    `max_bytes` defaults to `limits.max_media_bytes`; going over it raises LimitExceededError (413)
    without reading the rest. An http(s) download stops with Cancelled as soon as `cancel` is set.
    """
    policy = policy or MediaPolicy()
    limits = limits or MediaLimits()
    max_bytes = limits.max_media_bytes if max_bytes is None else max_bytes
    if isinstance(source, os.PathLike):
        return _read_local(
            os.fspath(source), source_text=os.fspath(source), policy=policy, max_bytes=max_bytes
        )
    if not isinstance(source, str):
        raise MediaError(f"a media source must be a URL or a path string, got {type(source).__name__}")
    text = source.strip()
    if not text:
        raise MediaError("the media source is empty")
    match = _SCHEME.match(text)
    scheme = match.group(1).lower() if match else ""
    if scheme == "data":
        return decode_data_uri(text, max_bytes)
    if scheme in ("http", "https"):
        return _fetch_http(text, policy, limits.media_fetch_timeout, max_bytes, cancel)
    if scheme == "file":
        return _read_local(_file_url_path(text), source_text=text, policy=policy, max_bytes=max_bytes)
    if scheme and "://" in text:
        raise MediaError(f"unsupported media URL scheme {scheme!r}: use http(s)://, data: or file:// URLs")
    return _read_local(text, source_text=text, policy=policy, max_bytes=max_bytes)


# ---------------------------------------------------------------------------------------------------
# data: URIs


def decode_data_uri(uri: str, max_bytes: int) -> bytes:
    """Decode `data:[<type>][;base64],<payload>` (base64 or percent-encoded), refusing over max_bytes."""
    if uri[:5].lower() != "data:":
        raise MediaError("not a data: URI")
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise MediaError("malformed data: URI: expected 'data:<type>;base64,<data>'")
    is_base64 = header.lower().split(";")[-1].strip() == "base64"
    raw = payload.encode("ascii", errors="strict") if payload.isascii() else None
    if raw is None:
        raise MediaError("malformed data: URI: the payload must be ASCII (base64 or percent-encoded)")
    if not is_base64:
        data = urllib.parse.unquote_to_bytes(raw)
        _check_size(len(data), max_bytes, "the data: URI")
        return data
    if b"%" in raw:  # base64 that was percent-encoded once more (e.g. %2B, %3D)
        raw = urllib.parse.unquote_to_bytes(raw)
    raw = _WHITESPACE.sub(b"", raw)
    if len(raw) // 4 * 3 > max_bytes + 3:  # refuse before decoding; exact check below
        _check_size(len(raw) // 4 * 3, max_bytes, "the data: URI")
    data = _b64decode(raw)
    _check_size(len(data), max_bytes, "the data: URI")
    return data


def _b64decode(raw: bytes) -> bytes:
    """Standard or URL-safe base64, padding optional."""
    if b"-" in raw or b"_" in raw:
        raw = raw.translate(bytes.maketrans(b"-_", b"+/"))
    raw += b"=" * (-len(raw) % 4)
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("malformed data: URI: the payload is not valid base64") from None


def _check_size(size: int, max_bytes: int, what: str) -> None:
    if size > max_bytes:
        raise LimitExceededError(f"{what} is over the limit of {max_bytes} bytes for one media item")


# ---------------------------------------------------------------------------------------------------
# Local files


def _file_url_path(url: str) -> str:
    """The absolute path named by a file:// URL (host empty or localhost)."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError(
            f"file:// URLs must name a local absolute path (file:///dir/name), got {_short(url)!r}"
        )
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/"):
        raise MediaError(f"file:// URLs must name an absolute path (file:///dir/name), got {_short(url)!r}")
    return path


def _check_local_allowed(path: str, source_text: str, policy: MediaPolicy) -> str:
    """The real path (symlinks and `..` resolved) if policy allows it, else a MediaError."""
    if not policy.allow_local_files:
        raise MediaError(
            "local files are not allowed here: send media as http(s):// or data: URLs "
            "(a server allows file:// only with --allowed-local-media-path)"
        )
    real = os.path.realpath(path)
    root_setting = policy.allowed_local_media_path
    if root_setting is not None:
        root = os.path.realpath(root_setting)
        if os.path.commonpath([root, real]) != root:
            raise MediaError(
                f"the file {_short(source_text)!r} is outside the allowed media directory {root}"
            )
    return real


def resolve_local_path(
    path: str | os.PathLike[str], policy: MediaPolicy | None = None, max_bytes: int | None = None
) -> Path:
    """The real path of a local file (bare path or file:// URL) that the policy allows.

    For decoders that seek in a file rather than read it whole (video): checks that it is a regular
    file of at most `max_bytes`, without reading it.
    """
    policy = policy or MediaPolicy()
    text = os.fspath(path)
    local = _file_url_path(text) if text[:5].lower() == "file:" else text
    real = _check_local_allowed(local, text, policy)
    try:
        info = os.stat(real)
    except FileNotFoundError:
        raise MediaError(f"no such file: {_short(text)!r}") from None
    except OSError as e:
        raise MediaError(f"cannot open {_short(text)!r}: {e.strerror or e}") from None
    if not stat.S_ISREG(info.st_mode):
        raise MediaError(f"{_short(text)!r} is not a regular file")
    if max_bytes is not None:
        _check_size(info.st_size, max_bytes, f"the file {_short(text)!r}")
    return Path(real)


def _read_local(path: str, *, source_text: str, policy: MediaPolicy, max_bytes: int) -> bytes:
    """Read a regular file that the policy allows, refusing it whole if it is over max_bytes."""
    real = _check_local_allowed(path, source_text, policy)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise MediaError(f"no such file: {_short(source_text)!r}") from None
    except OSError as e:
        raise MediaError(f"cannot open {_short(source_text)!r}: {e.strerror or e}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # a directory, FIFO or device
            raise MediaError(f"{_short(source_text)!r} is not a regular file")
        _check_size(info.st_size, max_bytes, f"the file {_short(source_text)!r}")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    _check_size(len(data), max_bytes, f"the file {_short(source_text)!r}")
    return data


# ---------------------------------------------------------------------------------------------------
# http(s)


def _address_is_public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for globally routable unicast addresses, looking through IPv4-in-IPv6 encodings."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:  # ::ffff:a.b.c.d is that IPv4 address
            return _address_is_public(addr.ipv4_mapped)
        embedded = addr.sixtofour or (addr.teredo[1] if addr.teredo else None)
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None and not _address_is_public(embedded):
            return False
    return addr.is_global and not (
        addr.is_loopback
        or addr.is_private
        or addr.is_link_local
        or addr.is_reserved
        or addr.is_multicast
        or addr.is_unspecified
    )


def _resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (IP literals resolve to themselves)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise MediaError(f"cannot resolve the host {host!r} of the media URL ({e})") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _public_address(host: str, port: int) -> str:
    """One checked address to connect to; every address of the host must be public, so DNS can't race."""
    addresses = _resolve(host, port)
    for text in addresses:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
        if not _address_is_public(addr):
            raise MediaError(
                f"the media URL's host {host!r} resolves to a non-public address ({addr}); loopback, "
                "private, link-local and reserved addresses are refused "
                "(a server allows them only with --allow-private-media-urls)"
            )
    if not addresses:
        raise MediaError(f"cannot resolve the host {host!r} of the media URL")
    return addresses[0].split("%", 1)[0]


def _prepare_hop(url: httpx.URL, policy: MediaPolicy) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
    """The URL, headers and extensions for one request; pinned to a checked IP unless private is allowed."""
    if url.scheme not in ("http", "https"):
        raise MediaError(f"media URLs must be http(s)://, got a redirect or URL to {url.scheme!r}")
    if not url.raw_host:
        raise MediaError(f"the media URL has no host: {_short(str(url))!r}")
    if policy.allow_private_urls:
        return url, {"User-Agent": USER_AGENT}, {}
    port = url.port or (443 if url.scheme == "https" else 80)
    host = url.raw_host.decode("ascii")  # IDNA-encoded, as DNS and TLS see it
    ip = _public_address(host, port)
    # Connect to the address we checked; Host and SNI (and certificate checks) keep the real name.
    host_header = url.netloc.decode("ascii").rpartition("@")[2]
    extensions = {"sni_hostname": host} if url.scheme == "https" else {}
    return url.copy_with(host=ip), {"Host": host_header, "User-Agent": USER_AGENT}, extensions


_tls_lock = threading.Lock()
_tls_contexts: dict[bool, ssl.SSLContext] = {}


def tls_context(trust_env: bool) -> ssl.SSLContext:
    """The TLS settings every media fetch shares (the CA bundle, or SSL_CERT_FILE/SSL_CERT_DIR when
    `trust_env`). Built once: loading the bundle is ~100 ms of CPU, mostly holding the GIL, so a context
    per fetch (httpx.Client's default) stalled every other thread, the event loop included, for each
    fetch. An SSLContext is safe to share between threads."""
    with _tls_lock:
        context = _tls_contexts.get(trust_env)
        if context is None:
            context = _tls_contexts[trust_env] = httpx.create_ssl_context(trust_env=trust_env)
        return context


def prepare_fetching(policy: MediaPolicy) -> None:
    """Do before serving what the first URL fetch would otherwise do while other requests wait: build
    the shared TLS context and let httpx import its transport (it does so on its first client)."""
    httpx.Client(verify=tls_context(policy.allow_private_urls), trust_env=policy.allow_private_urls).close()


def _fetch_http(
    source: str, policy: MediaPolicy, timeout: float, max_bytes: int, cancel: Cancellation | None
) -> bytes:
    """GET a URL, following at most MAX_REDIRECTS redirects by hand so every hop is checked."""
    try:
        url = httpx.URL(source)
    except (httpx.InvalidURL, ValueError) as e:
        raise MediaError(f"invalid media URL {_short(source)!r}: {e}") from None
    deadline = time.monotonic() + timeout
    sockets = _Sockets(cancel)
    try:
        with (
            httpx.Client(
                follow_redirects=False,
                trust_env=policy.allow_private_urls,
                verify=tls_context(policy.allow_private_urls),
            ) as client,
            cancel.on_cancel(sockets.shut_down) if cancel is not None else nullcontext(),
        ):
            for _ in range(MAX_REDIRECTS + 1):
                data, location = _get_once(client, url, policy, deadline, timeout, max_bytes, sockets)
                if location is None:
                    return data
                url = location
    except httpx.TimeoutException:
        _stop_if_cancelled(cancel)
        raise MediaError(f"fetching {_short(source)!r} timed out after {timeout:g} s") from None
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, ValueError, OSError) as e:
        _stop_if_cancelled(cancel)  # a read woken by the cancellation fails like a dropped connection
        raise MediaError(f"could not fetch {_short(source)!r}: {e}") from None
    raise MediaError(f"fetching {_short(source)!r} was redirected more than {MAX_REDIRECTS} times")


def _stop_if_cancelled(cancel: Cancellation | None) -> None:
    if cancel is not None:
        cancel.check()


class _Sockets:
    """The sockets a cancellable fetch connects (httpcore's trace reports each), so that cancelling it
    can shut them down: a read blocked on a server that sends nothing (headers or body) then fails at
    once, and the fetch sees the cancellation."""

    def __init__(self, cancel: Cancellation | None) -> None:
        self.cancel = cancel
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if not event.endswith(".connect_tcp.complete"):
            return
        sock = info["return_value"].get_extra_info("socket")
        with self._lock:
            self._open.append(sock)
        if self.cancel is not None and self.cancel.is_set():  # cancelled while connecting
            self.shut_down()

    def shut_down(self) -> None:
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            try:  # the plain socket's shutdown, also under TLS: it only touches the file descriptor
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:  # already closed
                pass


def _get_once(
    client: httpx.Client,
    url: httpx.URL,
    policy: MediaPolicy,
    deadline: float,
    timeout: float,
    max_bytes: int,
    sockets: _Sockets,
) -> tuple[bytes, httpx.URL | None]:
    """One request: (body, None), or (b"", next URL) for a redirect."""
    cancel = sockets.cancel
    _stop_if_cancelled(cancel)
    target, headers, extensions = _prepare_hop(url, policy)
    if cancel is not None:
        extensions = {**extensions, "trace": sockets.trace}
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise httpx.TimeoutException("deadline passed")
    with client.stream(
        "GET", target, headers=headers, extensions=extensions, timeout=httpx.Timeout(remaining)
    ) as response:
        if response.status_code in _REDIRECT_STATUSES:
            location = response.headers.get("location")
            if not location:
                raise MediaError(f"{_short(str(url))!r} redirected without a Location header")
            return b"", url.join(location)
        if not 200 <= response.status_code < 300:
            raise MediaError(
                f"fetching {_short(str(url))!r} failed: the server answered HTTP {response.status_code}"
            )
        declared = response.headers.get("content-length")
        if declared and declared.isdigit():
            _check_size(int(declared), max_bytes, f"the media at {_short(str(url))!r}")
        return _read_body(response, url, deadline, timeout, max_bytes, cancel), None


def _read_body(
    response: httpx.Response,
    url: httpx.URL,
    deadline: float,
    timeout: float,
    max_bytes: int,
    cancel: Cancellation | None,
) -> bytes:
    """Stream the body, stopping as soon as it passes max_bytes or the overall deadline, or the request
    is cancelled."""
    buffer = bytearray()
    for chunk in response.iter_bytes():  # as received, so the checks run after every read
        _stop_if_cancelled(cancel)
        buffer += chunk
        _check_size(len(buffer), max_bytes, f"the media at {_short(str(url))!r}")
        if time.monotonic() > deadline:
            raise httpx.TimeoutException(f"timed out after {timeout:g} s")
    _stop_if_cancelled(cancel)  # a woken read can end like a complete body
    return bytes(buffer)


# ---------------------------------------------------------------------------------------------------
# Images


def _check_pixels(width: int, height: int, limits: MediaLimits) -> None:
    if width < 1 or height < 1:
        raise MediaError(f"the image has no pixels ({width}x{height})")
    if width * height > limits.max_image_pixels:
        raise LimitExceededError(
            f"the image is {width}x{height} = {width * height} pixels; "
            f"at most {limits.max_image_pixels} pixels are allowed"
        )


def _available_formats() -> list[str]:
    """IMAGE_FORMATS that this Pillow build can open (AVIF needs libavif)."""
    Image.init()
    return [name for name in IMAGE_FORMATS if name in Image.OPEN]


def open_image(data: bytes, limits: MediaLimits | None = None) -> Image.Image:
    """Open image bytes lazily: only the header is read, and the pixel count is checked from it."""
    limits = limits or MediaLimits()
    try:
        image = Image.open(io.BytesIO(data), formats=_available_formats())
    except Image.DecompressionBombError:
        raise LimitExceededError(
            f"the image has more pixels than the decoder's safety limit allows; "
            f"at most {limits.max_image_pixels} pixels are allowed"
        ) from None
    except Image.UnidentifiedImageError:
        raise MediaError(f"the data is not an image in a supported format ({_FORMAT_NAMES})") from None
    except Exception as e:  # Pillow raises many types for bad input; none of them is a server fault
        raise MediaError(f"cannot read the image ({e}); send {_FORMAT_NAMES}") from None
    _check_pixels(image.width, image.height, limits)
    return image


def _load(image: Image.Image, limits: MediaLimits) -> Image.Image:
    """Decode an opened image's pixels."""
    try:
        image.load()
    except Image.DecompressionBombError:
        raise LimitExceededError(f"the image is over the limit of {limits.max_image_pixels} pixels") from None
    except Exception as e:
        raise MediaError(f"the image is corrupt or truncated ({e})") from None
    return image


def finish_image(image: Image.Image, limits: MediaLimits | None = None) -> Image.Image:
    """An image from `open_image`, decoded, turned upright and in RGB: what `load_image` gives."""
    return to_rgb(_upright(_load(image, limits or MediaLimits())))


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, as photo viewers (and transformers' load_image) do."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block is no reason to refuse the pixels
        return image


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit grey to 8 bits; Pillow's convert would clip everything above 255 to white."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or values.max(initial=0) > 255:
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for the encoder: transparency composited on white, 16-bit grey scaled, other modes converted."""
    if image.mode == "RGB":
        return image
    try:
        if image.mode.startswith("I") or image.mode == "F":
            return _sixteen_bit_to_l(image).convert("RGB")
        has_alpha = "A" in image.getbands() or "transparency" in image.info
        if not has_alpha:
            return image.convert("RGB")
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    except Exception as e:
        raise MediaError(f"cannot convert an image of mode {image.mode!r} to RGB ({e})") from None


def load_image(
    source: str | bytes | os.PathLike[str] | Image.Image,
    policy: MediaPolicy | None = None,
    limits: MediaLimits | None = None,
) -> Image.Image:
    """An RGB image from a source string, raw bytes or a PIL image, within the pixel limit."""
    limits = limits or MediaLimits()
    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, limits)
        try:
            source.load()
        except Exception as e:
            raise MediaError(f"the image is corrupt or truncated ({e})") from None
        return to_rgb(source)
    return finish_image(open_image(image_bytes(source, policy, limits), limits), limits)


def image_bytes(
    source: str | bytes | os.PathLike[str],
    policy: MediaPolicy | None = None,
    limits: MediaLimits | None = None,
    cancel: Cancellation | None = None,
) -> bytes:
    """The encoded bytes of an image given as raw bytes or a source string, within the byte limit."""
    limits = limits or MediaLimits()
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        _check_size(len(data), limits.max_image_bytes, "the image")
        return data
    return fetch_bytes(source, policy, limits, limits.max_image_bytes, cancel)
