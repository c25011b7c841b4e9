import pytest

from modelutil import tiny_model


@pytest.fixture
def model():
    """A tiny model with every weight random (seeded), so all paths of the block matter."""
    return tiny_model(seed=1234)
