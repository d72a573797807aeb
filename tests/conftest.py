import pytest
import torch


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def cuda_available() -> bool:
    return torch.cuda.is_available()
