"""Preference losses (deltatune.preference.losses): each equals its paper's closed form, computed here with
plain Python math, and TRL 1.16's code for the same loss on the same inputs; sequence_logps equals a hand loop.
Pure tensors, a few seconds (importing TRL is most of it)."""

from __future__ import annotations

import inspect
import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from deltatune.constants import IGNORE_INDEX
from deltatune.preference.losses import (
    LOSSES,
    LossOutput,
    dpo,
    ipo,
    metric_means,
    metric_sums,
    orpo,
    sequence_logps,
    simpo,
)

# Hand-built per-answer log-probabilities of four pairs: sums over the answer tokens, and the answers' lengths.
PC = [-12.5, -30.2, -7.1, -45.0]  # policy, chosen
PR = [-14.0, -28.9, -9.3, -44.1]  # policy, rejected
RC = [-13.1, -29.0, -8.0, -46.2]  # reference, chosen
RR = [-13.5, -29.5, -8.8, -43.0]  # reference, rejected
LEN_C = [5, 12, 3, 20]
LEN_R = [6, 10, 4, 18]


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def avg(sums: list[float], lengths: list[int]) -> list[float]:
    return [s / n for s, n in zip(sums, lengths)]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def close(got: torch.Tensor, expected: list[float], tol: float = 1e-6) -> None:
    assert got.tolist() == pytest.approx(expected, abs=tol, rel=tol)


