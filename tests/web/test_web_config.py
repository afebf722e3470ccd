"""The ``[web]`` settings: defaults, and the configuration errors `vna serve` exits 2 on."""

from __future__ import annotations

import pytest

from vna.config import is_loopback, load_config
from vna.errors import ConfigError

TOKEN = '[[grpc.token]]\nname = "r"\ntoken = "read-token-0123456789"\nrole = "read"\n'


def _load(tmp_path, body: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "c.toml"
    path.write_text(body)
    return load_config(path)


def test_defaults(tmp_path) -> None:  # type: ignore[no-untyped-def]
    web = _load(tmp_path, "").web
    assert (web.host, web.port, web.tls_cert, web.tls_key) == ("127.0.0.1", 8080, "", "")
    assert load_config(env={"VNA_WEB_PORT": "0"}).web.port == 0


@pytest.mark.parametrize("body, needle", [
    ('[web]\nhost = "0.0.0.0"\n', "needs bearer tokens"),
    ('[web]\nhost = "10.1.2.3"\n', "needs bearer tokens"),
    ("[web]\nport = 70000\n", "web.port"),
    ('[web]\ntls_cert = "a.crt"\n', "set together"),
    ("[web]\nmax_body_bytes = 10\n", "max_body_bytes"),
])
def test_config_errors(tmp_path, body: str, needle: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=needle):
        _load(tmp_path, body)


def test_non_loopback_with_tokens_or_off_is_accepted(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert _load(tmp_path, TOKEN + '[web]\nhost = "0.0.0.0"\n').web.host == "0.0.0.0"
    assert _load(tmp_path, '[web]\nhost = "0.0.0.0"\nport = 0\n').web.port == 0
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.2.1", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.org"))
