"""One training iteration per stage: the supervised step (warm-up, self-training) and the adaptation step."""
from __future__ import annotations

import contextlib
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..data.transforms import finish_images
from ..method import SemanticDistribution, downsample_labels, lovasz_softmax, sdca_loss, target_mask
from ..method.diagnostics import masked_precision_recall
from ..models import upsample_logits
from .batchnorm import running_stats_untouched
from .config import MethodConfig
from .distributed import BucketedGradients, DistInfo, agree_max
from .loop import check_finite

IGNORE = 255


def pixel_rows(maps: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B*h*w, C]."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def statistics_rows(rows: torch.Tensor, variant: str) -> torch.Tensor:
    """Pixel rows in the space the semantic statistics live in: L2-normalised for the paper variant (so the
    Gaussians describe the q the loss reads), raw for the public code's variant. Shared by init-stats and
    adapt, which must agree."""
    rows = rows.detach().float()
    return F.normalize(rows, dim=1) if variant == "paper" else rows


class StepBase:
    channels_last = False  # set by the runner from speed.channels_last (which converts the model too)
    data_wait = 0.0  # seconds the last step waited for its batches (logged as time_data)

    def __init__(self, model, optimizer, device: torch.device, amp: Optional[str], dist_info: DistInfo,
                 trainable: Optional[torch.nn.Module] = None):
        """``trainable``: every module the optimizer trains (the model and anything trained beside it), whose
        gradients are averaged under DDP; the model alone by default."""
        self.model, self.optimizer, self.device, self.dist = model, optimizer, device, dist_info
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp) if amp else None
        use_scaler = self.amp_dtype == torch.float16 and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.normalize = model.info.normalization
        # Under DDP the gradient all-reduce runs bucket by bucket during backward (see BucketedGradients).
        self.grads = BucketedGradients(trainable or model, dist_info) if dist_info.enabled else None
        # Frames skipped because they could not be decoded, and pairs whose label was resized to its image, as
        # the batches report them (their names travel with the batch, from whichever worker read them).
        self.unreadable, self.mismatched = set(), set()

    def note(self, batch: dict) -> dict:
        self.unreadable.update(batch.get("skipped", ()))
        self.mismatched.update(batch.get("mismatched", ()))
        return batch

    def fetch(self, iteration: int, *streams) -> List[dict]:
        """The next batch of each stream. Under torch.distributed the ranks agree (one tiny all-reduce) that all
        got theirs, so that a stream failing on one rank stops every rank at this step instead of leaving the
        others waiting in the next collective."""
        batches, error = [], None
        start = time.perf_counter()
        try:
            batches = [self.note(next(s)) for s in streams]
        except Exception as exc:
            error = exc
        self.data_wait = time.perf_counter() - start  # logged as time_data: the step's wait for its batches
        if self.dist.enabled:
            failed = agree_max(self.dist.rank + 1 if error is not None else 0, self.dist)
            if failed and error is None:
                raise RuntimeError(f"the data stream of rank {failed - 1} failed at step {iteration + 1} (its own "
                                   "log says why); every rank stopped")
        if error is not None:
            raise error
        return batches

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def images(self, batch: dict) -> torch.Tensor:
        """The batch on the device as the model reads it: uint8 frames made float and given their deferred
        photometric augmentation there (the uint8 pipeline), then normalised."""
        return self.model_input(self.unnormalized(batch))

    def unnormalized(self, batch: dict) -> torch.Tensor:
        """The batch's images on the device in [0, 1], photometric augmentation applied, not yet normalised."""
        return finish_images(batch["image"].to(self.device, non_blocking=True), batch.get("photometric"))

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def update(self, total: torch.Tensor) -> None:
        if self.grads is not None:
            self.grads.zero()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            # Averaged while still scaled, then unscaled: every rank finds the same inf/NaN (or none), so all
            # skip or all apply the step, and their loss scales stay equal.
            self.scaler.scale(total).backward()
            if self.grads is not None:
                self.grads.finish()
            self.scaler.unscale_(self.optimizer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            total.backward()
            if self.grads is not None:
                self.grads.finish()
            self.optimizer.step()

    def supervised_terms(self, logits: torch.Tensor, labels: torch.Tensor, lambda_lov: float) -> Dict[str, torch.Tensor]:
        """Eq. 17 (+ Lovász-Softmax) on logits upsampled to the label size, as the public code trains."""
        up = upsample_logits(logits.float(), labels.shape[-2:])
        terms = {"loss_ce": F.cross_entropy(up, labels, ignore_index=IGNORE)}
        if lambda_lov > 0:
            terms["loss_lovasz"] = lovasz_softmax(torch.softmax(up, dim=1), labels, ignore_index=IGNORE)
        return terms

    @staticmethod
    def gradient_shares(terms: Dict[str, torch.Tensor], weights: Dict[str, float],
                        features: List[torch.Tensor]) -> Dict[str, float]:
        """``gradnorm_<name>``: the norm, over all of ``features`` (the step's feature maps), of the gradient of
        ``weights[name] * terms["loss_<name>"]``; ``gradshare_<name>``: its ratio to CE's (``name`` "ce"). Terms
        absent from the graph are left out."""
        out: Dict[str, float] = {}
        for name, weight in weights.items():
            term = terms.get(f"loss_{name}")
            if term is None or not term.requires_grad:
                continue
            grads = torch.autograd.grad(weight * term, features, retain_graph=True, allow_unused=True)
            parts = [g.float().norm() for g in grads if g is not None]
            out[f"gradnorm_{name}"] = float(torch.stack(parts).norm()) if parts else 0.0
        for name in weights:
            if name != "ce" and f"gradnorm_{name}" in out and out.get("gradnorm_ce", 0) > 0:
                out[f"gradshare_{name}"] = out[f"gradnorm_{name}"] / out["gradnorm_ce"]
        return out

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class SupervisedStep(StepBase):
    """Source warm-up (cross-entropy + lambda_lov Lovász-Softmax) or self-training (Eq. 20, lambda_lov = 0)."""

    def __init__(self, model, optimizer, stream, device, amp, dist_info, lambda_lov: float):
        super().__init__(model, optimizer, device, amp, dist_info)
        self.stream, self.lambda_lov = stream, lambda_lov

    def run_step(self, iteration: int) -> Dict[str, float]:
        batch, = self.fetch(iteration, self.stream)
        labels = batch["label"].to(self.device, non_blocking=True)
        with self.autocast():
            out = self.model(self.images(batch))
        terms = self.supervised_terms(out.logits, labels, self.lambda_lov)
        check_finite(terms, iteration, self.dist)
        self.update(terms["loss_ce"] + self.lambda_lov * terms.get("loss_lovasz", 0.0))
        out = {k: v.detach() for k, v in terms.items()}  # read back once per log period (MetricsLogger)
        out["time_data"] = self.data_wait
        return out


class AdaptStep(StepBase):
    """Eq. 18: CE + lambda_lov Lovász on source, plus the SDCA loss on features (and outputs) of both domains.

    Each step first merges the current source batch into the semantic distributions (Eq. 3-4; all ranks pool
    their batches, so statistics agree everywhere), then builds target masks by Eq. 5. The statistics live in
    the space the loss variant reads: L2-normalised rows for the paper variant, raw rows for the public one.
    With ``adaptation_bn="target"`` the source forward leaves the batch-norm running statistics alone, so that
    inference normalises with target statistics.
    """

    def __init__(self, model, optimizer, source, target, feat_stats: SemanticDistribution,
                 out_stats: Optional[SemanticDistribution], method: MethodConfig, device, amp, dist_info,
                 diagnostics_period: int = 0):
        super().__init__(model, optimizer, device, amp, dist_info)
        self.source, self.target, self.method = source, target, method
        self.feat_stats, self.out_stats = feat_stats, out_stats
        # Every this many steps (0: never): is each loss term doing anything? See diagnostics().
        self.diagnostics_period = diagnostics_period
        self._first_prediction_share: Optional[torch.Tensor] = None

    def diagnostics(self, terms: Dict[str, torch.Tensor], features: List[torch.Tensor],
                    t_logits: torch.Tensor, t_labels: torch.Tensor,
                    t_truth: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """How hard each weighted loss term pulls on the backbone's feature maps, and cheap target signals.

        ``gradnorm_<term>`` = || d(lambda * term) / d(features of both domains) ||: every term reaches the
        backbone through these maps (CE and Lovasz via the classifier, L_out via the logits), so the norms
        compare; ``gradshare_<term>`` is the ratio to CE's. A term whose share sits near 0 changes nothing the
        backbone learns, whatever its loss value. Target side: the share of target pixels predicted as each
        class that pass the Eq. 5 mask (``confident_<k>``), and the total-variation distance of the target
        prediction shares from this stage's first measurement (``prediction_drift``). When the target data set
        carries labels (configured for monitoring only: no loss reads them), the precision of the mask: of the
        target pixels it keeps, the share whose label is the class it gives (``mask_precision`` overall and
        ``mask_precision_<k>`` per class).
        """
        m = self.method
        weights = {"ce": 1.0, "lovasz": m.lambda_lov, "feat": m.lambda_feat, "out": m.lambda_out}
        out = self.gradient_shares(terms, weights, features)
        with torch.no_grad():
            k = t_logits.shape[1]
            pred = t_logits.argmax(1).reshape(-1)
            share = torch.bincount(pred, minlength=k).double() / max(pred.numel(), 1)
            confident = t_labels.reshape(-1) != IGNORE  # the Eq. 5 mask, computed on these same logits
            predicted = torch.bincount(pred, minlength=k).cpu()  # one transfer, not one per class
            passed = torch.bincount(pred[confident], minlength=k).cpu()
            for c in torch.nonzero(predicted).flatten().tolist():
                out[f"confident_{c}"] = float(passed[c]) / float(predicted[c])
            if self._first_prediction_share is None:
                self._first_prediction_share = share
            out["prediction_drift"] = float(0.5 * (share - self._first_prediction_share).abs().sum())
            if t_truth is not None:
                truth = downsample_labels(t_truth.to(t_labels.device), t_logits.shape[-2:])
                precision, _, kept = (v.cpu() for v in masked_precision_recall(t_labels, truth, k))
                labelled = kept > 0
                if labelled.any():
                    out["mask_precision"] = float((precision[labelled] * kept[labelled]).sum() / kept.sum())
                for c in torch.nonzero(labelled).flatten().tolist():
                    out[f"mask_precision_{c}"] = float(precision[c])
        return out

    def _stat_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return statistics_rows(rows, self.method.variant)

    def _contrast(self, stats: SemanticDistribution, s_rows, s_labels, t_rows, t_labels) -> torch.Tensor:
        m = self.method
        mean, cov = stats.mean.float(), stats.covariance.float()  # once per step, shared by both domains
        kwargs = dict(tau=m.tau, variant=m.variant, normalize=True, check_labels=False)
        return (sdca_loss(s_rows, s_labels, mean, cov, **kwargs) + sdca_loss(t_rows, t_labels, mean, cov, **kwargs))

    def run_step(self, iteration: int) -> Dict[str, float]:
        m = self.method
        src, tgt = self.fetch(iteration, self.source, self.target)
        labels = src["label"].to(self.device, non_blocking=True)
        keep_source_out = running_stats_untouched(self.model) if m.adaptation_bn == "target" else contextlib.nullcontext()
        with self.autocast():
            with keep_source_out:
                s_out = self.model(self.images(src))
            t_out = self.model(self.images(tgt))
        terms = self.supervised_terms(s_out.logits, labels, m.lambda_lov)
        s_labels = downsample_labels(labels, s_out.features.shape[-2:]).reshape(-1)
        t_labels = target_mask(t_out.logits.float(), m.delta, class_balanced=m.class_balanced_mask).reshape(-1)
        s_feat, t_feat = pixel_rows(s_out.features), pixel_rows(t_out.features)
        sync = self.dist.enabled
        with torch.no_grad():
            self.feat_stats.update(self._stat_rows(s_feat), s_labels, sync=sync)
        terms["loss_feat"] = self._contrast(self.feat_stats, s_feat, s_labels, t_feat, t_labels)
        if m.multi_level and self.out_stats is not None:
            s_log, t_log = pixel_rows(s_out.logits), pixel_rows(t_out.logits)
            with torch.no_grad():
                self.out_stats.update(self._stat_rows(s_log), s_labels, sync=sync)
            terms["loss_out"] = self._contrast(self.out_stats, s_log, s_labels, t_log, t_labels)
        check_finite(terms, iteration, self.dist)
        extra = {}
        if self.diagnostics_period and iteration % self.diagnostics_period == 0:
            extra = self.diagnostics(terms, [s_out.features, t_out.features], t_out.logits, t_labels,
                                     tgt.get("label"))
        total = (terms["loss_ce"] + m.lambda_lov * terms.get("loss_lovasz", 0.0)
                 + m.lambda_feat * terms["loss_feat"] + m.lambda_out * terms.get("loss_out", 0.0))
        self.update(total)
        out = {k: v.detach() for k, v in terms.items()}  # read back once per log period (MetricsLogger)
        out["target_labelled"] = (t_labels != IGNORE).float().mean()
        out["time_data"] = self.data_wait
        out.update(extra)
        return out
