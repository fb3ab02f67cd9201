"""The RL maths (objectives/rl.py) against hand-computed values, and end to end on toy problems
whose optimal policy is known."""

import json
import math

import pytest
import torch

from tunesmith.objectives.rl import (
    GROUP_ADVANTAGES,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    group_centred,
    group_normalised,
    kl_controller,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalised_rewards,
    leave_one_out,
    masked_mean,
    masked_var,
    whiten,
)
from tunesmith.training.rollout import sample_tokens


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype))


# ---------------------------------------------------------------------------------------------
# Masked helpers


def test_masked_mean_and_var_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, -50.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    assert masked_mean(x, m, dim=1).tolist() == pytest.approx([1.5, 3.0])
    assert masked_var(x, m).item() == pytest.approx(1.0)  # {1, 2, 3}: Bessel-corrected var 1
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(2 / 3)


def test_whiten_gives_zero_mean_unit_variance_on_the_mask():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g) * 3 + 2
    m = torch.ones(4, 6)
    m[0, 3:] = 0
    m[2, 1:] = 0
    w = whiten(x, m)
    assert masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(w, m).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(w[m == 0] == 0)
    scaled = whiten(x, m, shift_mean=False)
    assert masked_mean(scaled, m).item() == pytest.approx(masked_mean(x, m).item(), abs=1e-5)
    x2 = x.clone()
    x2[m == 0] = 1e6  # padding values must not leak in
    assert torch.allclose(whiten(x2, m), w)


# ---------------------------------------------------------------------------------------------
# KL estimators


def test_kl_estimators_match_their_formulas():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    s = [0.5, -1.0, 0.0]  # log pi - log ref
    assert kl_k1(logp, ref).tolist() == pytest.approx(s)
    assert kl_k2(logp, ref).tolist() == pytest.approx([0.125, 0.5, 0.0])
    # k3 = (r - 1) - log r, r = ref / pi = exp(-s)
    assert kl_k3(logp, ref).tolist() == pytest.approx([math.exp(-x) - 1 + x for x in s], rel=1e-6)
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_k1_and_k3_are_unbiased_and_k3_non_negative():
    """Sample means under q approach the exact KL[q || p] (k2 is biased: only close)."""
    q = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p = torch.tensor([0.3, 0.3, 0.2, 0.2])
    exact = float((q * (q / p).log()).sum())
    x = torch.multinomial(q, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logq, logp = q.log()[x], p.log()[x]
    assert kl_k1(logq, logp).mean().item() == pytest.approx(exact, rel=0.03)
    assert kl_k3(logq, logp).mean().item() == pytest.approx(exact, rel=0.03)
    assert kl_k2(logq, logp).mean().item() == pytest.approx(exact, rel=0.25)
    assert (kl_k3(logq, logp) >= 0).all() and (kl_k1(logq, logp) < 0).any()


def test_kl_penalised_rewards_put_the_score_on_the_last_response_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -7.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = kl_penalised_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, 0.1, "k1")
    close(kl, [[0.5, -1.0, 0.0], [0.0, 1.0, 0.0]])
    close(rewards, [[-0.05, 0.1, 2.0], [0.0, -0.1 - 1.0, 0.0]])
    r2, kl2 = kl_penalised_rewards(torch.tensor([0.0, 0.0]), logp, ref, mask, 1.0, "k2")
    close(kl2, [[0.125, 0.5, 0.0], [0.0, 0.5, 0.0]])
    close(r2, -kl2)
    with pytest.raises(ValueError, match="no tokens"):
        kl_penalised_rewards(torch.zeros(2), logp, ref, torch.zeros_like(mask), 0.1)


# ---------------------------------------------------------------------------------------------
# KL controllers


def test_adaptive_kl_controller_follows_ziegler():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    c.update(9.0, 256)  # KL / target - 1 = 0.5, clipped to 0.2
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    v = c.value
    c.update(5.4, 100)  # -0.1, inside the clip
    assert c.value == pytest.approx(v * (1 - 0.1 * 100 / 10_000))
    v = c.value
    c.update(0.0, 1000)  # -1, clipped to -0.2
    assert c.value == pytest.approx(v * (1 - 0.2 * 1000 / 10_000))
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 10_000)
    assert fixed.value == 0.05
    assert isinstance(kl_controller("adaptive", 0.1, 6.0, 10_000), AdaptiveKLController)
    with pytest.raises(ValueError, match="unknown KL controller"):
        kl_controller("pid", 0.1)


