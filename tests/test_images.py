"""backend.images.fetch and backend.ls.auth against a real threaded HTTP server on 127.0.0.1.

The server (tests/imageserver.py) plays Label Studio at http://127.0.0.1:PORT and, under other host
names for the same port (``localhost``), a "different" image host. Nothing here connects anywhere
but 127.0.0.1; private/link-local addresses are only fed to ``check_public_host``, which resolves IP
literals without connecting.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from backend.images.decode import PixelBudget, decode_image
from backend.images.fetch import FetchSettings, ImageError, ImageLoader, LoadedImage
from backend.images.urlguard import check_public_host
from backend.ls.auth import LabelStudioAuth, LabelStudioAuthError, is_personal_access_token
from tests.imageserver import ImageServer, make_jwt

LEGACY = "0123456789abcdef0123456789abcdef01234567"
PAT = make_jwt(
    {"token_type": "refresh", "exp": int(time.time()) + 86400, "jti": "pat-1", "user_id": 1}
)
EXPIRED_PAT = make_jwt({"token_type": "refresh", "exp": int(time.time()) - 60, "jti": "pat-0"})
SECRETS = (LEGACY, PAT, EXPIRED_PAT)
FAST = {"connect_timeout": 2.0, "read_timeout": 2.0}

# ------------------------------------------------------------------------------------------------
# test images


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


PNG_IMG = Image.new("RGB", (40, 30), (10, 200, 30))
PNG = _encode(PNG_IMG, "PNG")


def _exif6_jpeg() -> bytes:
    """40x20 stored image, red 10x10 block at the stored top-left, EXIF orientation 6 (rotate 90 CW)."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(img, "JPEG", exif=exif, quality=95)


EXIF6 = _exif6_jpeg()
JPEG = _encode(Image.new("RGB", (64, 48), (120, 60, 30)), "JPEG")
HTML = b"<!DOCTYPE html><html><head><title>Login</title></head><body>sign in</body></html>"


