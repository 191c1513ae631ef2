"""SSRF and credential-leak hardening of backend.images.fetch (issue 10), through ImageLoader.load.

Real loopback servers (tests/imageserver.py): ``ls`` plays Label Studio on 127.0.0.1, ``attacker``
is "another host" on 127.0.0.2. Every refusal asserts an ImageError with a reason *and* that no
request reached either server; every leak check asserts the attacker never saw an Authorization
header. Host names that do not exist (``*.test``) are answered by an injected resolver that records
each lookup, so tests can prove one lookup per hop and that the connection goes to the address that
was checked. Nothing connects anywhere but 127.0.0.0/8.
"""

from __future__ import annotations

import base64
import io
import logging
import socket
import ssl
import subprocess

import pytest
from PIL import Image

from backend.images.fetch import FetchSettings, ImageError, ImageLoader
from tests.imageserver import ImageServer

LEGACY = "0123456789abcdef0123456789abcdef01234567"
FAST = {"connect_timeout": 2.0, "read_timeout": 2.0}


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


@pytest.fixture(scope="module")
def ls():
    srv = ImageServer(legacy_token=LEGACY, pat="unused").start()
    srv.ls_static("/data/upload/1/img.png", PNG)
    srv.static("/img.png", PNG)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def attacker():
    srv = ImageServer(legacy_token="x", pat="unused", host="127.0.0.2").start()
    srv.static("/x.png", PNG)
    srv.static("/data/upload/1/img.png", PNG)
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _reset(ls, attacker):
    ls.reset()
    attacker.reset()


@pytest.fixture
def loader_for(ls):
    loaders: list[ImageLoader] = []

    def make(resolver=None, **kw) -> ImageLoader:
        params = {"label_studio_url": ls.base, "api_key": LEGACY, **FAST, **kw}
        loader = ImageLoader(FetchSettings(**params), resolver=resolver)
        loaders.append(loader)
        return loader

    yield make
    for loader in loaders:
        loader.close()


