"""The daemon's admin API with an Authorization header no client library would send: any bytes there are
a refused token (401), never a 500, and the right token still works afterwards."""
from __future__ import annotations

import socket

import pytest

from ..daemon.two_sites import Site, make_pki


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("admin")
    pki = make_pki(folder)
    a = Site(folder / "a", pki, "site-a")
    b = Site(folder / "b", pki, "site-b")
    b.write_config(a)
    b.start()
    yield b
    b.stop()


def raw_get(port: int, header_value: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: " + header_value
                  + b"\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


@pytest.mark.parametrize("value", [b"Bearer \xff\xfe", b"Bearer caf\xc3\xa9", b"\xe2\x82\xac", b"Bearer \xed\xa0\x80",
                                   b"Bearer \x80" * 50, b"Basic \x01\x02", b""])
def test_non_ascii_authorization_is_refused_not_crashed(site, value):
    assert raw_get(site.admin, value) in (400, 401)


def test_the_right_token_still_works(site):
    token = (site.dir / "state" / "admin.token").read_bytes().strip()
    assert raw_get(site.admin, b"Bearer \xff") == 401
    assert raw_get(site.admin, b"Bearer " + token) == 200


def test_an_unknown_route_with_an_encoded_newline_is_a_one_line_error(site):
    """Found by the admin fuzzer: the 404 echoed the decoded path, so %0a made the error two lines."""
    import json
    token = (site.dir / "state" / "admin.token").read_bytes().strip()
    with socket.create_connection(("127.0.0.1", site.admin), timeout=30) as s:
        s.sendall(b"POST /status/x%0ay HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n"
                  b"Authorization: Bearer " + token + b"\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"404"
    error = json.loads(body)["error"]
    assert "\n" not in error and "%0a" in error