def _png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit grayscale PNG of width x height, all black: ~50 MB of pixels, ~50 kB on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    block = row * 100
    idat = b"".join(comp.compress(block) for _ in range(height // 100)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def server():
    srv = ImageServer(legacy_token=LEGACY, pat=PAT).start()
    srv.static("/img.png", PNG)
    srv.static("/exif6.jpg", EXIF6, "image/jpeg")
    srv.static("/corrupt.png", b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    srv.static("/truncated.jpg", JPEG[: len(JPEG) // 2], "image/jpeg")
    srv.static("/empty", b"")
    srv.static("/page.html", HTML, "text/html")
    srv.static("/big", b"\x00" * 5000)
    srv.static("/bomb.png", _png_bomb())
    srv.static("/large.png", _encode(Image.new("L", (2000, 2000)), "PNG"))
    srv.ls_static("/data/upload/1/img.png", PNG)
    srv.ls_static("/data/upload/1/exif6.jpg", EXIF6, "image/jpeg")

    def big_without_length(handler, query):
        handler.send_bytes(200, b"\x00" * 5000, length=False)

    def slow(handler, query):
        srv.stopping.wait(3.0)  # far past the tests' read timeout
        handler.send_bytes(200, PNG, "image/png")

    def drip(handler, query):
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        for _ in range(100000):
            if srv.stopping.wait(0.05):
                return
            handler.wfile.write(b"\x00")
            handler.wfile.flush()

    def local_files(handler, query):
        if not srv.authorized(handler):
            handler.send_json(401, {"detail": "Authentication credentials were not provided."})
        elif query.get("d") == ["project2/img.png"]:
            handler.send_bytes(200, PNG, "image/png")
        else:
            handler.send_bytes(404, b"not found", "text/plain")

    def upload_redirect_same(handler, query):
        if not srv.authorized(handler):
            handler.send_json(401, {"detail": "no"})
        else:
            handler.redirect("/data/upload/1/img.png")

    srv.route("GET", "/big-nolen", big_without_length)
    srv.route("GET", "/slow", slow)
    srv.route("GET", "/drip", drip)
    srv.route("GET", "/data/local-files/", local_files)
    srv.route("GET", "/data/upload/1/same", upload_redirect_same)
    srv.route(
        "GET", "/data/upload/1/out", lambda h, q: h.redirect(srv.url("/img.png", "localhost"))
    )
    srv.route("GET", "/loop", lambda h, q: h.redirect("/loop"))
    srv.route("GET", "/to-file", lambda h, q: h.redirect("file:///etc/passwd"))
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _reset(server):
    server.reset()


@pytest.fixture
def loader_for(server):
    loaders: list[ImageLoader] = []

    def make(api_key: str | None = LEGACY, **kw) -> ImageLoader:
        params = {"label_studio_url": server.base, "api_key": api_key, **FAST, **kw}
        loader = ImageLoader(FetchSettings(**params))
        loaders.append(loader)
        return loader

    yield make
    for loader in loaders:
        loader.close()


def _image_requests(server: ImageServer):
    return [r for r in server.requests if r.method == "GET"]


# ------------------------------------------------------------------------------------------------
# LS-relative URLs and auth


def test_ls_upload_with_legacy_token(server, loader_for):
    loaded = loader_for().load("/data/upload/1/img.png")
    assert isinstance(loaded, LoadedImage)
    assert (loaded.width, loaded.height) == (40, 30)
    assert loaded.image.mode == "RGB"
    assert loaded.sha256 == hashlib.sha256(PNG).hexdigest()
    assert loaded.url == "/data/upload/1/img.png"
    [req] = server.requests
    assert req.authorization == f"Token {LEGACY}"


def test_absolute_ls_url_gets_auth(server, loader_for):
    loaded = loader_for().load(server.url("/data/upload/1/img.png"))
    assert loaded.width == 40
    assert server.requests[0].authorization == f"Token {LEGACY}"


def test_ls_without_api_key_fails_with_hint(server, loader_for):
    with pytest.raises(ImageError) as err:
        loader_for(api_key=None).load("/data/upload/1/img.png")
    assert "401" in err.value.reason and "LABEL_STUDIO_API_KEY" in err.value.reason
    assert server.requests[0].authorization is None


def test_relative_url_without_label_studio_url(server):
    loader = ImageLoader(FetchSettings(label_studio_url=None, api_key=LEGACY, **FAST))
    with pytest.raises(ImageError, match="LABEL_STUDIO_URL"):
        loader.load("/data/upload/1/img.png")
    assert server.requests == []


def test_pat_exchanged_once_and_reused_as_bearer(server, loader_for):
    loader = loader_for(api_key=PAT)
    for url in (
        "/data/upload/1/img.png",
        "/data/local-files/?d=project2/img.png",
        "/data/upload/1/img.png",
    ):
        assert loader.load(url).width == 40
    assert server.refresh_calls == 1
    [access] = server.issued_access
    gets = _image_requests(server)
    assert len(gets) == 3
    assert all(r.authorization == f"Bearer {access}" for r in gets)
    assert all(PAT not in (r.authorization or "") for r in gets)
    [post] = [r for r in server.requests if r.method == "POST"]
    assert post.path == "/api/token/refresh/" and post.authorization is None


def test_expired_access_token_is_refreshed_before_use(server):
    now = [time.time()]
    auth = LabelStudioAuth(server.base, PAT, timeout=2.0, clock=lambda: now[0])
    loader = ImageLoader(
        FetchSettings(label_studio_url=server.base, api_key=PAT, **FAST), auth=auth
    )
    loader.load("/data/upload/1/img.png")
    first = server.issued_access[0]
    now[0] += 3600  # the 300 s access token is now stale on our clock
    loader.load("/data/upload/1/img.png")
    assert server.refresh_calls == 2
    second = server.issued_access[1]
    assert second != first
    assert _image_requests(server)[-1].authorization == f"Bearer {second}"


def test_access_token_rejected_by_ls_is_refreshed_once(server, loader_for):
    server.access_ttls[:] = [-30, 300]  # LS hands out an already-expired token first
    loaded = loader_for(api_key=PAT).load("/data/upload/1/img.png")
    assert loaded.width == 40
    assert server.refresh_calls == 2
    statuses = [r.authorization for r in _image_requests(server)]
    assert statuses == [f"Bearer {server.issued_access[0]}", f"Bearer {server.issued_access[1]}"]


def test_rejected_pat_gives_actionable_error_without_token(server, loader_for, caplog):
    bad_pat = make_jwt({"token_type": "refresh", "exp": int(time.time()) + 3600, "jti": "other"})
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ImageError) as err:
        loader_for(api_key=bad_pat).load("/data/upload/1/img.png")
    assert "personal access token" in err.value.reason and "401" in err.value.reason
    assert bad_pat not in err.value.reason and bad_pat not in caplog.text
    assert _image_requests(server) == []


def test_expired_pat_refused_without_request(server, loader_for):
    with pytest.raises(ImageError, match="expired"):
        loader_for(api_key=EXPIRED_PAT).load("/data/upload/1/img.png")
    assert server.requests == []


def test_auth_kinds_and_repr_hide_tokens(server):
    assert is_personal_access_token(PAT)
    assert not is_personal_access_token(LEGACY)
    access_like = make_jwt({"token_type": "access", "exp": int(time.time()) + 60})
    assert not is_personal_access_token(access_like)
    assert LabelStudioAuth(server.base, LEGACY, 2.0).headers() == {
        "Authorization": f"Token {LEGACY}"
    }
    assert LabelStudioAuth(server.base, None, 2.0).headers() == {}
    auth = LabelStudioAuth(server.base, PAT, 2.0)
    header = auth.headers()["Authorization"]
    assert header.startswith("Bearer ") and header != f"Bearer {PAT}"
    for obj in (auth, LabelStudioAuth(server.base, LEGACY, 2.0)):
        for text in (repr(obj), str(obj)):
            assert all(secret not in text for secret in SECRETS)
            assert header[len("Bearer ") :] not in text
    assert auth.kind == "pat"


def test_pat_refresh_is_shared_between_threads(server):
    auth = LabelStudioAuth(server.base, PAT, timeout=2.0)
    results: list[dict[str, str]] = []
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        results.append(auth.headers())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.refresh_calls == 1
    assert len(results) == 8 and len({r["Authorization"] for r in results}) == 1


def test_auth_refresh_unreachable_raises_auth_error():
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    auth = LabelStudioAuth(f"http://127.0.0.1:{port}", PAT, timeout=1.0)
    with pytest.raises(LabelStudioAuthError) as err:
        auth.headers()
    assert PAT not in err.value.reason


def test_auth_rejects_bad_base_url():
    with pytest.raises(ValueError, match="LABEL_STUDIO_URL"):
        LabelStudioAuth("localhost:8080", LEGACY, 2.0)


# ------------------------------------------------------------------------------------------------
# local files


def test_local_files_over_http_with_token(server, loader_for):
    loaded = loader_for().load("/data/local-files/?d=project2/img.png")
    assert loaded.width == 40
    [req] = server.requests
    assert req.path == "/data/local-files/?d=project2/img.png"
    assert req.authorization == f"Token {LEGACY}"


@pytest.mark.parametrize(
    "d",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "project2/../../etc/passwd",
        "%2e%2e/%2e%2e/etc/passwd",
        "project2\\..\\..\\secret.png",
        "project2/img.png%00.png",
        "C:/Windows/win.ini",
        "",
    ],
)
def test_local_files_path_traversal_refused(server, loader_for, tmp_path, d):
    for loader in (loader_for(), loader_for(local_files_root=str(tmp_path))):
        with pytest.raises(ImageError) as err:
            loader.load(f"/data/local-files/?d={d}")
        assert "d=" in err.value.reason or "local-files" in err.value.reason
    assert server.requests == []


def test_local_files_read_from_root_without_request(server, loader_for, tmp_path):
    (tmp_path / "project2").mkdir()
    disk_png = _encode(Image.new("RGB", (7, 5), (1, 2, 3)), "PNG")
    (tmp_path / "project2" / "disk.png").write_bytes(disk_png)
    loaded = loader_for(local_files_root=str(tmp_path)).load(
        "/data/local-files/?d=project2/disk.png"
    )
    assert (loaded.width, loaded.height) == (7, 5)
    assert loaded.sha256 == hashlib.sha256(disk_png).hexdigest()
    assert server.requests == []


def test_local_files_missing_on_disk_falls_back_to_ls(server, loader_for, tmp_path):
    loaded = loader_for(local_files_root=str(tmp_path)).load(
        "/data/local-files/?d=project2/img.png"
    )
    assert loaded.width == 40
    assert len(server.requests) == 1


def test_local_files_symlink_escaping_root_refused(server, loader_for, tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(PNG)
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ImageError, match="outside"):
        loader_for(local_files_root=str(root)).load("/data/local-files/?d=link/secret.png")
    assert server.requests == []


def test_local_file_over_size_limit(server, loader_for, tmp_path):
    (tmp_path / "big.png").write_bytes(b"\x00" * 2000)
    with pytest.raises(ImageError, match="download limit"):
        loader_for(local_files_root=str(tmp_path), max_download_bytes=1000).load(
            "/data/local-files/?d=big.png"
        )


# ------------------------------------------------------------------------------------------------
# decoding


def test_exif_orientation_6_is_transposed(server, loader_for):
    loaded = loader_for(allow_private_urls=True).load(server.url("/exif6.jpg"))
    # stored 40x20; orientation 6 = rotate 90 degrees clockwise for display
    assert (loaded.width, loaded.height) == (20, 40)
    assert loaded.image.size == (20, 40)
    r, g, b = loaded.image.getpixel((15, 4))  # stored top-left block lands top-right
    assert r > 200 and g < 60 and b < 60
    r, g, b = loaded.image.getpixel((4, 4))
    assert b > 200 and r < 60
    assert loaded.sha256 == hashlib.sha256(EXIF6).hexdigest()


def test_exif_orientation_on_ls_upload(server, loader_for):
    loaded = loader_for().load("/data/upload/1/exif6.jpg")
    assert (loaded.width, loaded.height) == (20, 40)


def _p_with_transparency() -> Image.Image:
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 0)  # transparent index -> white
    for x in range(1, 4):
        img.putpixel((x, 0), 1)
    img.info["transparency"] = 0
    return img


@pytest.mark.parametrize(
    "image, fmt, expected_first_pixel",
    [
        (Image.new("L", (4, 2), 77), "PNG", (77, 77, 77)),
        (Image.new("1", (4, 2), 1), "PNG", (255, 255, 255)),
        (Image.fromarray(np.full((2, 4), 257 * 100, dtype=np.uint16)), "PNG", (100, 100, 100)),
        (Image.fromarray(np.full((2, 4), 65535, dtype=np.uint16)), "TIFF", (255, 255, 255)),
        (Image.new("I", (4, 2), 257 * 40), "TIFF", (40, 40, 40)),
        (Image.new("RGBA", (4, 2), (255, 0, 0, 0)), "PNG", (255, 255, 255)),
        (Image.new("RGBA", (4, 2), (0, 0, 255, 255)), "PNG", (0, 0, 255)),
        (Image.new("LA", (4, 2), (0, 0)), "PNG", (255, 255, 255)),
        (_p_with_transparency(), "PNG", (255, 255, 255)),
        (Image.new("P", (4, 2), 3), "GIF", None),
        (Image.new("CMYK", (4, 2), (0, 0, 0, 0)), "JPEG", None),
    ],
    ids=[
        "L",
        "1",
        "I16-png",
        "I16-tiff",
        "I32-tiff",
        "RGBA-transparent",
        "RGBA-opaque",
        "LA",
        "P-transparency",
        "P",
        "CMYK",
    ],
)
def test_modes_convert_to_rgb(loader_for, image, fmt, expected_first_pixel):
    data = _encode(
        image, fmt, **({"transparency": 0} if image.info.get("transparency") == 0 else {})
    )
    loaded = loader_for().load(_data_uri(data, f"image/{fmt.lower()}"))
    assert loaded.image.mode == "RGB"
    assert loaded.image.size == (4, 2)
    if expected_first_pixel is not None:
        assert loaded.image.getpixel((0, 0)) == expected_first_pixel
    if image.mode == "P" and "transparency" in image.info:
        assert loaded.image.getpixel((1, 0)) == (0, 0, 255)


def test_data_uri_png(server, loader_for):
    loaded = loader_for().load(_data_uri(PNG))
    assert (loaded.width, loaded.height) == (40, 30)
    assert loaded.sha256 == hashlib.sha256(PNG).hexdigest()
    assert server.requests == []


@pytest.mark.parametrize(
    "uri, fragment",
    [
        ("data:text/html;base64," + base64.b64encode(HTML).decode(), "data:image"),
        ("data:image/png," + "x" * 10, "data:image"),
        ("data:image/png;base64,!!!not base64!!!", "base64"),
        ("data:image/png;base64,", "empty"),
        ("data:image/png;base64," + base64.b64encode(HTML).decode(), "HTML"),
    ],
)
def test_bad_data_uris(loader_for, uri, fragment):
    with pytest.raises(ImageError) as err:
        loader_for().load(uri)
    assert fragment in err.value.reason


def test_data_uri_over_size_limit(loader_for):
    with pytest.raises(ImageError, match="download limit"):
        loader_for(max_download_bytes=100).load(_data_uri(PNG * 3))


@pytest.mark.parametrize(
    "path, fragment",
    [
        ("/corrupt.png", "corrupt"),
        ("/truncated.jpg", "truncated"),
        ("/empty", "0 bytes"),
        ("/page.html", "HTML"),
    ],
)
def test_undecodable_bodies(server, loader_for, path, fragment):
    with pytest.raises(ImageError) as err:
        loader_for(allow_private_urls=True).load(server.url(path))
    assert fragment in err.value.reason


def test_decompression_bomb_refused(server, loader_for):
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="pixels"):
        loader_for(allow_private_urls=True, max_image_pixels=10_000_000).load(
            server.url("/bomb.png")
        )
    assert Image.MAX_IMAGE_PIXELS == before


def test_pixel_limit_checked_from_header(server, loader_for, monkeypatch):
    loads: list[int] = []
    original = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(1) or original(self))
    with pytest.raises(ImageError) as err:
        loader_for(allow_private_urls=True, max_image_pixels=1_000_000).load(
            server.url("/large.png")
        )
    assert "2000x2000" in err.value.reason and "MAX_IMAGE_PIXELS" in err.value.reason
    assert loads == []  # refused before any pixel data was decoded


