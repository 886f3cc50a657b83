"""PMR: prototypical modal rebalance (Fan et al., CVPR 2023), as a trainer strategy.

Reference: Y. Fan, W. Xu, H. Wang, J. Wang, S. Guo, "PMR: Prototypical Modal Rebalance for
Multimodal Learning", CVPR 2023 (Sec. 4, Eq. 6-13, Alg. 1), and the authors' code
(``fanyunfeng-bit/Modal-Imbalance-PMR``, commit ``3615e48``: ``main_Prototype_grad.py``,
``bash.sh``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset

from miles.batch import move_batch
from miles.models.fusion import FusionOutput, JointFusionModel
from miles.strategies.base import EvalResult, StrategyContext
from miles.strategies.joint import Joint
from miles.strategies.ogm import discrepancy_ratios
from miles.strategies.registry import register_strategy
from miles.strategies.requirements import (
    ModulationWindow,
    require_modalities,
    require_single_label,
)
from miles.validation import (
    check_choice,
    check_fraction,
    check_non_negative,
    check_positive_int,
)

Rule = Literal["code", "paper"]
RULES: tuple[Rule, ...] = ("code", "paper")


def prototype_logits(latent: Tensor, prototypes: Tensor) -> Tensor:
    """``-||z - c_k||_2`` for every class ``k`` (Eq. 7: plain, not squared, Euclidean distance)."""
    return -torch.cdist(latent, prototypes.to(latent), compute_mode="donot_use_mm_for_euclid_dist")


def class_means(latent: Tensor, target: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class mean of ``latent`` rows and how many rows each class had."""
    sums = latent.new_zeros(num_classes, latent.shape[1]).index_add_(0, target.long(), latent)
    counts = torch.bincount(target.long(), minlength=num_classes).to(latent.dtype)
    return sums / counts.clamp_min(1).unsqueeze(1), counts


def updated_prototypes(
    new: Tensor, counts: Tensor, old: Tensor | None, momentum: float, fallback: Tensor
) -> Tensor:
    """``c <- momentum * c_old + (1 - momentum) * c_new`` (Eq. 12); a class missing from the subset
    keeps its old prototype, or takes ``fallback`` (the subset's mean latent) when there is none."""
    present = (counts > 0).unsqueeze(1)
    if old is None:
        return torch.where(present, new, fallback.expand_as(new))
    old = old.to(new)
    blended = new if momentum == 0 else momentum * old + (1 - momentum) * new
    return torch.where(present, blended, old)


def rebalance_coefficients(
    scores: Mapping[str, float], alpha: float, rule: Rule
) -> dict[str, float]:
    """The weight of each modality's prototypical cross-entropy (Eq. 9-11).

    With ``rho_m = s_m / mean_{k != m} s_k`` (``s_m`` the batch's summed prototype probability of
    the true class; two modalities: ``rho = s_0 / s_1`` and ``1 / rho``): ``"paper"`` gives the
    weaker modality ``alpha * clip(1 / rho_m - 1, 0, 1)``; ``"code"`` (the released code) gives it
    ``alpha``; the stronger one (``rho_m >= 1``) gets 0 either way.
    """
    out = {}
    for m, ratio in discrepancy_ratios(scores).items():
        if not ratio < 1:
            out[m] = 0.0
        elif rule == "code":
            out[m] = alpha
        else:
            lead = 1.0 / ratio - 1.0 if ratio > 0 else 1.0
            out[m] = alpha * min(max(lead, 0.0), 1.0)
    return out


def prototype_entropy(logits: Tensor) -> Tensor:
    """Mean over the batch of the entropy of ``softmax(-distance)`` (Eq. 13's ``H``)."""
    logp = torch.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1).mean()


