"""Assertions shared by the engine tests (imported as a module, not through conftest)."""
import torch


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two checkpoints of one stage hold the same weights and semantic statistics to float round-off: what an
    exact resume must leave (weights 1e-5 relative, statistics 1e-6)."""
    for key, value in a["model"]["state_dict"].items():
        torch.testing.assert_close(b["model"]["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for level in ("features", "outputs"):
        for key in ("count", "mean", "covariance"):
            torch.testing.assert_close(b["statistics"][level][key], a["statistics"][level][key], rtol=1e-6,
                                       atol=1e-8)
