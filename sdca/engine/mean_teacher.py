"""One step of the one-stage mean-teacher adaptation (stage ``mean-teacher``): DACS's self-training with class
mixing, as SePiCo runs it, with SDCA's loss optionally on the backbone features or on a training-only projection
head.

Per step: the teacher (an EMA of the student, batch statistics in its batch norms, running statistics untouched)
labels the weak target view; half of each source image's classes are pasted onto a target image (ClassMix); the
student is trained on source cross-entropy (+ Lovász) plus the confidence-weighted cross-entropy of the strongly
augmented mixed image (+ lambda_contrast x SDCA's loss on source features with source labels and target features
with the teacher's pseudo-labels, the statistics estimated online from the teacher's source features); after the
update the teacher moves toward the student.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..method import SemanticDistribution, sdca_loss
from ..method.mean_teacher import ema_alpha, ema_update, pseudo_labels_and_weight, weighted_cross_entropy
from ..method.mixing import class_mix_masks, mix, mixed_targets, strong_augment
from ..method.pixels import majority_downsample_labels
from ..models import upsample_logits
from .batchnorm import running_stats_untouched
from .config import MeanTeacherConfig
from .distributed import DistInfo
from .loop import check_finite
from .steps import IGNORE, StepBase, pixel_rows, statistics_rows


def make_teacher(module: nn.Module) -> nn.Module:
    """A copy that no optimizer trains: gradients off, dropout off (its batch norms stay in train mode and
    normalise with batch statistics, as DAFormer's teacher does)."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.train()
    for m in teacher.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    return teacher


class MeanTeacherStep(StepBase):
    def __init__(self, model, optimizer, source, target, teacher: nn.Module, cfg: MeanTeacherConfig, device, amp,
                 dist_info: DistInfo, *, projection: Optional[nn.Module] = None,
                 teacher_projection: Optional[nn.Module] = None, statistics: Optional[SemanticDistribution] = None,
                 seed: int = 0, diagnostics_period: int = 0):
        trainable = nn.ModuleList([model, projection]) if projection is not None else model
        super().__init__(model, optimizer, device, amp, dist_info, trainable=trainable)
        self.source, self.target, self.teacher, self.cfg = source, target, teacher, cfg
        self.projection, self.teacher_projection, self.statistics = projection, teacher_projection, statistics
        self.num_classes = model.num_classes
        # Mixing and augmentation draws: their own stream, saved with the step, so a resumed run draws the same.
        # Seeded per rank (the seed already is), as every rank mixes its own batch.
        self.generator = torch.Generator().manual_seed(seed)
        self.diagnostics_period = diagnostics_period

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return dict(super().state_dict(), generator=self.generator.get_state())

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"])

    # ------------------------------------------------------------------------------------------ parts
    def _features(self, features: torch.Tensor, teacher: bool = False) -> torch.Tensor:
        """The maps the contrastive term reads: the projection head's (the teacher's own for the teacher) or the
        backbone's."""
        head = self.teacher_projection if teacher else self.projection
        if head is None:
            return features
        if teacher:  # as the teacher network: batch statistics, its running statistics left as they are
            with running_stats_untouched(head):
                return head(features.float())
        return head(features.float())

    def _contrast(self, s_maps, s_lab, t_maps, t_labels) -> torch.Tensor:
        """``s_lab``: the source labels already at the feature size, flat; ``t_labels``: full-size pseudo-labels."""
        c = self.cfg
        t_lab = majority_downsample_labels(t_labels, s_maps.shape[-2:], self.num_classes, c.label_ratio).reshape(-1)
        mean, cov = self.statistics.mean.float(), self.statistics.covariance.float()
        kwargs = dict(tau=c.tau, variant=c.variant, normalize=True, check_labels=False)
        return (sdca_loss(pixel_rows(s_maps), s_lab, mean, cov, **kwargs)
                + sdca_loss(pixel_rows(t_maps), t_lab, mean, cov, **kwargs))

    def diagnostics(self, terms: Dict[str, torch.Tensor], features: List[torch.Tensor], pseudo: torch.Tensor,
                    confidence: torch.Tensor, truth: Optional[torch.Tensor]) -> Dict[str, float]:
        """``gradnorm_<term>`` / ``gradshare_<term>``: the norm of each weighted term's gradient at the student's
        feature maps (every forward of the step), and its ratio to the source CE's. With target labels (for
        monitoring only: no loss reads them): the teacher's pixel accuracy on the weak target view
        (``teacher_acc``), the precision of its confident pixels (``pseudo_precision``: confidence at least the
        threshold) and of its pseudo-labels per class (``pseudo_precision_<k>``: of the pixels labelled k, the
        share that are k)."""
        c = self.cfg
        weights = {"ce": 1.0, "lovasz": c.lambda_lov, "mix": 1.0, "contrast": c.lambda_contrast}
        out = self.gradient_shares(terms, weights, features)
        if truth is not None:
            with torch.no_grad():
                truth = truth.to(pseudo.device)
                labelled = truth != IGNORE
                if labelled.any():
                    right = (pseudo == truth) & labelled
                    out["teacher_acc"] = float(right.sum() / labelled.sum())
                    confident = labelled & (confidence >= c.threshold)
                    if confident.any():
                        out["pseudo_precision"] = float((right & confident).sum() / confident.sum())
                    k = self.num_classes
                    given = torch.bincount(pseudo[labelled], minlength=k)[:k].cpu()
                    correct = torch.bincount(pseudo[right], minlength=k)[:k].cpu()
                    for cls in torch.nonzero(given).flatten().tolist():
                        out[f"pseudo_precision_{cls}"] = float(correct[cls]) / float(given[cls])
        return out

    # ------------------------------------------------------------------------------------------- step
    def run_step(self, iteration: int) -> Dict[str, float]:
        c = self.cfg
        src, tgt = self.fetch(iteration, self.source, self.target)
        s_img, t_img = self.unnormalized(src), self.unnormalized(tgt)
        labels = src["label"].to(self.device, non_blocking=True)
        with torch.no_grad(), self.autocast(), running_stats_untouched(self.teacher):
            teacher_t = self.teacher(self.model_input(t_img))
        up = upsample_logits(teacher_t.logits.float(), t_img.shape[-2:])
        pseudo, weight, confidence = pseudo_labels_and_weight(up, c.threshold, c.ignore_top, c.ignore_bottom)
        if c.class_mix:
            mask = class_mix_masks(labels, self.generator)
        else:
            mask = torch.zeros_like(labels, dtype=torch.bool)
        mixed = mix(mask, s_img, t_img)
        mixed_label, mixed_weight = mixed_targets(mask, labels, pseudo, weight)
        if c.strong_augment:
            mixed = strong_augment(mixed, self.generator)
        contrast = c.contrast != "none" and c.lambda_contrast > 0 and iteration >= c.contrast_start
        with self.autocast():
            s_out = self.model(self.model_input(s_img))
            m_out = self.model(self.model_input(mixed))
            t_out = None
            if contrast:
                # Running statistics untouched: a pure target batch would otherwise move them toward the target
                # (what AdaBN does), and the row with the contrastive term would differ from the one without by
                # more than the loss.
                with running_stats_untouched(self.model):
                    t_out = self.model(self.model_input(t_img))
        terms = self.supervised_terms(s_out.logits, labels, c.lambda_lov)
        m_up = upsample_logits(m_out.logits.float(), mixed_label.shape[-2:])
        terms["loss_mix"] = weighted_cross_entropy(m_up, mixed_label, mixed_weight)
        if contrast:
            with torch.no_grad(), self.autocast(), running_stats_untouched(self.teacher):
                teacher_s = self.teacher(self.model_input(s_img))
            with torch.no_grad():
                t_maps = self._features(teacher_s.features, teacher=True)
                # One labelling of the source feature pixels: the teacher's maps and the student's share a size.
                s_lab = majority_downsample_labels(labels, t_maps.shape[-2:], self.num_classes,
                                                   c.label_ratio).reshape(-1)
                self.statistics.update(statistics_rows(pixel_rows(t_maps), c.variant), s_lab, sync=self.dist.enabled)
            # Target pixels of weight 0 (the ignored rows) carry no pseudo-label.
            target_labels = torch.where(weight > 0, pseudo, torch.full_like(pseudo, IGNORE))
            terms["loss_contrast"] = self._contrast(self._features(s_out.features), s_lab,
                                                    self._features(t_out.features), target_labels)
        check_finite(terms, iteration, self.dist)
        extra = {}
        if self.diagnostics_period and iteration % self.diagnostics_period == 0:
            maps = [s_out.features, m_out.features] + ([t_out.features] if t_out is not None else [])
            extra = self.diagnostics(terms, maps, pseudo, confidence, tgt.get("label"))
        total = (terms["loss_ce"] + c.lambda_lov * terms.get("loss_lovasz", 0.0) + terms["loss_mix"]
                 + c.lambda_contrast * terms.get("loss_contrast", 0.0))
        self.update(total)
        alpha = ema_alpha(iteration + 1, c.alpha)  # after the (iteration + 1)-th update of the student
        ema_update(self.teacher, self.model, alpha)
        if self.projection is not None:
            ema_update(self.teacher_projection, self.projection, alpha)
        out = {k: v.detach() for k, v in terms.items()}  # read back once per log period (MetricsLogger)
        out["pseudo_weight"] = weight.max()
        out["mixed_share"] = mask.float().mean()
        out["time_data"] = self.data_wait
        out.update(extra)
        return out
