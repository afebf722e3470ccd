"""Run a test module on both DIMSE receivers: ``from tests.integration.receivers import make_server``
overrides the suite's factory with one parametrized over ``dicom.receiver`` ("python", "native").

``NATIVE`` is the config that selects the native receiver; importing ``native_built`` into a module
fails each of its tests when the native extension is not built."""

from __future__ import annotations

from typing import Callable

import pytest

from tests.conftest import VnaServer

Factory = Callable[..., VnaServer]

RECEIVERS = ["python", "native"]
NATIVE = '[dicom]\nreceiver = "native"\n'


def with_receiver(receiver: str, config: str) -> str:
    """``config`` (TOML) with ``dicom.receiver`` set, in its ``[dicom]`` table if it has one."""
    line = f'receiver = "{receiver}"\n'
    if "[dicom]\n" in config:
        return config.replace("[dicom]\n", "[dicom]\n" + line, 1)
    return "[dicom]\n" + line + config


@pytest.fixture(params=RECEIVERS)
def make_server(request: pytest.FixtureRequest, make_server: Factory) -> Factory:
    """The suite's factory, with ``dicom.receiver`` set to the parameter."""
    def factory(config: str = "", **kwargs: object) -> VnaServer:
        return make_server(with_receiver(request.param, config), **kwargs)
    return factory


@pytest.fixture(autouse=True)
def native_built() -> None:
    """Fails the test when the native extension is not built (autouse where it is imported)."""
    try:
        import vna_native  # noqa: F401
    except ImportError:
        pytest.fail("the native extension is not built: run `make install`")
