"""Preference losses as pure functions of per-answer log-probabilities: DPO, IPO, SimPO, ORPO.

A trainer scores each pair's two answers with `sequence_logps` (summed or averaged over answer tokens, as
`LOSSES[name].averages` says; the reference model's in the same form when `needs_reference`) and calls
`LOSSES[name](policy_chosen, policy_rejected, ref_chosen, ref_rejected, **hyper_parameters)`. Every loss
returns one value per pair (the trainer reduces them, so that accumulation and several processes see the sum
over the global batch) and the rewards and log-probabilities it logs (`metric_sums`, `metric_means`).

Conventions (sign, where beta sits, which log-probabilities are averaged, what the rewards are) follow TRL
1.16 (trl.DPOTrainer, trl.experimental.cpo.CPOTrainer with loss_type="simpo", trl.experimental.orpo);
tests/test_preference_losses.py compares each loss with TRL's code. The few differences are on purpose and
listed in docs/preference.md#losses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from deltatune.constants import IGNORE_INDEX


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool) -> torch.Tensor:
    """Per row, the log-probability of the answer tokens: the sum over them, or (average=True) the mean.

    logits: [batch, positions, vocab] of a causal LM, where logits[:, t] predicts labels[:, t + 1]; soft-prompt
    methods prepend virtual positions, so only the last labels.shape[1] positions are read. labels: [batch,
    seq], IGNORE_INDEX (-100) on every token that is not part of the answer (prompt, padding). Computed in
    float32 at least, as gathered logit - logsumexp over the vocabulary, on the answer positions only: autograd
    then keeps one [answer tokens, vocab] copy (none when the logits already are float32) instead of a
    log-softmax of every position.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[0] != labels.shape[0] \
            or logits.shape[1] < labels.shape[1]:
        raise ValueError(f"sequence_logps needs logits [batch, positions, vocab] and labels [batch, seq] with "
                         f"positions >= seq; got logits {tuple(logits.shape)}, labels {tuple(labels.shape)}")
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    counts = mask.sum(dim=1)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} of the batch have no answer token (every label after the first is "
                         f"{IGNORE_INDEX}): a pair whose answer was truncated away must be dropped when the data "
                         "is built, since its log-probability would be 0 whatever the model says")
    picked = logits[:, -labels.shape[1]:-1][mask]  # [answer tokens, vocab]
    picked = picked.to(torch.promote_types(picked.dtype, torch.float32))
    token_logps = picked.gather(1, targets[mask].unsqueeze(1)).squeeze(1) - torch.logsumexp(picked, dim=1)
    rows = mask.nonzero(as_tuple=True)[0]  # the row of each answer token, in the order mask indexing took them
    sums = torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    sums = sums.index_add(0, rows, token_logps)
    return sums / counts if average else sums