@pytest.mark.parametrize("kind", ["fixed", "adaptive"])
def test_kl_controller_resumes_exactly_through_json(kind):
    kls = [7.3, 1.2, 6.01, 12.0, 0.3, 5.5]
    straight = kl_controller(kind, 0.123, 6.0, 777)
    for kl in kls:
        straight.update(kl, 64)
    first = kl_controller(kind, 0.123, 6.0, 777)
    for kl in kls[:3]:
        first.update(kl, 64)
    saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = kl_controller(kind, 999.0, 1.0, 1)
    resumed.load_state_dict(saved)
    for kl in kls[3:]:
        resumed.update(kl, 64)
    assert resumed.value == straight.value  # bit for bit


# ---------------------------------------------------------------------------------------------
# GAE


def test_gae_against_hand_computation():
    """gamma 0.9, lambda 0.8; row 0 has 3 response tokens and one padding position (whose
    reward and value must be ignored), row 1 has 2.

    row 0, backwards:  t=2: delta = 1.0 + 0 - 0.3 = 0.7,                A = 0.7
                       t=1: delta = -0.2 + 0.9*0.3 - 0.4 = -0.33,       A = -0.33 + 0.72*0.7 = 0.174
                       t=0: delta = 0.1 + 0.9*0.4 - 0.5 = -0.04,        A = -0.04 + 0.72*0.174 = 0.08528
    row 1:             t=1: delta = 2.0 - 1.0 = 1.0,                    A = 1.0
                       t=0: delta = 0 + 0.9*1.0 - 0.5 = 0.4,            A = 0.4 + 0.72*1.0 = 1.12
    """
    rewards = torch.tensor([[0.1, -0.2, 1.0, 5.0], [0.0, 2.0, 7.0, 7.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0], [0.5, 1.0, 3.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert adv.tolist() == [
        pytest.approx([0.08528, 0.174, 0.7, 0.0]),
        pytest.approx([1.12, 1.0, 0.0, 0.0]),
    ]
    assert ret.tolist() == [
        pytest.approx([0.58528, 0.574, 1.0, 0.0]),
        pytest.approx([1.62, 2.0, 0.0, 0.0]),
    ]


def test_gae_with_lambda_one_is_the_monte_carlo_return():
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    future = (rewards * mask).flip(-1).cumsum(-1).flip(-1) * mask  # sum of rewards from t on
    assert torch.allclose(ret, future, atol=1e-6)
    assert torch.allclose(adv, (future - values) * mask, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Clipped losses


def test_clipped_policy_loss_against_hand_values_and_gradients():
    """eps 0.2. Token by token (rho = exp(logp - old)):
    rho e^0.5 = 1.6487, A=+2:  min(3.2974, 1.2*2 = 2.4) = 2.4       -> loss -2.4, clipped (no grad)
    rho e^-0.5 = 0.6065, A=+2: min(1.2131, 0.8*2 = 1.6) = 1.2131    -> loss -1.2131, unclipped
    rho e^0.5, A=-1:           min(-1.6487, -1.2) = -1.6487         -> loss 1.6487, unclipped
    rho e^-0.5, A=-1:          min(-0.6065, -0.8) = -0.8            -> loss 0.8, clipped (no grad)
    a fifth, masked token contributes nothing."""
    old = torch.zeros(1, 5)
    logp = torch.tensor([[0.5, -0.5, 0.5, -0.5, 3.0]], requires_grad=True)
    adv = torch.tensor([[2.0, 2.0, -1.0, -1.0, 10.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, metrics = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    e, ie = math.exp(0.5), math.exp(-0.5)
    assert loss.item() == pytest.approx(-2.4 - 2 * ie + e + 0.8, rel=1e-6)
    loss.backward()
    # d/dlogp of -A * rho = -A * rho on unclipped tokens, 0 on clipped and masked ones.
    assert logp.grad.tolist() == [pytest.approx([0.0, -2 * ie, e, 0.0, 0.0])]
    assert metrics["clip_frac"] == 2.0
    assert metrics["ratio"] == pytest.approx(2 * e + 2 * ie)
    assert metrics["approx_kl"] == pytest.approx(2 * (ie - 1 + 0.5) + 2 * (e - 1 - 0.5))


def test_policy_loss_at_ratio_one_is_the_policy_gradient():
    g = torch.Generator().manual_seed(2)
    logp = torch.randn(2, 4, generator=g).requires_grad_()
    adv = torch.randn(2, 4, generator=g)
    mask = torch.ones(2, 4)
    loss, metrics = clipped_policy_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(-adv.sum().item(), abs=1e-6)
    assert torch.allclose(logp.grad, -adv)
    assert metrics["clip_frac"] == 0 and metrics["approx_kl"] == pytest.approx(0.0, abs=1e-7)


def test_clipped_value_loss_against_hand_values():
    """clip 0.5.  V=2.0, V_old=1.0, G=3.0: clipped V 1.5; max((2-3)^2, (1.5-3)^2) = 2.25 (clipped)
                 V=1.2, V_old=1.0, G=0.0: inside the clip; max(1.44, 1.44) = 1.44
                 V=0.0, V_old=1.0, G=0.2: clipped V 0.5; max(0.04, 0.09) = 0.09 (clipped)
    loss = 0.5 * (2.25 + 1.44 + 0.09) = 1.89."""
    v = torch.tensor([[2.0, 1.2, 0.0, 4.0]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    ret = torch.tensor([[3.0, 0.0, 0.2, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, metrics = clipped_value_loss(v, old, ret, mask, clip=0.5)
    assert loss.item() == pytest.approx(1.89)
    assert metrics["value_clip_frac"] == 2.0
    loss.backward()
    assert v.grad.tolist() == [pytest.approx([0.0, 1.2, 0.0, 0.0])]


def test_entropy_from_logits():
    assert entropy_from_logits(torch.zeros(3, 8)).tolist() == pytest.approx([math.log(8)] * 3)
    p = torch.tensor([0.7, 0.2, 0.1])
    assert entropy_from_logits(p.log()).item() == pytest.approx(float(-(p * p.log()).sum()))


# ---------------------------------------------------------------------------------------------
# Group advantages


SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0])  # two prompts x 4 responses


def test_group_normalised_advantages_by_hand():
    # group 1: mean 0.5, std (Bessel) sqrt(1/3); group 2: mean 2.75, std sqrt(6.75 / 3) = 1.5
    s = math.sqrt(1 / 3)
    expected = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, -0.5, -0.5, -0.5, 1.5]
    assert group_normalised(SCORES, 4, eps=0.0).tolist() == pytest.approx(expected)
    assert group_normalised(SCORES, 4).tolist() == pytest.approx(expected, rel=1e-3)


def test_group_centred_and_leave_one_out_by_hand():
    assert group_centred(SCORES, 4).tolist() == pytest.approx(
        [0.5, -0.5, -0.5, 0.5, -0.75, -0.75, -0.75, 2.25]
    )
    # r_i - mean of the 3 others: 1 - 1/3, 0 - 2/3, ...; 2 - (2 + 2 + 5) / 3 = -1, 5 - 2 = 3
    assert leave_one_out(SCORES, 4).tolist() == pytest.approx(
        [2 / 3, -2 / 3, -2 / 3, 2 / 3, -1.0, -1.0, -1.0, 3.0]
    )
    assert set(GROUP_ADVANTAGES) == {"grpo", "grpo_no_std", "rloo"}


def test_equal_scores_give_zero_advantage_and_bad_groups_are_refused():
    for fn in GROUP_ADVANTAGES.values():
        assert fn(torch.full((6,), 0.7), 3, 1e-4).abs().max() < 1e-6
        with pytest.raises(ValueError, match="groups of 4"):
            fn(torch.zeros(6), 4, 1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out(torch.zeros(3), 1)


# ---------------------------------------------------------------------------------------------
# End to end: a two-token toy "language model" whose best response is known.
#
# The policy is a logits table (position t, token v): y_1 and y_2 are drawn independently. Token 0
# is the end token: a response that starts with it has one token (mask [1, 0]). The score is
# 0.5 [y_1 = 2] + 0.5 [y_2 = 1], so the optimal response is (2, 1) with score 1; the KL penalty is
# small enough that the regularised optimum still puts nearly all mass there.

VOCAB, END, BEST = 3, 0, (2, 1)


def toy_rollout(logits: torch.Tensor, n: int, g: torch.Generator):
    with torch.no_grad():
        y1 = sample_tokens(logits[0].expand(n, -1), torch.rand(n, generator=g), 1.0, 1.0)
        y2 = sample_tokens(logits[1].expand(n, -1), torch.rand(n, generator=g), 1.0, 1.0)
    tokens = torch.stack([y1, y2], dim=1)  # (n, 2)
    mask = torch.stack([torch.ones(n), (y1 != END).float()], dim=1)
    scores = 0.5 * (y1 == BEST[0]).float() + 0.5 * ((y2 == BEST[1]) & (y1 != END)).float()
    return tokens, mask, scores


def toy_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    table = torch.log_softmax(logits, -1)  # (2, V)
    return torch.stack([table[0, tokens[:, 0]], table[1, tokens[:, 1]]], dim=1)  # (n, 2)


def best_prob(logits: torch.Tensor) -> float:
    p = torch.softmax(logits.detach(), -1)
    return float(p[0, BEST[0]] * p[1, BEST[1]])


@pytest.mark.parametrize("controller", ["fixed", "adaptive"])
def test_ppo_pieces_learn_the_best_response(controller):
    torch.manual_seed(0)
    logits = torch.zeros(2, VOCAB, requires_grad=True)  # the policy
    values = torch.zeros(2, requires_grad=True)  # V(t): a value per position
    ref = torch.zeros(2, VOCAB)  # the reference: the starting policy
    opt = torch.optim.Adam([logits, values], lr=0.1)
    kl = kl_controller(controller, 0.02, target=0.5, horizon=1000)
    g = torch.Generator().manual_seed(0)
    start = best_prob(logits)
    for it in range(40):
        tokens, mask, scores = toy_rollout(logits, 32, g)
        iterations = it + 1
        with torch.no_grad():
            old_logps = toy_logps(logits, tokens)
            ref_logps = toy_logps(ref, tokens)
            old_values = values.expand(32, -1).clone()
            rewards, kls = kl_penalised_rewards(scores, old_logps, ref_logps, mask, kl.value)
            adv, ret = gae(rewards, old_values, mask, gamma=1.0, lam=0.95)
            adv = whiten(adv, mask)
        kl.update(float(kls.sum() / 32), 32)
        count = mask.sum()
        for _ in range(4):  # PPO epochs over the same rollout
            pl, m = clipped_policy_loss(toy_logps(logits, tokens), old_logps, adv, mask, 0.2)
            vl, _ = clipped_value_loss(values.expand(32, -1), old_values, ret, mask, 0.2)
            opt.zero_grad()
            ((pl + 0.5 * vl) / count).backward()
            opt.step()
        if best_prob(logits) > 0.9:
            break
    assert start == pytest.approx(1 / 9)
    assert best_prob(logits) > 0.9, (
        f"after {iterations} iterations p(best) = {best_prob(logits):.3f}"
    )
    # The value of position 0 learned the expected return (close to 1 near the optimum).
    assert values[0].item() > 0.5


@pytest.mark.parametrize("estimator", ["grpo", "grpo_no_std", "rloo"])
def test_group_pieces_learn_the_best_response(estimator):
    torch.manual_seed(0)
    logits = torch.zeros(2, VOCAB, requires_grad=True)
    ref = torch.zeros(2, VOCAB)
    opt = torch.optim.Adam([logits], lr=0.1)
    g = torch.Generator().manual_seed(0)
    prompts, group = 4, 8  # one toy "prompt" repeated: 4 groups of 8 responses
    for it in range(60):
        tokens, mask, scores = toy_rollout(logits, prompts * group, g)
        iterations = it + 1
        with torch.no_grad():
            old_logps = toy_logps(logits, tokens)
            adv = GROUP_ADVANTAGES[estimator](scores, group, 1e-4)[:, None].expand_as(mask)
        count = mask.sum()
        for _ in range(2):
            logps = toy_logps(logits, tokens)
            pl, _ = clipped_policy_loss(logps, old_logps, adv, mask, 0.2)
            kl = (kl_k3(logps, toy_logps(ref, tokens)) * mask).sum()
            opt.zero_grad()
            ((pl + 0.01 * kl) / count).backward()
            opt.step()
        if best_prob(logits) > 0.9:
            break
    assert best_prob(logits) > 0.9, (
        f"after {iterations} iterations p(best) = {best_prob(logits):.3f}"
    )