def test_decode_image_direct():
    with pytest.raises(ImageError, match="0 bytes"):
        decode_image(b"", 100)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    with pytest.raises(ImageError, match="not an image"):
        decode_image(eps, 10_000)  # EPS is not in ALLOWED_FORMATS: never reaches Ghostscript
    assert decode_image(PNG, 40 * 30).size == (40, 30)


def test_loaded_image_from_bytes_is_the_loaders_decode():
    loaded = LoadedImage.from_bytes(PNG, "mem://one", 40 * 30, PixelBudget(10))
    assert (loaded.width, loaded.height, loaded.image.mode) == (40, 30, "RGB")
    assert loaded.sha256 == hashlib.sha256(PNG).hexdigest() and loaded.url == "mem://one"
    with pytest.raises(ImageError, match="pixels"):
        LoadedImage.from_bytes(PNG, "mem://one", 40 * 30 - 1)


# ------------------------------------------------------------------------------------------------
# HTTP failures and limits


def test_404(server, loader_for):
    with pytest.raises(ImageError, match="404"):
        loader_for().load("/data/upload/1/missing.png")


def test_read_timeout(server, loader_for):
    with pytest.raises(ImageError, match="timed out"):
        loader_for(allow_private_urls=True, read_timeout=0.5).load(server.url("/slow"))