@dataclass(frozen=True)
class LossOutput:
    """What a preference loss gives, one value per pair in each tensor.

    losses: what to minimise (with gradient). chosen_rewards / rejected_rewards: the implicit reward of each
    answer (detached); the reward accuracy is how often chosen > rejected. chosen_logps / rejected_logps: the
    policy's log-probabilities as the loss took them (summed or averaged), detached. extras: further per-pair
    values a loss logs (ORPO: nll, log_odds), detached.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def _f32(x: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 log-probabilities would lose the small differences these losses are made of; float64 stays.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def dpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor, *, beta: float, label_smoothing: float) -> LossOutput:
    """DPO (Rafailov et al. 2023), conservative with label_smoothing (cDPO, Mitchell 2023). Summed log-probs.

        h    = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
        rewards: beta * (log pi(y) - log ref(y)) for y_w (chosen) and y_l (rejected)

    eps = label_smoothing in [0, 0.5): the probability that a pair's preference is flipped; the loss is DPO's
    expected under that noise. eps = 0 is TRL's loss_type="sigmoid"; for eps > 0 this is TRL's earlier
    sigmoid loss (still CPOTrainer's), not TRL 1.16's loss_type="robust" (rDPO, an unbiased estimate instead).
    The reference log-probabilities are detached.
    """
    _check_beta(beta)
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) (the chance a label is flipped), got {label_smoothing}")
    chosen_ratio = _f32(policy_chosen) - _f32(ref_chosen).detach()
    rejected_ratio = _f32(policy_rejected) - _f32(ref_rejected).detach()
    z = beta * (chosen_ratio - rejected_ratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return LossOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach(),
                      policy_chosen.detach(), policy_rejected.detach())


def ipo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor, *, beta: float) -> LossOutput:
    """IPO (Azar et al. 2023, eq. 17; beta is the paper's tau). Log-probs AVERAGED over answer tokens.

        h    = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))      (per-token means)
        loss = (h - 1 / (2 * beta)) ** 2
        rewards: beta * (log pi(y) - log ref(y)), per-token means

    The averaging is TRL's (confirmed there with the IPO authors). TRL 1.16 logs IPO's rewards from summed
    log-probs; here they come from the averaged ones the loss uses (as TRL did before 1.0), so the reward
    accuracy agrees with the sign of h. The reference log-probabilities are detached.
    """
    _check_beta(beta)
    chosen_ratio = _f32(policy_chosen) - _f32(ref_chosen).detach()
    rejected_ratio = _f32(policy_rejected) - _f32(ref_rejected).detach()
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return LossOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach(),
                      policy_chosen.detach(), policy_rejected.detach())


def simpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, *, beta: float, gamma: float) -> LossOutput:
    """SimPO (Meng et al. 2024, eq. 6): no reference model, log-probs AVERAGED over answer tokens.

        loss = -log sigmoid(beta * log pi(y_w) - beta * log pi(y_l) - gamma)     (per-token means)
        rewards: beta * log pi(y), per-token means

    gamma is the target reward margin (the paper's; TRL's CPOConfig.simpo_gamma, there divided by beta and
    multiplied back). TRL: CPOTrainer with loss_type="simpo", cpo_alpha=0 (no extra NLL term).
    """
    _check_beta(beta)
    chosen, rejected = _f32(policy_chosen), _f32(policy_rejected)
    losses = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    return LossOutput(losses, beta * chosen.detach(), beta * rejected.detach(),
                      policy_chosen.detach(), policy_rejected.detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012), as TRL's ORPO."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, *, lambda_: float) -> LossOutput:
    """ORPO (Hong et al. 2024, eqs. 2-7): no reference model, log-probs AVERAGED over answer tokens.

        odds(y)  = P(y) / (1 - P(y)),  with log P(y) = the per-token mean log-prob of y
        log_odds = log odds(y_w) - log odds(y_l)
                 = (log P(y_w) - log P(y_l)) - (log(1 - P(y_w)) - log(1 - P(y_l)))
        loss     = -log P(y_w) - lambda * log sigmoid(log_odds)          (NLL of the chosen answer + L_OR)
        rewards: lambda * log P(y)

    The odds-ratio term and the rewards are TRL's (ORPOTrainer.odds_ratio_loss, with beta = lambda). TRL's NLL
    is a token-weighted mean over the whole batch and also counts the prompt tokens; here it is each pair's
    chosen answer alone, a per-pair value like every other loss here (equal to TRL's when the chosen answers
    are equally long and the prompt is not scored). A mean log-prob of exactly 0 (the model certain of every
    token, reached in float32) would make the odds infinite; it is clamped just below 0 in the odds term.
    """
    if not lambda_ >= 0:
        raise ValueError(f"lambda must be >= 0, got {lambda_}")
    chosen, rejected = _f32(policy_chosen), _f32(policy_rejected)
    below_zero = -torch.finfo(chosen.dtype).eps
    log_p_w, log_p_l = chosen.clamp(max=below_zero), rejected.clamp(max=below_zero)
    log_odds = (log_p_w - log_p_l) - (_log1mexp(log_p_w) - _log1mexp(log_p_l))
    nll = -chosen
    losses = nll - lambda_ * F.logsigmoid(log_odds)
    return LossOutput(losses, lambda_ * chosen.detach(), lambda_ * rejected.detach(),
                      policy_chosen.detach(), policy_rejected.detach(),
                      extras={"nll": nll.detach(), "log_odds": log_odds.detach()})


@dataclass(frozen=True)
class Loss:
    """A registry entry: what a trainer needs to know about a loss before computing it.

    params: each hyper-parameter (fn's keyword argument) with its default. needs_reference: the loss reads a
    reference model's log-probabilities (SimPO and ORPO need none, so no reference is loaded or computed).
    averages: sequence_logps(average=...) for the policy and the reference alike.
    """

    name: str
    fn: Callable[..., LossOutput]
    params: dict[str, float]
    needs_reference: bool
    averages: bool
    description: str

    def __call__(self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                 ref_chosen: torch.Tensor | None = None, ref_rejected: torch.Tensor | None = None,
                 **hyper_parameters: float) -> LossOutput:
        """fn with the defaults of `params` under `hyper_parameters`; refuses a missing or unused reference."""
        unknown = sorted(set(hyper_parameters) - set(self.params))
        if unknown:
            raise ValueError(f"loss `{self.name}` has no hyper-parameter {unknown}; it takes {sorted(self.params)}")
        given = ref_chosen is not None and ref_rejected is not None
        if given != self.needs_reference or (ref_chosen is None) != (ref_rejected is None):
            raise ValueError(f"loss `{self.name}` " + ("needs the reference model's log-probabilities of both "
                             "answers" if self.needs_reference else "uses no reference model; pass none"))
        refs = (ref_chosen, ref_rejected) if self.needs_reference else ()
        return self.fn(policy_chosen, policy_rejected, *refs, **{**self.params, **hyper_parameters})


LOSSES: dict[str, Loss] = {loss.name: loss for loss in [
    Loss("dpo", dpo, {"beta": 0.1, "label_smoothing": 0.0}, needs_reference=True, averages=False,
         description="DPO on summed log-ratios to a reference; label_smoothing > 0 is conservative DPO"),
    Loss("ipo", ipo, {"beta": 0.1}, needs_reference=True, averages=True,
         description="IPO: squared distance of the per-token log-ratio margin from 1/(2 beta)"),
    # SimPO's defaults are the paper's Llama-3-Base setting (gamma/beta = 0.5 as it recommends); TRL's CPOConfig
    # defaults (beta 0.1, gamma 0.5) are CPO's, not tuned for SimPO.
    Loss("simpo", simpo, {"beta": 2.0, "gamma": 1.0}, needs_reference=False, averages=True,
         description="SimPO: reference-free, per-token mean log-probs, target margin gamma"),
    Loss("orpo", orpo, {"lambda_": 0.1}, needs_reference=False, averages=True,
         description="ORPO: NLL of the chosen answer + lambda * odds-ratio loss, reference-free"),
]}

METRICS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logps", "rejected_logps")


def metric_sums(out: LossOutput) -> dict[str, float]:
    """Sums over a batch's pairs (and `pairs`, their number): add these over micro-batches and processes
    (engine.distributed.Dist.all_sum), then `metric_means`. reward_accuracy counts chosen > rejected (a tie,
    as at the first step of DPO and IPO where the policy is the reference, is not a success, as in TRL)."""
    per_pair = [out.chosen_rewards > out.rejected_rewards, out.chosen_rewards - out.rejected_rewards,
                out.chosen_rewards, out.rejected_rewards, out.chosen_logps, out.rejected_logps,
                *out.extras.values()]
    sums = torch.stack([v.detach().double().sum() for v in per_pair]).tolist()  # one device sync
    return {"pairs": float(out.losses.shape[0]), **dict(zip((*METRICS, *out.extras), sums))}


def metric_means(sums: dict[str, float]) -> dict[str, float]:
    """The logged values: each sum of `metric_sums` over the number of pairs."""
    pairs = sums["pairs"]
    if pairs <= 0:
        raise ValueError("metric_means: no pairs were summed")
    return {key: value / pairs for key, value in sums.items() if key != "pairs"}