class Resolver:
    """A getaddrinfo stand-in: ``answers[name]`` is a list of answers, one per lookup (the last one
    repeats); each answer is a list of IP strings. Records every lookup as ``(name, port)``."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host, port, *args, **kwargs):
        self.calls.append((host, port))
        seq = self.answers.get(host)
        if not seq:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        answer = seq[min(len(self.calls_for(host)) - 1, len(seq) - 1)]
        family = {True: socket.AF_INET6, False: socket.AF_INET}
        return [(family[":" in ip], socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answer]

    def calls_for(self, host: str) -> list[tuple[str, int]]:
        return [c for c in self.calls if c[0] == host]


def _assert_untouched(*servers: ImageServer) -> None:
    for srv in servers:
        assert srv.requests == [], f"{srv.base} was contacted"


# ------------------------------------------------------------------------------------------------
# 1. parser differentials: user info, backslashes, odd characters


def _differential_urls(ls: ImageServer, attacker: ImageServer) -> list[str]:
    a, lsp = f"127.0.0.2:{attacker.port}", f"127.0.0.1:{ls.port}"
    return [
        f"http://{a}\\@{lsp}/data/upload/1/img.png",  # urlsplit: LS host; urllib3: attacker
        f"http://{lsp}\\@{a}/x.png",  # urlsplit: attacker (walks past a host check on LS)
        f"http://{a}@{lsp}/data/upload/1/img.png",
        f"http://user:pass@{lsp}/data/upload/1/img.png",
        f"http://x@{a}@{lsp}/data/upload/1/img.png",
        f"http://{a}%5C@{lsp}/data/upload/1/img.png",
        f"http://{a}\\.example/x.png",
        f"http://127.0.0.2 .example:{attacker.port}/x.png",
        f"http://{a}\t@{lsp}/data/upload/1/img.png",
        f"http://{a}\n@{lsp}/data/upload/1/img.png",
        f"http://127.0.0.1%2e:{ls.port}/data/upload/1/img.png",
    ]


@pytest.mark.parametrize("allow_private", [False, True])
def test_parser_differential_urls_refused(ls, attacker, loader_for, allow_private):
    loader = loader_for(allow_private_urls=allow_private)
    for url in _differential_urls(ls, attacker):
        with pytest.raises(ImageError) as err:
            loader.load(url)
        reason = err.value.reason
        assert reason and "\n" not in reason and "\t" not in reason, url
        assert LEGACY not in reason
    _assert_untouched(ls, attacker)


def test_userinfo_refusal_says_why(ls, loader_for):
    with pytest.raises(ImageError, match="user info"):
        loader_for().load(f"http://127.0.0.2:1\\@127.0.0.1:{ls.port}/data/upload/1/img.png")
    _assert_untouched(ls)


@pytest.mark.parametrize("allow_private", [False, True])
def test_redirect_location_differential_refused(ls, attacker, loader_for, allow_private):
    evil = f"http://127.0.0.2:{attacker.port}\\@127.0.0.1:{ls.port}/data/upload/1/img.png"
    ls.route("GET", "/data/upload/1/evil", lambda h, q: h.redirect(evil))
    with pytest.raises(ImageError, match="user info"):
        loader_for(allow_private_urls=allow_private).load("/data/upload/1/evil")
    assert ls.paths() == ["/data/upload/1/evil"]
    _assert_untouched(attacker)


def test_label_studio_url_with_user_info_refused(ls):
    with pytest.raises(ValueError, match="LABEL_STUDIO_URL"):
        FetchSettings(label_studio_url=f"http://u:p@127.0.0.1:{ls.port}", api_key=LEGACY)


# ------------------------------------------------------------------------------------------------
# 3. credentials only to the LS origin


def test_token_not_sent_after_redirect_back_to_ls(ls, attacker, loader_for):
    back = f"{ls.base}/data/upload/1/img.png"
    ls.route("GET", "/data/upload/1/bounce", lambda h, q: h.redirect(attacker.url("/back")))
    attacker.route("GET", "/back", lambda h, q: h.redirect(back))
    with pytest.raises(ImageError) as err:
        loader_for(allow_private_urls=True).load("/data/upload/1/bounce")
    assert "401" in err.value.reason and "LABEL_STUDIO_URL" in err.value.reason
    first, second = ls.requests
    assert first.authorization == f"Token {LEGACY}"
    assert second.path == "/data/upload/1/img.png" and second.authorization is None
    [hop] = attacker.requests
    assert hop.authorization is None


def test_same_host_other_port_gets_no_token(ls, attacker, loader_for):
    """127.0.0.2 serves the LS path, but only the exact LS origin (scheme, host, port) is LS."""
    loaded = loader_for(allow_private_urls=True).load(attacker.url("/data/upload/1/img.png"))
    assert loaded.width == 8
    [req] = attacker.requests
    assert req.authorization is None


@pytest.mark.parametrize(
    "host",
    [
        "2130706433",
        "0177.0.0.1",
        "127.1",
        "0x7f.1",
        "0x7f000001",
        "0",
        "127.0.0.1.",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[::1]",
        "localhost",
        "localhost.",
        "LocalHost",
        "a.localhost",
        "[fec0::1]",
        "[fe80::1]",
        "127.0.0.2",
        "0.0.0.0",
    ],
)
def test_numeric_and_odd_private_forms_refused(ls, attacker, loader_for, host):
    with pytest.raises(ImageError) as err:
        loader_for().load(f"http://{host}:{ls.port}/img.png")
    reason = err.value.reason
    assert any(
        word in reason
        for word in ("loopback", "non-standard form", "site-local", "link-local", "unspecified")
    ), reason
    assert "ALLOW_PRIVATE_URLS" in reason or "four decimal numbers" in reason
    _assert_untouched(ls, attacker)


@pytest.mark.parametrize("host", ["2130706433", "0177.0.0.1", "127.1", "0x7f.1", "0"])
def test_non_standard_ipv4_forms_refused_even_when_private_allowed(ls, loader_for, host):
    """Parsers disagree on these (inet_aton vs ipaddress): refused outright, never interpreted."""
    with pytest.raises(ImageError, match="four decimal numbers"):
        loader_for(allow_private_urls=True).load(f"http://{host}:{ls.port}/img.png")
    _assert_untouched(ls)


def test_fec0_site_local_refused_although_python_calls_it_global(loader_for, ls):
    import ipaddress

    assert ipaddress.ip_address("fec0::1").is_global  # why the explicit is_site_local check exists
    resolver = Resolver({"site.test": [["fec0::5"]]})
    with pytest.raises(ImageError, match="site-local"):
        loader_for(resolver).load(f"http://site.test:{ls.port}/img.png")
    assert resolver.calls == [("site.test", ls.port)]


# ------------------------------------------------------------------------------------------------
# 2. one lookup per hop; the connection goes to the checked address


def test_connection_goes_to_the_address_resolved_once(ls, loader_for):
    # a rebinding name: 127.0.0.1 (where the server is) first, 127.0.0.2 (nothing there) after
    resolver = Resolver({"rebind.test": [["127.0.0.1"], ["127.0.0.2"]]})
    loaded = loader_for(resolver, allow_private_urls=True).load(
        f"http://rebind.test:{ls.port}/img.png"
    )
    assert loaded.width == 8
    assert resolver.calls == [("rebind.test", ls.port)]
    [req] = ls.requests
    assert req.headers["Host"] == f"rebind.test:{ls.port}"


def test_no_second_lookup_after_the_check(ls, loader_for):
    # first answer 127.0.0.2 (nothing listens on that port there), then 127.0.0.1 (the server):
    # a client that looked the name up again would reach the server.
    resolver = Resolver({"rebind.test": [["127.0.0.2"], ["127.0.0.1"]]})
    with pytest.raises(ImageError, match="could not download"):
        loader_for(resolver, allow_private_urls=True).load(f"http://rebind.test:{ls.port}/img.png")
    assert resolver.calls == [("rebind.test", ls.port)]
    _assert_untouched(ls)


def test_guard_checks_the_only_lookup(ls, loader_for):
    # private on the first (checked) answer: refused, and never asked again
    resolver = Resolver({"rebind.test": [["127.0.0.1"], ["93.184.216.34"]]})
    with pytest.raises(ImageError, match="loopback"):
        loader_for(resolver).load(f"http://rebind.test:{ls.port}/img.png")
    assert resolver.calls == [("rebind.test", ls.port)]
    _assert_untouched(ls)


def test_checked_addresses_tried_in_order(ls, loader_for):
    resolver = Resolver({"multi.test": [["127.0.0.2", "127.0.0.1"]]})
    loaded = loader_for(resolver, allow_private_urls=True).load(
        f"http://multi.test:{ls.port}/img.png"
    )
    assert loaded.width == 8
    assert resolver.calls == [("multi.test", ls.port)]
    assert len(ls.requests) == 1


def test_one_lookup_per_redirect_hop(ls, loader_for):
    ls.route("GET", "/hop", lambda h, q: h.redirect(f"http://second.test:{ls.port}/img.png"))
    resolver = Resolver({"first.test": [["127.0.0.1"]], "second.test": [["127.0.0.1"]]})
    loaded = loader_for(resolver, allow_private_urls=True).load(f"http://first.test:{ls.port}/hop")
    assert loaded.width == 8
    assert resolver.calls == [("first.test", ls.port), ("second.test", ls.port)]
    assert [r.headers["Host"] for r in ls.requests] == [
        f"first.test:{ls.port}",
        f"second.test:{ls.port}",
    ]


def test_redirect_hop_is_guarded(ls, loader_for):
    ls.route("GET", "/hop-private", lambda h, q: h.redirect(f"http://inner.test:{ls.port}/img.png"))
    resolver = Resolver({"inner.test": [["10.0.0.8"]]})
    with pytest.raises(ImageError, match="private"):
        loader_for(resolver).load("/hop-private")
    assert ls.paths() == ["/hop-private"]
    assert resolver.calls == [("inner.test", ls.port)]


def test_idna_name_encoded_once_with_uts46(ls, loader_for):
    # IDNA 2003 maps "ß" to "ss" (fass.test), UTS-46 / IDNA 2008 keeps it (xn--fa-hia.test)
    resolver = Resolver({"xn--fa-hia.test": [["127.0.0.1"]]})
    loaded = loader_for(resolver, allow_private_urls=True).load(
        f"http://FAß.test:{ls.port}/img.png"
    )
    assert loaded.width == 8
    assert resolver.calls == [("xn--fa-hia.test", ls.port)]
    assert ls.requests[0].headers["Host"] == f"xn--fa-hia.test:{ls.port}"


def test_env_proxies_are_not_used(ls, attacker, loader_for, monkeypatch):
    proxy = f"http://127.0.0.2:{attacker.port}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    loader = loader_for(allow_private_urls=True)
    assert loader.load("/data/upload/1/img.png").width == 8
    assert loader.load(ls.url("/img.png", "localhost")).width == 8
    assert [r.authorization for r in ls.requests] == [f"Token {LEGACY}", None]
    _assert_untouched(attacker)


# ------------------------------------------------------------------------------------------------
# TLS: connect to the checked address, verify the certificate and send SNI for the name


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=images.test",
         "-addext", "subjectAltName=DNS:images.test"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = ImageServer(legacy_token=LEGACY, pat="unused", ssl_context=ctx).start()
    srv.static("/img.png", PNG)
    yield srv, str(cert)
    srv.stop()


def test_tls_verifies_the_name_on_the_pinned_address(tls_server, loader_for):
    srv, cert = tls_server
    srv.reset()
    resolver = Resolver({"images.test": [["127.0.0.1"]], "other.test": [["127.0.0.1"]]})
    loader = loader_for(resolver, allow_private_urls=True, ca_bundle=cert)
    assert loader.load(f"https://images.test:{srv.port}/img.png").width == 8
    assert srv.sni == ["images.test"]
    assert [r.headers["Host"] for r in srv.requests] == [f"images.test:{srv.port}"]
    with pytest.raises(ImageError, match="TLS verification failed"):
        loader.load(f"https://other.test:{srv.port}/img.png")  # same address, wrong name
    assert len(srv.requests) == 1
    assert resolver.calls == [("images.test", srv.port), ("other.test", srv.port)]


# ------------------------------------------------------------------------------------------------
# 4. reasons and log lines stay on one line


def test_reasons_and_logs_escape_control_characters(ls, loader_for, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    loader = loader_for()
    cases = [
        f"http://127.0.0.1:{ls.port}/a\nb.png",
        f"http://127.0.0.1:{ls.port}/a\u2028b.png",
        "/data/local-files/?d=a%0D%0AINFO%20forged.png",  # LS answers 404, the reason shows d
        "/data/local-files/?d=a%0Ab%00.png",
        "/data/local-files/?d=../x%0A.png",
    ]
    for url in cases:
        with pytest.raises(ImageError) as err:
            loader.load(url)
        reason = err.value.reason
        assert not any(c in reason for c in "\r\n\x00\u2028"), reason
    with pytest.raises(ImageError) as err:
        loader_for(local_files_root=str(tmp_path)).load("/data/local-files/?d=a%0Ab.png")
    assert "\n" not in err.value.reason and "\\n" in err.value.reason
    messages = [r.getMessage() for r in caplog.records]
    assert messages and all("\n" not in m and "\r" not in m for m in messages)


def test_settings_error_is_single_line():
    with pytest.raises(ValueError) as err:
        FetchSettings(label_studio_url="http://ls\r\nX-Forged: 1", api_key=None)
    assert "\n" not in str(err.value) and "\r" not in str(err.value)


def test_refusal_reasons_hide_user_info_and_query(loader_for):
    for url in (
        "http://user:s3cret@127.0.0.1:99999/x.png?X-Amz-Signature=s3cret",
        "http://user:s3cret@127.0.0.1:1/x.png?X-Amz-Signature=s3cret",
    ):
        with pytest.raises(ImageError) as err:
            loader_for().load(url)
        assert "s3cret" not in err.value.reason


# ------------------------------------------------------------------------------------------------
# 6. cloud storage through LS's presign endpoint: the storage host may be private, only there
#
# "ls" (127.0.0.1) answers /tasks/<id>/presign/ like LS 1.23 with pre-signed URLs on: a 303 to the
# storage. "attacker" (127.0.0.2) plays the storage (MinIO next to LS), "third" (127.0.0.3) a
# further private host. ALLOW_PRIVATE_URLS stays false throughout.

CLOUD_URI = "s3://bucket/dir/img.png"
SIGNATURE = "X-Amz-Signature=deadbeef"


@pytest.fixture(scope="module")
def third():
    srv = ImageServer(legacy_token="x", pat="unused", host="127.0.0.3").start()
    srv.static("/x.png", PNG)
    yield srv
    srv.stop()


def _presign_route(ls: ImageServer, task_id: int, location: str, *, cookie: bool = False) -> None:
    """LS's presign answer: 401 without LS credentials, 404 for a fileuri it has no storage for,
    else a 303 to ``location`` (with a session cookie when ``cookie``)."""

    def answer(handler, query):
        if not ls.authorized(handler):
            handler.send_json(401, {"detail": "Authentication credentials were not provided."})
            return
        [fileuri] = query.get("fileuri", [""])
        if base64.urlsafe_b64decode(fileuri.encode()).decode() != CLOUD_URI:
            handler.send_json(404, {})
            return
        headers = {"Location": location}
        if cookie:
            headers["Set-Cookie"] = "sessionid=ls-session; Path=/"
        handler.send_bytes(303, b"", "text/plain", headers=headers)

    ls.route("GET", f"/tasks/{task_id}/presign/", answer)


def test_presign_redirect_reaches_a_private_storage_host_without_the_token(ls, attacker, loader_for):
    attacker.static("/bucket/dir/img.png", PNG)
    _presign_route(ls, 7, attacker.url(f"/bucket/dir/img.png?{SIGNATURE}"), cookie=True)
    loaded = loader_for().load(CLOUD_URI, task_id=7)
    assert (loaded.width, loaded.height) == (8, 6)
    [asked] = ls.requests
    expected = base64.urlsafe_b64encode(CLOUD_URI.encode()).decode()
    assert asked.path == f"/tasks/7/presign/?fileuri={expected}"
    assert asked.authorization == f"Token {LEGACY}"
    [fetched] = attacker.requests
    assert fetched.path == f"/bucket/dir/img.png?{SIGNATURE}"
    assert fetched.authorization is None
    assert not any(key.lower() == "cookie" for key in fetched.headers)
    assert LEGACY not in str(fetched.headers)


def test_presign_proxy_mode_bytes_come_from_ls(ls, attacker, loader_for):
    """Pre-signed URLs off: LS streams the object itself (200), nothing else is contacted."""

    def proxy(handler, query):
        if ls.authorized(handler):
            handler.send_bytes(200, PNG, "image/png")
        else:
            handler.send_json(401, {})

    ls.route("GET", "/tasks/8/presign/", proxy)
    assert loader_for().load("gs://bucket/dir/img.png", task_id=8).width == 8
    [asked] = ls.requests
    assert asked.authorization == f"Token {LEGACY}"
    _assert_untouched(attacker)


def test_non_presign_ls_redirect_to_a_private_host_still_refused(ls, attacker, loader_for):
    attacker.static("/bucket/dir/img.png", PNG)
    storage = attacker.url(f"/bucket/dir/img.png?{SIGNATURE}")
    paths = ("/data/upload/1/to-storage", "/api/tasks/7/presign/", "/tasks/7/presign/x", "/tasks/x/presign/")
    for path in paths:
        ls.route("GET", path, lambda h, q: h.redirect(storage, 303))
    for path in paths:
        with pytest.raises(ImageError, match="loopback address"):
            loader_for().load(path)
    _assert_untouched(attacker)


def test_presign_redirect_that_redirects_again_to_a_third_private_host_refused(
    ls, attacker, third, loader_for
):
    attacker.route("GET", "/bucket/dir/img.png", lambda h, q: h.redirect(third.url("/x.png")))
    _presign_route(ls, 9, attacker.url(f"/bucket/dir/img.png?{SIGNATURE}"))
    with pytest.raises(ImageError) as err:
        loader_for().load(CLOUD_URI, task_id=9)
    assert "loopback address" in err.value.reason and CLOUD_URI in err.value.reason
    assert len(attacker.requests) == 1
    _assert_untouched(third)


def test_presign_answer_after_the_chain_left_ls_is_not_trusted(ls, attacker, third, loader_for):
    """A storage hop that bounces back to an LS presign path: that request went without LS
    credentials, so LS's redirect is guarded like any other (even if LS answered it)."""
    ls.route("GET", "/tasks/10/presign/", lambda h, q: h.redirect(third.url("/x.png"), 303))
    attacker.route("GET", "/bucket/dir/img.png", lambda h, q: h.redirect(ls.url("/tasks/10/presign/")))
    _presign_route(ls, 11, attacker.url("/bucket/dir/img.png"))
    with pytest.raises(ImageError, match="loopback address"):
        loader_for().load(CLOUD_URI, task_id=11)
    assert [r.authorization is None for r in ls.requests] == [False, True]
    _assert_untouched(third)


