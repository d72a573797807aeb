"""The mean teacher's parts against explicit references: the EMA formula, DACS's pseudo-weight as a per-pixel
count, ClassMix's composition as a per-pixel brute force, the weighted cross-entropy as a per-pixel sum, the
75 % majority label of a feature pixel as a per-block count."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from sdca.method.mean_teacher import ema_alpha, ema_update, pseudo_labels_and_weight, weighted_cross_entropy
from sdca.method.mixing import blur_kernel_size, class_mix_masks, mix, mixed_targets, strong_augment
from sdca.method.pixels import majority_downsample_labels


def test_ema_alpha_follows_the_formula():
    for t in range(1, 3000, 37):
        assert ema_alpha(t, 0.999) == pytest.approx(min(1 - 1 / (t + 1), 0.999))
    assert ema_alpha(1, 0.999) == 0.5
    with pytest.raises(ValueError, match="step"):
        ema_alpha(0, 0.99)
    with pytest.raises(ValueError, match="alpha"):
        ema_alpha(3, 1.0)


def test_ema_update_matches_the_explicit_formula_in_float64_and_leaves_buffers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    teacher.load_state_dict(student.state_dict())
    expected = {k: v.detach().double().clone() for k, v in teacher.named_parameters()}
    buffers = {k: v.clone() for k, v in teacher.named_buffers()}
    with torch.no_grad():
        student[1].running_mean += 3.0  # a student buffer that must not reach the teacher
    for t in range(1, 6):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        a = ema_alpha(t, 0.9)
        ema_update(teacher, student, a)
        for name, p in student.named_parameters():
            expected[name] = a * expected[name] + (1 - a) * p.detach().double()
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p.double(), expected[name], rtol=1e-6, atol=1e-6)
    for name, b in teacher.named_buffers():
        assert torch.equal(b, buffers[name]), name


def test_ema_update_rejects_a_different_network():
    with pytest.raises(ValueError, match="same parameters"):
        ema_update(nn.Linear(3, 2), nn.Linear(3, 4), 0.5)


def test_teacher_untouched_by_the_optimizer():
    from sdca.engine.mean_teacher import make_teacher

    torch.manual_seed(1)
    student = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout(0.5), nn.BatchNorm2d(4))
    teacher = make_teacher(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss = student(torch.randn(2, 3, 5, 5)).square().mean() + teacher(torch.randn(2, 3, 5, 5)).sum() * 0
    loss.backward()
    optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        if "running" in k or "num_batches" in k:
            continue  # the teacher forward above ran in train mode; the stage runs it with running stats kept
        assert torch.equal(v, before[k]), k
    assert not any(p is q for p in teacher.parameters() for q in student.parameters())
    assert teacher.training and not teacher[1].training  # batch statistics on, dropout off


def test_pseudo_weight_is_the_batch_share_of_confident_pixels_with_rows_ignored():
    torch.manual_seed(2)
    logits = torch.randn(3, 5, 7, 6) * 3
    labels, weight, confidence = pseudo_labels_and_weight(logits, 0.7, ignore_top=2, ignore_bottom=1)
    prob = torch.softmax(logits.double(), 1).numpy()
    count, total = 0, 0
    for b in range(3):
        for y in range(7):
            for x in range(6):
                p = prob[b, :, y, x]
                assert labels[b, y, x] == int(np.argmax(p))
                assert confidence[b, y, x] == pytest.approx(p.max(), abs=1e-6)
                count += p.max() >= 0.7
                total += 1
    share = count / total
    for b in range(3):
        for y in range(7):
            want = 0.0 if y < 2 or y >= 6 else share
            assert torch.allclose(weight[b, y], torch.full((6,), want, dtype=torch.float32))


def test_class_mix_composition_against_a_brute_force():
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 6, (3, 9, 8))
    labels[0, :2] = 255
    labels[2] = 4  # one class present: it is chosen (half of one, rounded up)
    masks = class_mix_masks(labels, g)
    for b in range(3):
        present = sorted(set(labels[b].flatten().tolist()) - {255})
        chosen = sorted(set(labels[b][masks[b]].tolist()))
        assert len(chosen) == math.ceil(len(present) / 2)
        assert set(chosen) <= set(present)
        for y in range(9):
            for x in range(8):
                assert bool(masks[b, y, x]) == (int(labels[b, y, x]) in chosen)
    src, tgt = torch.rand(3, 3, 9, 8), torch.rand(3, 3, 9, 8)
    pseudo, pw = torch.randint(0, 6, (3, 9, 8)), torch.rand(3, 9, 8)
    image = mix(masks, src, tgt)
    label, weight = mixed_targets(masks, labels, pseudo, pw)
    for b in range(3):
        for y in range(9):
            for x in range(8):
                m = bool(masks[b, y, x])
                assert torch.equal(image[b, :, y, x], (src if m else tgt)[b, :, y, x])
                assert label[b, y, x] == (labels if m else pseudo)[b, y, x]
                assert weight[b, y, x] == (1.0 if m else pw[b, y, x])
    again = class_mix_masks(labels, torch.Generator().manual_seed(5))
    assert torch.equal(again, masks)  # the caller's generator decides every draw
    with pytest.raises(ValueError, match="one shape"):
        mix(masks, src, torch.rand(3, 3, 9, 7))


def test_weighted_cross_entropy_against_a_per_pixel_sum():
    torch.manual_seed(3)
    logits = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 3, 5))
    labels[0, 0, 0] = 255
    weight = torch.rand(2, 3, 5)
    got = weighted_cross_entropy(logits, labels, weight)
    total = 0.0
    for b in range(2):
        for y in range(3):
            for x in range(5):
                if labels[b, y, x] == 255:
                    continue
                lp = torch.log_softmax(logits[b, :, y, x], 0)
                total += -float(lp[labels[b, y, x]]) * float(weight[b, y, x])
    assert float(got) == pytest.approx(total / 30, rel=1e-5)


def test_majority_downsample_against_block_counts():
    torch.manual_seed(4)
    labels = torch.randint(0, 3, (2, 8, 12))
    labels[0, :4, :4] = 1  # a pure block
    labels[1, 4:, 8:] = 255  # an ignored block
    labels[1, :4, :3] = 2
    labels[1, :4, 3] = 0  # 12 of 16: exactly 75 %
    out = majority_downsample_labels(labels, (2, 3), num_classes=3)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                block = labels[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4].flatten().tolist()
                counts = [block.count(c) for c in range(3)]
                best = int(np.argmax(counts))
                want = best if counts[best] >= 0.75 * 16 else 255
                assert int(out[b, i, j]) == want, (b, i, j)
    assert out[0, 0, 0] == 1 and out[1, 1, 2] == 255 and out[1, 0, 0] == 2


def test_strong_augment_is_seeded_bounded_and_changes_images():
    x = torch.rand(4, 3, 20, 30)
    a = strong_augment(x, torch.Generator().manual_seed(9))
    b = strong_augment(x, torch.Generator().manual_seed(9))
    assert torch.equal(a, b) and a.shape == x.shape
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x)
    assert torch.equal(strong_augment(x, torch.Generator().manual_seed(9), jitter_strength=0.0, blur=False), x)
    # DACS: floor(ceil(0.1 L) - 0.5 + ceil(0.1 L) % 2)
    for length in (10, 30, 45, 128, 256, 512, 640):
        k = math.ceil(0.1 * length)
        assert blur_kernel_size(length) == int(math.floor(k - 0.5 + k % 2))
