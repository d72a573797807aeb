"""Assertions shared by the engine tests (imported as a module, not through conftest)."""
import torch


def assert_same_training_state(a: dict, b: dict, statistics_tol=(1e-6, 1e-8)) -> None:
    """Two checkpoints of one stage hold the same weights and semantic statistics to float round-off: what an
    exact resume must leave (weights 1e-5 relative, statistics ``statistics_tol`` = (rtol, atol), by default
    1e-6 relative: both runs on one machine)."""
    for key, value in a["model"]["state_dict"].items():
        torch.testing.assert_close(b["model"]["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    rtol, atol = statistics_tol
    for level in ("features", "outputs"):
        for key in ("count", "mean", "covariance"):
            torch.testing.assert_close(b["statistics"][level][key], a["statistics"][level][key], rtol=rtol,
                                       atol=atol)