@pytest.fixture(scope="module")
def trl():
    """TRL 1.16, whose loss code the losses are compared with (its trainers are never built)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return pytest.importorskip("trl", reason="TRL is a test-only dependency (requirements.txt, test tools)")


# -- sequence_logps ----------------------------------------------------------------------------------------------

def batch(seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 7 tokens over a vocabulary of 11: prompt tokens, answers of 3, 5 and 1 tokens, padding."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, 11, generator=g, dtype=torch.float64).mul(3).to(dtype)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = IGNORE_INDEX  # prompt of 3, answer of 3, one pad
    labels[0, 6] = IGNORE_INDEX
    labels[1, :2] = IGNORE_INDEX  # prompt of 2, answer of 5
    labels[2, :4] = IGNORE_INDEX  # prompt of 4, answer of 1, two pads
    labels[2, 5:] = IGNORE_INDEX
    return logits, labels


def hand_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool) -> list[float]:
    out = []
    for row_logits, row_labels in zip(logits.tolist(), labels.tolist()):
        total, n = 0.0, 0
        for pos in range(1, len(row_labels)):  # the logits at pos - 1 predict the token at pos
            if row_labels[pos] == IGNORE_INDEX:
                continue
            scores = row_logits[pos - 1]
            top = max(scores)
            total += scores[row_labels[pos]] - top - math.log(sum(math.exp(s - top) for s in scores))
            n += 1
        out.append(total / n if average else total)
    return out


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_equals_a_hand_loop_over_answer_tokens(average: bool) -> None:
    logits, labels = batch()
    got = sequence_logps(logits, labels, average=average)
    assert got.dtype == torch.float64 and got.shape == (3,)
    close(got, hand_logps(logits, labels, average), 1e-12)


def test_sequence_logps_average_is_the_sum_over_answer_tokens() -> None:
    logits, labels = batch()
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    assert counts.tolist() == [3, 5, 1]
    torch.testing.assert_close(sequence_logps(logits, labels, True) * counts, sequence_logps(logits, labels, False))


def test_sequence_logps_reads_nothing_at_ignored_positions() -> None:
    """Logits that predict an ignored label (prompt, padding), the last position's, and the first label
    (never a target) can be anything."""
    logits, labels = batch()
    before = sequence_logps(logits, labels, average=False)
    changed_logits, changed_labels = logits.clone(), labels.clone()
    ignored_next = labels[:, 1:] == IGNORE_INDEX
    changed_logits[:, :-1][ignored_next] += 100 * torch.randn(int(ignored_next.sum()), 11, dtype=torch.float64)
    changed_logits[:, -1] = 50.0
    changed_labels[:, 0] = 3  # a real token where every row had the prompt's -100
    torch.testing.assert_close(sequence_logps(changed_logits, changed_labels, average=False), before)
    changed_logits[0, 3, labels[0, 4]] += 1.0  # an answer position does count
    assert sequence_logps(changed_logits, labels, average=False)[0] != before[0]


def test_sequence_logps_skips_soft_prompt_positions() -> None:
    logits, labels = batch()
    virtual = torch.randn(3, 4, 11, dtype=torch.float64)  # prompt tuning prepends 4 virtual positions
    torch.testing.assert_close(sequence_logps(torch.cat([virtual, logits], dim=1), labels, average=True),
                               sequence_logps(logits, labels, average=True))


def test_sequence_logps_equals_trl_get_batch_logps(trl) -> None:
    from trl.experimental.cpo import CPOTrainer
    logits, labels = batch(seed=1)
    for average in (False, True):
        expected = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=average)
        torch.testing.assert_close(sequence_logps(logits, labels, average), expected, atol=1e-9, rtol=1e-9)


def test_sequence_logps_in_float32_from_bf16_logits() -> None:
    logits, labels = batch(dtype=torch.bfloat16)
    got = sequence_logps(logits, labels, average=False)
    assert got.dtype == torch.float32
    close(got, hand_logps(logits.double(), labels, False), 1e-5)


def test_sequence_logps_refuses_a_row_without_answer_tokens() -> None:
    logits, labels = batch()
    labels[1, 1:] = IGNORE_INDEX
    with pytest.raises(ValueError, match=r"rows \[1\] .* no answer token"):
        sequence_logps(logits, labels, average=False)


def test_sequence_logps_keeps_only_answer_positions_for_backward() -> None:
    """Autograd saves a [answer tokens, vocab] tensor at most, not a log-softmax of every position; the
    gradient reaches the answer positions only."""
    vocab = 1000
    logits = torch.randn(2, 50, vocab, requires_grad=True)
    labels = torch.full((2, 50), IGNORE_INDEX)
    labels[0, 40:45] = 1  # 5 + 5 answer tokens among 98 positions
    labels[1, 10:15] = 2
    storages: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = sequence_logps(logits, labels, average=False)
    storages.pop(logits.untyped_storage().data_ptr(), None)  # the model's own output is kept anyway
    answer_bytes = 10 * vocab * 4  # float32; a log-softmax of every position would be 2 * 49 * vocab * 4
    assert sum(storages.values()) <= answer_bytes + 4096, storages
    out.sum().backward()
    touched = logits.grad.abs().sum(-1) != 0
    assert touched.nonzero().tolist() == [[0, p] for p in range(39, 44)] + [[1, p] for p in range(9, 14)]


# -- each loss equals its paper's closed form ------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_closed_form(eps: float) -> None:
    beta = 0.3
    out = dpo(t(PC), t(PR), t(RC), t(RR), beta=beta, label_smoothing=eps)
    h = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]
    close(out.losses, [-(1 - eps) * log_sigmoid(beta * x) - eps * log_sigmoid(-beta * x) for x in h])
    close(out.chosen_rewards, [beta * (pc - rc) for pc, rc in zip(PC, RC)])
    close(out.rejected_rewards, [beta * (pr - rr) for pr, rr in zip(PR, RR)])
    close(out.chosen_logps, PC)


def test_ipo_closed_form_on_averaged_logps() -> None:
    tau = 0.25
    pc, pr, rc, rr = avg(PC, LEN_C), avg(PR, LEN_R), avg(RC, LEN_C), avg(RR, LEN_R)
    out = ipo(t(pc), t(pr), t(rc), t(rr), beta=tau)
    close(out.losses, [((a - c) - (b - d) - 1 / (2 * tau)) ** 2 for a, b, c, d in zip(pc, pr, rc, rr)])
    close(out.chosen_rewards, [tau * (a - c) for a, c in zip(pc, rc)])
    close(out.rejected_rewards, [tau * (b - d) for b, d in zip(pr, rr)])


def test_simpo_closed_form() -> None:
    beta, gamma = 2.0, 1.2
    c, r = avg(PC, LEN_C), avg(PR, LEN_R)
    out = simpo(t(c), t(r), beta=beta, gamma=gamma)
    close(out.losses, [-log_sigmoid(beta * a - beta * b - gamma) for a, b in zip(c, r)])
    close(out.chosen_rewards, [beta * a for a in c])
    close(out.rejected_rewards, [beta * b for b in r])


def test_orpo_closed_form() -> None:
    lam = 0.1
    c, r = avg(PC, LEN_C), avg(PR, LEN_R)
    out = orpo(t(c), t(r), lambda_=lam)

    def odds(logp: float) -> float:
        return math.exp(logp) / (1 - math.exp(logp))

    log_odds = [math.log(odds(a) / odds(b)) for a, b in zip(c, r)]
    close(out.losses, [-a - lam * log_sigmoid(x) for a, x in zip(c, log_odds)])
    close(out.extras["log_odds"], log_odds)
    close(out.extras["nll"], [-a for a in c])
    close(out.chosen_rewards, [lam * a for a in c])


# -- each loss equals TRL 1.16's code on the same inputs ------------------------------------------------------

class _Accelerator:
    """What TRL's loss code asks of accelerate on one process."""
    device = torch.device("cpu")

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather


