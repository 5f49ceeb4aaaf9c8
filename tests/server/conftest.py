import pytest

from tests.server.live import live_server


@pytest.fixture(scope="module")
def server(smollm2):
    """One real server on the embedded SmolLM2 for a test module (default admission settings)."""
    with live_server(smollm2) as live:
        yield live