def test_slow_drip_hits_overall_deadline(server, loader_for):
    loader = loader_for(allow_private_urls=True, read_timeout=0.5, total_timeout=1.0)
    with pytest.raises(ImageError, match="overall limit"):
        loader.load(server.url("/drip"))


def test_oversize_by_content_length(server, loader_for):
    with pytest.raises(ImageError, match="5000 bytes, over the download limit of 1000"):
        loader_for(allow_private_urls=True, max_download_bytes=1000).load(server.url("/big"))


def test_oversize_while_streaming_without_content_length(server, loader_for):
    with pytest.raises(ImageError, match="more than 1000 bytes"):
        loader_for(allow_private_urls=True, max_download_bytes=1000).load(server.url("/big-nolen"))


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "gopher://127.0.0.1:70/_x", "img.png"]
)
def test_unsupported_schemes(server, loader_for, url):
    with pytest.raises(ImageError, match="scheme"):
        loader_for(allow_private_urls=True).load(url)
    assert server.requests == []


@pytest.mark.parametrize(
    "bad", [None, 42, "", "   ", "//127.0.0.1/img.png", "http://127.0.0.1:99999/x"]
)
def test_bad_inputs_raise_image_error(loader_for, bad):
    with pytest.raises(ImageError):
        loader_for(allow_private_urls=True).load(bad)


