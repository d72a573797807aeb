"""Class-balanced source sampling (FADA's rule) against a brute-force re-implementation, and its cache."""
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from sdca.data.sampling import class_balanced_order, class_sets

K = 6


def fabricated_sets():
    """30 files: classes 0-2 everywhere, class 3 in a third of the files, 4 in two, 5 in one (the rare ones)."""
    sets = []
    for i in range(30):
        s = {0, 1, 2} if i % 2 else {0, 1}
        if i % 3 == 0:
            s.add(3)
        if i in (7, 21):
            s.add(4)
        if i == 13:
            s.add(5)
        sets.append(s)
    return sets


def brute_force(sets, k, iters, seed):
    """The rule written out plainly: sub-epochs of 3000 picks; class c with weight 1 / ln(1.01 + dist_c) over
    the classes some file has; the next file of c's list (lists in file order, reshuffled when they wrap)."""
    rng = np.random.default_rng(seed)
    lists = {c: [i for i in range(len(sets)) if c in sets[i]] for c in range(k)}
    nxt = {c: 0 for c in range(k)}
    picks = []
    for _ in range(iters // 3000 + 1):
        seen = [0.0] * k
        for _ in range(3000):
            total = sum(seen)
            w = [0.0 if not lists[c] else 1.0 / math.log(1.01 + (seen[c] / total if total else 0.0))
                 for c in range(k)]
            c = int(rng.choice(k, p=np.array(w) / sum(w)))
            if nxt[c] == len(lists[c]):
                rng.shuffle(lists[c])
                nxt[c] = 0
            f = lists[c][nxt[c]]
            nxt[c] += 1
            picks.append(f)
            for cls in sets[f]:
                seen[cls] += 1
    return picks


def test_same_draws_as_the_brute_force_rule_and_rare_classes_oversampled():
    sets = fabricated_sets()
    order = class_balanced_order(sets, K, iters=4000, seed=11)
    assert order == brute_force(sets, K, 4000, 11)
    assert len(order) == 2 * 3000
    share = lambda c: np.mean([c in sets[i] for i in order])  # noqa: E731
    uniform = lambda c: np.mean([c in s for s in sets])  # noqa: E731
    for rare in (4, 5):
        assert share(rare) > 3 * uniform(rare)  # 1 or 2 files in 30 hold them; far more of the picks do
    assert share(0) <= uniform(0)
    assert class_balanced_order(sets, K, iters=4000, seed=12) != order


def test_classes_no_file_holds_are_never_drawn():
    order = class_balanced_order([{0}, {0, 1}], 4, iters=10, seed=0)
    assert set(order) == {0, 1}
    with pytest.raises(ValueError, match="no label file"):
        class_balanced_order([set(), set()], 3, iters=10, seed=0)


def test_class_sets_are_read_once_and_cached_by_file_list(tmp_path, monkeypatch):
    from sdca.data import GTA5

    root = tmp_path / "gta5"
    for i, ids in enumerate(([7, 26], [7, 7], [23, 8])):  # labelIds: road + car, road, sky + sidewalk
        os.makedirs(root / "images", exist_ok=True)
        os.makedirs(root / "labels", exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "images" / f"{i:05d}.png")
        Image.fromarray(np.array([ids * 2] * 4, np.uint8)).save(root / "labels" / f"{i:05d}.png")
    ds = GTA5(str(root))
    sets = class_sets(ds, 19, cache_dir=str(tmp_path / "run"))
    assert sets == [{0, 13}, {0}, {10, 1}]
    cached = list((root / "labels").glob("class_sets-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["classes"] == [[0, 13], [0], [1, 10]]
    calls = []
    monkeypatch.setattr(ds, "decode_label", lambda p: calls.append(p))
    assert class_sets(ds, 19, cache_dir=str(tmp_path / "run")) == sets and not calls  # from the cache
    ds.items = ds.items[:2]  # another file list: another fingerprint, read again
    monkeypatch.undo()
    assert class_sets(ds, 19, cache_dir=str(tmp_path / "run")) == sets[:2]
    assert len(list((root / "labels").glob("class_sets-*.json"))) == 2