@register_strategy("pmr")
class PMR(Joint):
    """Prototypical modal rebalance (PMR; Fan et al., CVPR 2023).

    At the start of every epoch, each modality's class prototypes ``c_{m,k}`` are the class means
    of its encoder's latents over a random ``subset`` of the training set (eval mode, no
    gradient; Eq. 6, Alg. 1), blended with the previous ones by ``momentum`` (Eq. 12). Each step,
    inside the modulation window:

    1. each modality's prototype classifier ``p_m(k|x) = softmax_k(-||z_m - c_{m,k}||)`` (Eq. 7)
       scores ``s_m = sum_i p_m(y_i|x_i)`` (Eq. 8) and the ratios ``rho_m`` decide the weaker
       modalities (:func:`rebalance_coefficients`);
    2. the loss adds ``beta_m * CE(-d(z_m, c_m), y)`` (the prototypical cross-entropy, Eq. 9-11),
       which pulls the weaker encoder's latents to their class prototype (the prototypes
       themselves carry no gradient);
    3. optionally (``per_weight > 0``, two modalities) prototypical entropy regularisation
       (Eq. 13) subtracts ``mu * beta_weak * H(p_strong)`` for the first ``per_epochs`` epochs,
       slowing the stronger modality.

    Vanilla joint training is the parent (fused loss; the unimodal heads train as detached probes
    and give the heads column). The per-epoch record adds each modality's prototype-classifier
    accuracy on validation (``prototype_accuracy``), the authors' second unimodal readout.

    Args:
        alpha: Eq. 10's scale; the paper uses 1 or 2 by dataset, the code's argparse default is
            1.0 (``bash.sh`` runs 0.5 to 3.0; BalanceBenchmark 0.6). Default 1.0; ``alpha = 0``
            is exactly ``joint``.
        rule: ``"code"`` (default): the released code's binary weight, ``alpha`` for the weaker
            modality (``main_Prototype_grad.py``); ``"paper"``: Eq. 10-11's
            ``alpha * clip(1/rho - 1, 0, 1)``, which fades as the modalities draw level.
        momentum: ``epsilon`` of Eq. 12; the paper gives no value, the argparse default is 0.2 and
            every run in ``bash.sh`` uses 0.0 (BalanceBenchmark 0.5). Default 0.0.
        subset: share of the training set the prototypes are computed on; 1/10 (paper Sec. 5.2;
            the code takes the first tenth of the shuffled batches).
        modulation_starts: first epoch (1-based) with the rebalancing loss; ``bash.sh`` runs
            ``--modulation_starts 0 --modulation_ends 70`` on 0-based epochs, our 1 to 71.
        modulation_ends: last epoch (1-based, inclusive) with the rebalancing loss.
        per_weight: ``mu`` of Eq. 13 (the paper's 1e-2 or 1e-3); default 0 (off): the released
            code has no PER (``bash.sh`` calls ``main_Proto_PER.py``, which the repository lacks).
        per_epochs: PER acts in epochs ``1..per_epochs`` (the paper's ``E_r``, "the first few
            epochs", no value given); ``None``: every epoch of the window.

    Where this departs from the authors' code:

    - The prototypes are computed on a random ``subset`` of the training set drawn with the run's
      seed and the epoch (its own generator: the run's shuffling and random streams are
      untouched), rather than on the first tenth of the training loader's batches (which advances
      its shuffling). The paper's text says a 1/10 training subset; the code uses the whole
      validation set for AVE and the test set for CG-MNIST.
    - Momentum applies from the second computation on; the code skips it for the first two (its
      ``epoch <= 0`` test after epoch 0). A class absent from the subset keeps its prototype (the
      code divides by a zero count).
    - More than two modalities: ``rho_m = s_m / mean_{k != m} s_k`` (the paper defines two; for two
      this is exactly Eq. 8); PER stays two-modality only (``ValueError``).
    - Optimizer: the authors use SGD (momentum 0.9, weight decay 1e-4, lr 1e-3, StepLR(70, 0.1));
      any of ours works, the learning-rate schedule is not reproduced.

    BalanceBenchmark's PMR (``PMR_trainer.py``) uses the binary rule with ``alpha = 0.6`` and
    momentum 0.5, has no PER, and for more than two modalities replaces PMR by an OGM-GE-like
    gradient rule (``1 - tanh(eta * ratio)``, noise subtracted) that is not in the paper; as
    released it calls ``model.Unimodality_Calculate()``, which the repository does not define.

    Not supported: multilabel tasks (``ValueError`` at ``on_fit_start``), a single modality.
    """

    name = "pmr"
    uses_aux_losses = False
    needs_latents = True

    def __init__(
        self,
        alpha: float = 1.0,
        rule: Rule = "code",
        momentum: float = 0.0,
        subset: float = 0.1,
        modulation_starts: int = 1,
        modulation_ends: int = 71,
        per_weight: float = 0.0,
        per_epochs: int | None = None,
    ) -> None:
        self.alpha = check_non_negative("alpha", alpha)
        self.rule: Rule = check_choice("rule", rule, RULES)
        self.momentum = check_fraction("momentum", momentum)
        self.subset = check_fraction("subset", subset, zero=False, one=True)
        self.window = ModulationWindow(modulation_starts, modulation_ends)
        self.per_weight = check_non_negative("per_weight", per_weight)
        self.per_epochs = (
            None if per_epochs is None else check_positive_int("per_epochs", per_epochs)
        )
        #: each modality's class prototypes, ``(classes, latent size)``
        self.prototypes: dict[str, Tensor] = {}
        self._epoch = 0
        self._reset_epoch_stats()

    # -- setup -----------------------------------------------------------------------------------
    def configure_model(self, model: JointFusionModel) -> None:
        require_modalities(self.name, model)
        if self.per_weight > 0 and len(model.modalities) != 2:
            raise ValueError(
                f"PMR's entropy regularisation (per_weight > 0) is defined for two modalities, got "
                f"{list(model.modalities)}"
            )
        super().configure_model(model)

    def on_fit_start(self, ctx: StrategyContext) -> None:
        require_single_label(self.name, ctx.multilabel)

    def _reset_epoch_stats(self) -> None:
        self._coeff_sum: dict[str, float] = {}
        self._score_sum: dict[str, float] = {}
        self._batches = 0
        self._samples = 0

    # -- prototypes ------------------------------------------------------------------------------
    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        self._epoch = epoch
        self._reset_epoch_stats()
        latents, target = self.subset_latents(ctx, epoch)
        for m, z in latents.items():
            new, counts = class_means(z, target, ctx.model.num_classes)
            fallback = z.mean(dim=0)
            self.prototypes[m] = updated_prototypes(
                new, counts, self.prototypes.get(m), self.momentum, fallback
            )

    def subset_loader(self, ctx: StrategyContext, epoch: int) -> DataLoader:
        """A seeded ``subset`` of the training set, different every epoch and run seed."""
        loader = ctx.train_loader
        if loader is None:
            raise ValueError("PMR needs ctx.train_loader to compute its prototypes")
        dataset = loader.dataset
        n = len(dataset)
        run_seed = loader.generator.initial_seed() if loader.generator is not None else 0
        generator = torch.Generator().manual_seed(run_seed * 100_003 + epoch)
        k = max(1, round(n * self.subset))
        idx = torch.randperm(n, generator=generator)[:k].sort().values.tolist()
        return DataLoader(
            Subset(dataset, idx),
            batch_size=loader.batch_size,
            shuffle=False,
            collate_fn=loader.collate_fn,
            generator=generator,
        )

    @torch.no_grad()
    def subset_latents(self, ctx: StrategyContext, epoch: int) -> tuple[dict[str, Tensor], Tensor]:
        """Every modality's latents on the subset (eval mode, no gradient) and the targets."""
        model = ctx.model
        was_training = model.training
        model.eval()
        latents: dict[str, list[Tensor]] = {m: [] for m in model.modalities}
        targets = []
        try:
            for raw in self.subset_loader(ctx, epoch):
                batch = move_batch(raw, ctx.device)
                encoded = model.encode(batch["inputs"], batch.get("lengths") or None)
                for m in model.modalities:
                    latents[m].append(encoded[m].float())
                targets.append(batch["target"])
        finally:
            model.train(was_training)
        return {m: torch.cat(v) for m, v in latents.items()}, torch.cat(targets)

    # -- the step --------------------------------------------------------------------------------
    def rebalancing_loss(
        self, latents: Mapping[str, Tensor], target: Tensor
    ) -> tuple[Tensor | None, dict[str, float], dict[str, float]]:
        """The added loss (None when every weight is 0), the weights and the scores."""
        logits = {m: prototype_logits(latents[m], c) for m, c in self.prototypes.items()}
        idx = target.long().unsqueeze(1)
        scores = {
            m: float(torch.softmax(v.detach(), dim=1).gather(1, idx).sum())
            for m, v in logits.items()
        }
        coeffs = rebalance_coefficients(scores, self.alpha, self.rule)
        extra: Tensor | None = None
        for m, beta in coeffs.items():
            if beta > 0:
                term = beta * F.cross_entropy(logits[m], target)
                extra = term if extra is None else extra + term
        if self._per_active() and len(coeffs) == 2:
            first, second = list(coeffs)
            for strong, weak in ((first, second), (second, first)):
                if coeffs[weak] > 0:
                    term = -self.per_weight * coeffs[weak] * prototype_entropy(logits[strong])
                    extra = term if extra is None else extra + term
        return extra, coeffs, scores

    def _per_active(self) -> bool:
        return self.per_weight > 0 and (self.per_epochs is None or self._epoch <= self.per_epochs)

    def loss(
        self, losses: Mapping[str, Tensor], output: FusionOutput, batch: Mapping[str, Any]
    ) -> Tensor:
        """``joint``'s loss, plus (inside the window) the rebalancing terms."""
        loss = super().loss(losses, output, batch)
        if self._epoch not in self.window:
            return loss
        if not self.prototypes:
            raise RuntimeError("PMR.on_epoch_start was not called: there are no prototypes")
        target = batch["target"]
        extra, coeffs, scores = self.rebalancing_loss(output.latents, target)
        self._record(coeffs, scores, int(target.shape[0]))
        return loss if extra is None else loss + extra

    def _record(self, coeffs: Mapping[str, float], scores: Mapping[str, float], n: int) -> None:
        self._batches += 1
        self._samples += n
        for m in coeffs:
            self._coeff_sum[m] = self._coeff_sum.get(m, 0.0) + coeffs[m]
            self._score_sum[m] = self._score_sum.get(m, 0.0) + scores[m]

    # -- per epoch and state -----------------------------------------------------------------------
    def prototype_accuracy(self, val: EvalResult) -> dict[str, float]:
        """Accuracy of each modality's prototype classifier on ``val``'s latents."""
        if val.latents is None or val.target is None:
            return {}
        out = {}
        for m, c in self.prototypes.items():
            predicted = prototype_logits(val.latents[m].float(), c).argmax(dim=1)
            out[m] = float((predicted == val.target).float().mean())
        return out

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        n = max(self._batches, 1)
        return {
            "modulation_active": epoch in self.window,
            "coeff_mean": {m: v / n for m, v in self._coeff_sum.items()},
            "score_mean": {m: v / max(self._samples, 1) for m, v in self._score_sum.items()},
            "prototype_accuracy": self.prototype_accuracy(val),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"prototypes": {m: c.detach().cpu().clone() for m, c in self.prototypes.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.prototypes = {str(m): c.clone() for m, c in state["prototypes"].items()}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "alpha": self.alpha,
            "rule": self.rule,
            "momentum": self.momentum,
            "subset": self.subset,
            **self.window.describe(),
            "per_weight": self.per_weight,
            "per_epochs": self.per_epochs,
        }
