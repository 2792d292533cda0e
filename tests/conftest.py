import pytest

from fastkd.data.demo import build_demo_dataset


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The demo digits as JPEGs, written once per test session."""
    return build_demo_dataset(str(tmp_path_factory.mktemp("digits")))