# ------------------------------------------------------------------------------------------------
# redirects


def test_same_origin_redirect_keeps_auth(server, loader_for):
    assert loader_for().load("/data/upload/1/same").width == 40
    assert [r.authorization for r in server.requests] == [f"Token {LEGACY}"] * 2


def test_redirect_to_other_private_host_refused(server, loader_for):
    with pytest.raises(ImageError, match="ALLOW_PRIVATE_URLS"):
        loader_for().load("/data/upload/1/out")
    assert server.paths() == ["/data/upload/1/out"]  # the redirect target was never requested


def test_redirect_to_other_host_drops_auth(server, loader_for):
    assert loader_for(allow_private_urls=True).load("/data/upload/1/out").width == 40
    first, second = server.requests
    assert first.authorization == f"Token {LEGACY}"
    assert second.path == "/img.png" and second.headers.get("Host", "").startswith("localhost")
    assert second.authorization is None


def test_redirect_to_file_scheme_refused(server, loader_for):
    with pytest.raises(ImageError, match="scheme"):
        loader_for().load("/to-file")


def test_too_many_redirects(server, loader_for):
    with pytest.raises(ImageError, match="too many redirects"):
        loader_for().load("/loop")
    assert len(server.requests) == 4  # the first request and 3 followed redirects