def trl_dpo_trainer_loss(loss_type: str, beta: float, rows: list[int]) -> tuple[float, dict]:
    """trl.DPOTrainer._compute_loss (1.16: the losses are written inline there) on the pairs `rows`, with the
    policy's per-token log-probs from a stand-in model and the reference's passed precomputed, as TRL does
    with precompute_ref_logps. Returns TRL's loss (the mean over pairs) and the metrics it logged."""
    from trl import DPOTrainer
    n, width = len(rows), max(LEN_C + LEN_R) + 1
    lengths = [LEN_C[i] for i in rows] + [LEN_R[i] for i in rows]
    sums = [PC[i] for i in rows] + [PR[i] for i in rows]  # the batch is [chosen..., rejected...]
    completion_mask = torch.zeros(2 * n, width, dtype=torch.long)
    log_probs = torch.zeros(2 * n, width - 1, dtype=torch.float64)
    for k, (length, total) in enumerate(zip(lengths, sums)):
        completion_mask[k, 1:1 + length] = 1  # token 0 is the prompt
        log_probs[k, :length] = total / length  # the model's per-token log-probs, 0 off the completion
    zeros = torch.zeros_like(log_probs)

    class Model:
        training = True

        def __call__(self, **kwargs):
            return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    model = Model()
    trainer = SimpleNamespace(
        model=model, accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
        use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * n, width, dtype=torch.long), "attention_mask": torch.ones(2 * n, width),
              "completion_mask": completion_mask, "ref_chosen_logps": t([RC[i] for i in rows]),
              "ref_rejected_logps": t([RR[i] for i in rows])}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return float(loss), {key: values[0] for key, values in trainer._metrics["train"].items()}


def test_dpo_equals_trl_dpo_trainer_sigmoid(trl) -> None:
    beta = 0.3
    ours = dpo(t(PC), t(PR), t(RC), t(RR), beta=beta, label_smoothing=0.0)
    for i in range(4):  # TRL reduces to a mean; one pair at a time gives its per-pair values
        loss, logged = trl_dpo_trainer_loss("sigmoid", beta, [i])
        assert ours.losses[i].item() == pytest.approx(loss, abs=1e-6)
        assert ours.chosen_rewards[i].item() == pytest.approx(logged["rewards/chosen"], abs=1e-6)
        assert ours.rejected_rewards[i].item() == pytest.approx(logged["rewards/rejected"], abs=1e-6)
    loss, logged = trl_dpo_trainer_loss("sigmoid", beta, [0, 1, 2, 3])
    assert ours.losses.mean().item() == pytest.approx(loss, abs=1e-6)
    means = metric_means(metric_sums(ours))
    for ours_key, trl_key in [("reward_accuracy", "rewards/accuracies"), ("reward_margin", "rewards/margins"),
                              ("chosen_logps", "logps/chosen"), ("rejected_logps", "logps/rejected")]:
        assert means[ours_key] == pytest.approx(logged[trl_key], abs=1e-6), ours_key


def test_ipo_equals_trl_dpo_trainer_ipo(trl) -> None:
    """TRL sums the log-probs and divides the log-ratios by the completion lengths inside the loss; the same
    loss here takes averaged log-probs. TRL logs rewards from the summed log-ratios: ours x length."""
    tau = 0.25
    ours = ipo(t(avg(PC, LEN_C)), t(avg(PR, LEN_R)), t(avg(RC, LEN_C)), t(avg(RR, LEN_R)), beta=tau)
    for i in range(4):
        loss, logged = trl_dpo_trainer_loss("ipo", tau, [i])
        assert ours.losses[i].item() == pytest.approx(loss, abs=1e-6)
        assert ours.chosen_rewards[i].item() * LEN_C[i] == pytest.approx(logged["rewards/chosen"], abs=1e-6)
        assert ours.rejected_rewards[i].item() * LEN_R[i] == pytest.approx(logged["rewards/rejected"], abs=1e-6)
    loss, _ = trl_dpo_trainer_loss("ipo", tau, [0, 1, 2, 3])
    assert ours.losses.mean().item() == pytest.approx(loss, abs=1e-6)


