import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.config import DataConfig, TrainConfig
from tunesmith.data.batching import Batches
from tunesmith.data.dataset import prepare_data
from tunesmith.objectives.sft import SFTObjective
from tunesmith.training.loop import train_step


@pytest.fixture
def tok(tiny_model):
    """The tiny model's own tokenizer (the Qwen2 layout has a byte-level one)."""
    return AutoTokenizer.from_pretrained(tiny_model)


def examples(tok, path):
    return prepare_data(DataConfig(train=str(path), eval=None, max_length=64), tok, 0).train


def loss_sum(model, batches):
    obj = SFTObjective()
    total, count = 0.0, 0
    for b in batches.one_pass():
        loss, _ = obj(model, b)
        total += float(loss.detach())
        count += obj.count(b)
    return total, count


def test_packed_equals_unpacked(tiny_model, tok, pc_data):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    exs = examples(tok, pc_data)
    packed = Batches(exs, 4, 64, tok.pad_token_id, packing=True, seed=0)
    unpacked = Batches(exs, 4, 64, tok.pad_token_id, packing=False, seed=0)
    assert (
        packed.micro_batches_per_epoch() < unpacked.micro_batches_per_epoch()
    )  # packing really put several examples in a row
    assert max(len(r) for rows in packed.plan(0) for r in rows) > 1
    (lp, cp), (lu, cu) = loss_sum(model, packed), loss_sum(model, unpacked)
    assert cp == cu
    assert lp == pytest.approx(lu, rel=1e-5)


def test_fast_head_equals_full_forward(tiny_model, tok, pc_data):
    from tunesmith.data.tokenize import IGNORE

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    b = Batches(examples(tok, pc_data), 4, 64, tok.pad_token_id, packing=True, seed=0)
    batch = next(b.stream())
    loss, _ = SFTObjective()(model, batch)
    logits = model(**batch.model_inputs(), use_cache=False).logits  # a cache disables packed masks
    ref = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)


def test_accumulation_invariance_8x1_equals_1x8(tiny_model, tok, pc_data):
    exs = examples(tok, pc_data)
    grads = []
    cfg = TrainConfig(max_grad_norm=None, precision="fp32")
    for batch_size, accum in ((8, 1), (1, 8)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        stream = Batches(exs, batch_size, 64, tok.pad_token_id, packing=False, seed=0).stream()
        micro = [next(stream) for _ in range(accum)]
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=1.0)  # the update is minus the gradient
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
        train_step(model, SFTObjective(), micro, opt, sched, params, cfg, torch.device("cpu"))
        grads.append({n: before[n] - p.detach() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)
