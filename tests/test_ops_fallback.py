"""Without the compiled extension, sdca.ops falls back to the reference with exactly one clear warning."""
import subprocess
import sys

SCRIPT = r"""
import sys, warnings
sys.modules["sdca._C"] = None  # makes `from sdca import _C` raise ImportError, as a missing build would
import torch
from sdca import ops, sdca_loss
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    q = torch.randn(10, 4); y = torch.randint(3, (10,)); m = torch.randn(3, 4); c = torch.rand(3, 4)
    a = sdca_loss(q, y, m, c, 0.5)
    b = sdca_loss(q, y, m, c, 0.5)
msgs = [str(w.message) for w in caught if "compiled extension" in str(w.message)]
assert len(msgs) == 1, msgs
assert "reference" in msgs[0]
assert not ops.has_ops() and ops.backends()["devices"] == ()
assert torch.equal(a, b)
print("ok")
"""


def test_fallback_warns_once():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