def test_presign_requests_only_under_label_studio_url_path(ls, attacker):
    """With LABEL_STUDIO_URL=http://ls/prefix, only /prefix/tasks/<id>/presign/ is LS's presign."""
    attacker.static("/bucket/dir/img.png", PNG)
    storage = attacker.url(f"/bucket/dir/img.png?{SIGNATURE}")
    ls.route("GET", "/prefix/tasks/7/presign/", lambda h, q: h.redirect(storage, 303))
    ls.route("GET", "/tasks/7/presign/", lambda h, q: h.redirect(storage, 303))
    loader = ImageLoader(FetchSettings(label_studio_url=ls.base + "/prefix/", api_key=LEGACY, **FAST))
    try:
        assert loader.load(CLOUD_URI, task_id=7).width == 8
        assert ls.paths()[0].startswith("/prefix/tasks/7/presign/?fileuri=")
        with pytest.raises(ImageError, match="loopback address"):
            loader.load(ls.url("/tasks/7/presign/"))
    finally:
        loader.close()
    assert len(attacker.requests) == 1


def test_presign_failures_name_the_cloud_uri_and_hide_the_signature(ls, attacker, loader_for):
    _presign_route(ls, 12, attacker.url(f"/bucket/expired.png?{SIGNATURE}"))
    attacker.route("GET", "/bucket/expired.png", lambda h, q: h.send_json(403, {}))
    with pytest.raises(ImageError) as err:
        loader_for().load(CLOUD_URI, task_id=12)
    reason = err.value.reason
    assert CLOUD_URI in reason and "pre-signed URL" in reason and "403" in reason
    assert "deadbeef" not in reason and LEGACY not in reason
    with pytest.raises(ImageError, match="no import storage"):
        loader_for().load("s3://other-bucket/img.png", task_id=12)