def trl_cpo_loss(loss_type: str, beta: float, chosen: torch.Tensor, rejected: torch.Tensor,
                 label_smoothing: float = 0.0, simpo_gamma: float = 0.0) -> tuple[torch.Tensor, ...]:
    """trl.experimental.cpo.CPOTrainer.cpo_loss, unbound, on a stand-in holding the attributes it reads."""
    from trl.experimental.cpo import CPOTrainer
    trainer = SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                              simpo_gamma=simpo_gamma, accelerator=_Accelerator())
    return CPOTrainer.cpo_loss(trainer, chosen, rejected)


def test_conservative_dpo_equals_trl_sigmoid_with_label_smoothing(trl) -> None:
    """TRL 1.16's DPOTrainer no longer smooths its sigmoid loss; CPOTrainer's sigmoid loss still does, on
    logits = chosen - rejected: fed the log-ratios to the reference, it is conservative DPO."""
    beta, eps = 0.3, 0.2
    ours = dpo(t(PC), t(PR), t(RC), t(RR), beta=beta, label_smoothing=eps)
    losses, _, _ = trl_cpo_loss("sigmoid", beta, t(PC) - t(RC), t(PR) - t(RR), label_smoothing=eps)
    torch.testing.assert_close(ours.losses, losses, atol=1e-6, rtol=0)


def test_simpo_equals_trl_cpo_simpo(trl) -> None:
    beta, gamma = 2.0, 1.2
    c, r = t(avg(PC, LEN_C)), t(avg(PR, LEN_R))
    ours = simpo(c, r, beta=beta, gamma=gamma)
    losses, chosen_rewards, rejected_rewards = trl_cpo_loss("simpo", beta, c, r, simpo_gamma=gamma)
    for got, expected in [(ours.losses, losses), (ours.chosen_rewards, chosen_rewards),
                          (ours.rejected_rewards, rejected_rewards)]:
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_orpo_equals_trl_odds_ratio_loss(trl) -> None:
    """The odds-ratio term, log-odds and rewards equal TRL's odds_ratio_loss (in float32, as TRL casts); the
    total is TRL's `nll - losses.mean()` where its NLL (a token mean over the batch's chosen answers) equals
    the mean of per-pair NLLs: all chosen answers equally long."""
    from trl.experimental.orpo import ORPOTrainer
    lam = 0.1
    c, r = t(avg(PC, LEN_C)), t(avg(PR, LEN_R))
    ours = orpo(c, r, lambda_=lam)
    trainer = SimpleNamespace(beta=lam, accelerator=_Accelerator())
    or_losses, chosen_rewards, rejected_rewards, _, mean_log_odds = ORPOTrainer.odds_ratio_loss(trainer, c, r)
    torch.testing.assert_close(ours.losses - ours.extras["nll"], -or_losses.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards.double(), atol=1e-6, rtol=0)
    assert ours.extras["log_odds"].mean().item() == pytest.approx(mean_log_odds.item(), abs=1e-5)

    logits = torch.randn(4, 6, 9, dtype=torch.float64)
    labels = torch.randint(0, 9, (4, 6))
    labels[:, :2] = IGNORE_INDEX  # every chosen answer is 4 tokens
    chosen = sequence_logps(logits, labels, average=True)
    trl_nll = F.cross_entropy(logits[:, :-1].reshape(-1, 9), labels[:, 1:].reshape(-1))  # TRL's rule
    total = orpo(chosen, r, lambda_=lam).losses.mean()
    or_losses, *_ = ORPOTrainer.odds_ratio_loss(trainer, chosen, r)
    assert total.item() == pytest.approx((trl_nll - or_losses.mean()).item(), abs=1e-6)


# -- gradients, edges, registry, metrics -------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_reach_the_policy_only(name: str) -> None:
    spec = LOSSES[name]
    policy = [t(PC).div(10).requires_grad_(), t(PR).div(10).requires_grad_()]
    refs = [t(RC).div(10).requires_grad_(), t(RR).div(10).requires_grad_()] if spec.needs_reference else []
    spec(*policy, *refs).losses.sum().backward()
    for p in policy:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().min() > 0
    for ref in refs:
        assert ref.grad is None
    out = spec(*policy, *refs)
    for value in [out.chosen_rewards, out.rejected_rewards, out.chosen_logps, *out.extras.values()]:
        assert not value.requires_grad
    # The gradient is the loss's own (a term cut off from autograd, such as a detached NLL, fails here).
    assert torch.autograd.gradcheck(lambda c, r: spec(c, r, *refs).losses, policy)


