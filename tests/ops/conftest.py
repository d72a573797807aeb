import pytest

from sdca import ops


@pytest.fixture(autouse=True)
def require_extension():
    """These tests compare the compiled extension with the reference: without the extension they cannot run.

    make test sets SDCA_REQUIRE_EXTENSION=1, so a build that silently failed is a test failure, not a skip.
    """
    import os

    if not ops.has_ops():
        if os.environ.get("SDCA_REQUIRE_EXTENSION") == "1":
            pytest.fail(f"the sdca extension did not load: {ops.extension_error()}")
        pytest.skip(f"the sdca extension is not built ({ops.extension_error()})")


def extension_devices():
    return ops.backends()["devices"]
