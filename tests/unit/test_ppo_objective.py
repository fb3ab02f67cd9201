"""The policy objective (objectives/ppo.py) on a real tiny model: its loss and gradient against
the policy-gradient formula, micro-batch splits that change nothing, and a short GRPO run that
raises the reward."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.config import TrainConfig
from tunesmith.methods import build_method, method_config
from tunesmith.objectives.ppo import ClippedPolicyObjective, RLBatch
from tunesmith.objectives.rl import clipped_value_loss, group_normalised, kl_k3
from tunesmith.training.loop import train_step
from tunesmith.training.rollout import response_logps, rollout

PROMPTS = ["What is 1 plus 2?", "Hi", "Say something long, please.", "x"]


def lora_policy(path, seed=0):
    torch.manual_seed(seed)
    method = build_method(method_config("lora", rank=4, alpha=8))
    model = method.apply(AutoModelForCausalLM.from_pretrained(path))
    with torch.no_grad():
        for _, p in method.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, method


@pytest.fixture(scope="module")
def tok(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["llama"])


def make_batch(model, method, tok, n_per_prompt=2, seed=0):
    out = rollout(
        model,
        tok,
        [p for p in PROMPTS for _ in range(n_per_prompt)],
        max_new_tokens=6,
        temperature=1.0,
        generator=torch.Generator().manual_seed(seed),
    )
    scores = torch.tensor([float(len(c)) for c in out.completions])
    R = out.response_ids.shape[1]
    with torch.no_grad(), method.disable():
        ref, _ = response_logps(model, out.input_ids, out.attention_mask, R)
    return RLBatch.from_rollout(
        out, group_normalised(scores, n_per_prompt), ref_logps=ref * out.response_mask
    )


def grads(method):
    return torch.cat([p.grad.flatten() for _, p in method.trainable_parameters()])


def test_at_the_sampling_policy_the_loss_is_the_policy_gradient(llama, tok):
    """rho = 1 everywhere, so L = -sum A_t rho_t + beta sum k3, and dL = -sum A_t dlog pi(y_t) +
    beta d k3: the REINFORCE gradient with a KL term."""
    model, method = lora_policy(llama)
    batch = make_batch(model, method, tok)
    obj = ClippedPolicyObjective(kl_coef=0.1)
    loss, metrics = obj(model, batch)
    loss.backward()
    ours = grads(method)
    method.model.zero_grad()
    m = batch.response_mask
    logps, _ = response_logps(model, batch.input_ids, batch.attention_mask, m.shape[1])
    kl = (kl_k3(logps, batch.ref_logps) * m).sum()
    assert loss.item() == pytest.approx(-(batch.advantages * m).sum().item() + 0.1 * kl.item())
    surrogate = -(batch.advantages * logps * m).sum() + 0.1 * kl  # same gradient
    surrogate.backward()
    torch.testing.assert_close(ours, grads(method), rtol=1e-4, atol=1e-6)
    assert metrics["clip_frac"] == 0 and metrics["approx_kl"] == pytest.approx(0.0, abs=1e-4)
    assert metrics["kl_ref"] > 0  # the perturbed LoRA is not the base
    assert obj.count(batch) == int(m.sum()) and m.sum() < m.numel()  # some responses ended


def test_one_batch_equals_its_micro_batches(llama, tok):
    """batch 8 x accumulation 1 and batch 1 x accumulation 8 give the same gradient: the loop
    divides by the response tokens of the whole step."""
    model, method = lora_policy(llama)
    batch = make_batch(model, method, tok)
    # Move the policy away from pi_old so that clipping is active on some tokens.
    with torch.no_grad():
        for _, p in method.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.2)
    obj = ClippedPolicyObjective(clip_eps=0.1, kl_coef=0.05, entropy_coef=0.01)
    start = {n: p.detach().clone() for n, p in method.trainable_parameters()}

    def step(micro):
        """One train_step with SGD at lr 1: the update is minus the gradient."""
        params = [p for _, p in method.trainable_parameters()]
        opt = torch.optim.SGD(params, lr=1.0)
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
        cfg = TrainConfig(max_grad_norm=None, precision="fp32")
        result = train_step(model, obj, micro, opt, sched, params, cfg, torch.device("cpu"))
        update = {n: start[n] - p.detach() for n, p in method.trainable_parameters()}
        with torch.no_grad():
            for n, p in method.trainable_parameters():
                p.copy_(start[n])
        return result, update

    whole, g_whole = step([batch])
    split, g_split = step([batch.select([i]) for i in range(len(batch))])
    assert split.loss == pytest.approx(whole.loss, rel=1e-4)
    assert whole.metrics["clip_frac"] > 0
    for k in whole.metrics:
        assert split.metrics[k] == pytest.approx(whole.metrics[k], rel=1e-4, abs=1e-6), k
    for n, g in g_whole.items():
        torch.testing.assert_close(g_split[n], g, rtol=1e-3, atol=1e-6)


def test_value_term(llama, tok):
    model, method = lora_policy(llama)
    batch = make_batch(model, method, tok)
    m = batch.response_mask.float()
    g = torch.Generator().manual_seed(0)
    batch.returns = torch.randn(m.shape, generator=g) * m
    batch.old_values = torch.randn(m.shape, generator=g) * m
    v = torch.randn(m.shape, generator=g, requires_grad=True)
    with_value = ClippedPolicyObjective(value_fn=lambda model, batch: v, value_coef=0.5)
    loss, metrics = with_value(model, batch)
    plain, _ = ClippedPolicyObjective()(model, batch)
    expected_v, _ = clipped_value_loss(v, batch.old_values, batch.returns, m, 0.2)
    assert loss.item() == pytest.approx(plain.item() + 0.5 * expected_v.item(), rel=1e-5)
    assert metrics["value_loss"] == pytest.approx(expected_v.item())
    batch.returns = None
    with pytest.raises(ValueError, match="returns and old_values"):
        with_value(model, batch)


def test_a_short_grpo_run_raises_the_reward(llama, tok):
    """GRPO end to end on the tiny model: rollouts, a reward on the text, group advantages,
    the clipped objective through the loop's accumulation: the share of lowercase letters in the
    responses goes up."""
    torch.manual_seed(0)
    method = build_method(method_config("full"))  # a random model's LoRA learns too slowly
    model = method.apply(AutoModelForCausalLM.from_pretrained(llama))
    params = [p for _, p in method.trainable_parameters()]
    opt = torch.optim.Adam(params, lr=3e-2)
    sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
    cfg = TrainConfig(max_grad_norm=None, precision="fp32")
    g = torch.Generator().manual_seed(0)
    obj = ClippedPolicyObjective()

    def reward(texts):  # share of lowercase letters (about a quarter of the tiny vocabulary)
        return torch.tensor([sum(c.islower() for c in t) / max(len(t), 1) for t in texts])

    history = []
    for _ in range(10):
        out = rollout(
            model, tok, [p for p in PROMPTS for _ in range(8)], 6, temperature=1.0, generator=g
        )
        scores = reward(out.completions)
        history.append(float(scores.mean()))
        batch = RLBatch.from_rollout(out, group_normalised(scores, 8))
        for _ in range(4):  # PPO epochs over the rollout
            train_step(model, obj, [batch], opt, sched, params, cfg, torch.device("cpu"))
    assert history[0] < 0.4 and sum(history[-3:]) / 3 > 0.8, history