def test_orpo_stays_finite_when_the_model_is_certain() -> None:
    """A mean log-prob of exactly 0 (every answer token at probability 1.0 in float32) has infinite odds."""
    chosen = torch.tensor([0.0, -0.5], requires_grad=True)
    rejected = torch.tensor([-1.0, 0.0], requires_grad=True)
    out = orpo(chosen, rejected, lambda_=0.1)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(chosen.grad).all()
    assert torch.isfinite(rejected.grad).all()


def test_registry_says_what_a_trainer_needs() -> None:
    """needs_reference follows each function's signature; averages is TRL's choice for each loss (DPO sums,
    IPO/SimPO/ORPO average over answer tokens); params are the functions' keyword arguments."""
    assert {name: (s.needs_reference, s.averages) for name, s in LOSSES.items()} == {
        "dpo": (True, False), "ipo": (True, True), "simpo": (False, True), "orpo": (False, True)}
    for name, spec in LOSSES.items():
        arguments = inspect.signature(spec.fn).parameters
        assert ("ref_chosen" in arguments) == spec.needs_reference, name
        assert set(spec.params) == {a for a, p in arguments.items() if p.kind is p.KEYWORD_ONLY}, name


def test_registry_call_uses_defaults_and_refuses_what_does_not_fit() -> None:
    got = LOSSES["dpo"](t(PC), t(PR), t(RC), t(RR), beta=0.5)
    torch.testing.assert_close(got.losses, dpo(t(PC), t(PR), t(RC), t(RR), beta=0.5, label_smoothing=0.0).losses)
    torch.testing.assert_close(LOSSES["simpo"](t(PC), t(PR)).losses, simpo(t(PC), t(PR), beta=2.0, gamma=1.0).losses)
    with pytest.raises(ValueError, match=r"no hyper-parameter \['gamma'\]; it takes \['beta', 'label_smoothing'\]"):
        LOSSES["dpo"](t(PC), t(PR), t(RC), t(RR), gamma=1.0)
    with pytest.raises(ValueError, match="needs the reference"):
        LOSSES["ipo"](t(PC), t(PR))
    with pytest.raises(ValueError, match="needs the reference"):
        LOSSES["dpo"](t(PC), t(PR), t(RC))
    with pytest.raises(ValueError, match="uses no reference"):
        LOSSES["orpo"](t(PC), t(PR), t(RC), t(RR))


@pytest.mark.parametrize("call, message", [
    (lambda: dpo(t(PC), t(PR), t(RC), t(RR), beta=0.1, label_smoothing=0.5), "label_smoothing must lie in"),
    (lambda: ipo(t(PC), t(PR), t(RC), t(RR), beta=0.0), "beta must be > 0"),
    (lambda: orpo(t(PC), t(PR), lambda_=-1.0), "lambda must be >= 0"),
])
def test_hyper_parameters_out_of_range_are_refused(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_metrics_sum_over_batches_and_average_over_pairs() -> None:
    rewards_c, rewards_r = [0.5, -0.2, 0.0, 1.0], [0.1, 0.3, 0.0, -1.0]  # a tie (0 == 0) is not a success
    out = LossOutput(t([1.0] * 4), t(rewards_c), t(rewards_r), t(PC), t(PR), extras={"nll": t([1.0, 2.0, 3.0, 4.0])})
    means = metric_means(metric_sums(out))
    assert means == pytest.approx({
        "reward_accuracy": 0.5, "reward_margin": (0.4 - 0.5 + 0.0 + 2.0) / 4, "chosen_reward": 1.3 / 4,
        "rejected_reward": -0.6 / 4, "chosen_logps": sum(PC) / 4, "rejected_logps": sum(PR) / 4, "nll": 2.5})

    def half(rows: slice) -> dict[str, float]:
        return metric_sums(LossOutput(out.losses[rows], out.chosen_rewards[rows], out.rejected_rewards[rows],
                                      out.chosen_logps[rows], out.rejected_logps[rows],
                                      {"nll": out.extras["nll"][rows]}))

    first, second = half(slice(0, 1)), half(slice(1, 4))
    assert metric_means({k: first[k] + second[k] for k in first}) == pytest.approx(means)