# ------------------------------------------------------------------------------------------------
# SSRF guard


@pytest.mark.parametrize("host", ["localhost", "127.0.0.2"])
def test_non_ls_private_host_refused_before_connecting(server, loader_for, host):
    with pytest.raises(ImageError, match="loopback"):
        loader_for().load(server.url("/img.png", host))
    assert server.requests == []


def test_allow_private_urls_lets_localhost_through_without_auth(server, loader_for):
    loaded = loader_for(allow_private_urls=True).load(server.url("/img.png", "localhost"))
    assert loaded.width == 40
    [req] = server.requests
    assert req.authorization is None


def test_other_port_on_ls_host_is_not_ls(server):
    """Only the exact LS origin (scheme, host, port) gets credentials."""
    settings = FetchSettings(
        label_studio_url=f"http://127.0.0.1:{server.port + 1}",
        api_key=LEGACY,
        allow_private_urls=True,
        **FAST,
    )
    loader = ImageLoader(settings)
    assert loader.load(server.url("/img.png")).width == 40
    assert [r.authorization for r in server.requests] == [None]
    with pytest.raises(ImageError, match="loopback"):
        ImageLoader(FetchSettings(**{**settings.__dict__, "allow_private_urls": False})).load(
            server.url("/img.png")
        )
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "host",
    [
        "10.0.0.1",
        "192.168.1.1",
        "172.16.0.1",
        "169.254.169.254",
        "127.0.0.1",
        "::1",
        "[::1]",
        "fe80::1",
        "::ffff:127.0.0.1",
        "::ffff:10.1.2.3",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "100.64.0.1",
        "240.0.0.1",
    ],
)
def test_check_public_host_refuses_non_public(host, monkeypatch):
    def no_dns(*args, **kwargs):
        raise AssertionError("IP literals must not be resolved")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(ImageError, match="ALLOW_PRIVATE_URLS"):
        check_public_host(host, 80)


@pytest.mark.parametrize("host", ["93.184.216.34", "2606:4700:4700::1111", "8.8.8.8"])
def test_check_public_host_accepts_public_literals(host):
    check_public_host(host, 443)


def test_check_public_host_checks_every_resolved_address(monkeypatch):
    def fake(host, port, *args, **kwargs):
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with pytest.raises(ImageError, match="private"):
        check_public_host("images.example.com", 443)


def test_check_public_host_unresolvable(monkeypatch):
    def fail(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(ImageError, match="cannot resolve"):
        check_public_host("no-such-host.invalid", 80)


# ------------------------------------------------------------------------------------------------
# settings and logging


@pytest.mark.parametrize(
    "kw",
    [
        {"connect_timeout": 0},
        {"read_timeout": -1},
        {"total_timeout": 0},
        {"max_download_bytes": 0},
        {"max_image_pixels": 1.5},
        {"decode_budget_pixels": 0},
        {"label_studio_url": "localhost:8080"},
        {"label_studio_url": "ftp://ls"},
    ],
)
def test_settings_validation(kw):
    params = {"label_studio_url": "http://127.0.0.1:8080", "api_key": None, **kw}
    with pytest.raises(ValueError):
        FetchSettings(**params)


def test_a_loader_decodes_within_its_own_budget(server):
    budget = PixelBudget(10_000)
    loader = ImageLoader(FetchSettings(label_studio_url=server.base, api_key=LEGACY, **FAST), budget=budget)
    assert loader.load("/data/upload/1/img.png").width == 40
    assert budget.peak == 40 * 30 and budget.in_use == 0
    sized = FetchSettings(label_studio_url=None, api_key=None, decode_budget_pixels=1234)
    assert ImageLoader(sized).budget.capacity == 1234, "by default a budget of decode_budget_pixels"


def test_failures_are_logged_without_tokens(server, loader_for, caplog):
    caplog.set_level(logging.DEBUG)
    for key, url in [
        (LEGACY, "/data/upload/1/missing.png"),
        (PAT, "/data/upload/1/missing.png"),
        (LEGACY, server.url("/page.html", "localhost")),
        (EXPIRED_PAT, "/data/upload/1/img.png"),
    ]:
        with pytest.raises(ImageError) as err:
            loader_for(api_key=key).load(url)
        assert all(secret not in err.value.reason for secret in SECRETS)
    assert "image load failed" in caplog.text
    assert all(secret not in caplog.text for secret in SECRETS)
    assert all(access not in caplog.text for access in server.issued_access)
