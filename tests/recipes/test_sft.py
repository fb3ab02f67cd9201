"""End-to-end SFT runs on tiny models: artifacts, invariants, resume, CLI."""

import json

import pytest
import torch
from conftest import base_config, write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tunesmith
from tunesmith.builtin.tokenizer import build_tokenizer
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.methods import method_names
from tunesmith.models import load_for_inference


@pytest.mark.parametrize("method", method_names())
def test_one_step_changes_trainable_and_keeps_frozen(tiny_model, pc_data, tmp_path, method):
    from tunesmith.data.batching import Batches
    from tunesmith.data.dataset import prepare_data
    from tunesmith.objectives.sft import SFTObjective
    from tunesmith.pipeline import setup_model
    from tunesmith.training.loop import train_loop

    raw = base_config(
        tiny_model, pc_data, tmp_path, max_steps=2
    )  # LoRA A (and the prefix MLP's input side) move from step 2: the output side starts at 0
    # A 2-unit ReLU bottleneck (32 / 16) can start dead on every token of a random tiny model.
    raw["method"] = {"name": method, **({"bottleneck": 8} if method == "adapter" else {})}
    cfg = load_config(raw)
    model, tok, method_obj, _ = setup_model(cfg)
    device = torch.device("cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = prepare_data(cfg.data, tok, 0)
    train_loop(
        model,
        method_obj,
        SFTObjective(),
        Batches(data.train, 4, 64, tok.pad_token_id, method_obj.packing_ok, 0),
        None,
        cfg.train,
        tmp_path,
        device,
    )
    trainable = {n for n, _ in method_obj.trainable_parameters()}
    assert trainable
    for name, p in model.named_parameters():
        if name not in trainable:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
        else:
            assert not torch.equal(p, before[name]), f"{name} did not change"


def test_lora_run_artifacts_load_in_peft(tiny_model, pc_data, tmp_path):
    from peft import PeftModel

    out = tmp_path / "run"
    result = tunesmith.train(base_config(tiny_model, pc_data, out, max_steps=6))
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.yaml",
        "metrics.jsonl",
        "loss.svg",
        "report.md",
        "run.json",
        "tokenizer.json",
    ):
        assert (out / name).exists(), name
    assert load_config(out / "config.yaml") == load_config(
        base_config(tiny_model, pc_data, out, max_steps=6)
    )
    assert result.metrics["eval_loss"] > 0 and result.metrics["steps"] == 6
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 7))
    ours, tok, _ = load_for_inference(str(out), torch.device("cpu"))
    x = tok(["Add 3 and 4:"], return_tensors="pt")["input_ids"]
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), out
    ).eval()
    torch.testing.assert_close(peft_model(x).logits, ours(x).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(
        AutoModelForCausalLM.from_pretrained(tiny_model)(x).logits, ours(x).logits
    )


def test_full_run_loads_in_transformers_alone(llama, chat_data, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    cfg = base_config(llama, chat_data, out)
    cfg["method"] = "full"
    tunesmith.train(cfg)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == build_tokenizer().chat_template
    ours, _, _ = load_for_inference(str(out), torch.device("cpu"))
    x = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(model(x).logits, ours(x).logits)


def test_resume_equals_uninterrupted(llama, pc_data, tmp_path):
    def cfg(out, steps):
        c = base_config(llama, pc_data, out, max_steps=6, save_every=3, keep_checkpoints=5)
        c["method"]["dropout"] = 0.1  # RNG state must be restored too
        return c

    full = tmp_path / "full"
    tunesmith.train(cfg(full, 6))
    part = tmp_path / "part"
    # Stop after step 3: simulate by running the same config with the loop cut short.
    c = cfg(part, 6)
    c["train"]["max_steps"] = 6
    import tunesmith.training.loop as loop

    real_total = loop.total_steps

    class Stop(Exception):
        pass

    original_save = loop.save_checkpoint

    def save_then_stop(*a, **k):
        original_save(*a, **k)
        raise Stop

    loop.save_checkpoint = save_then_stop
    try:
        with pytest.raises(Stop):
            tunesmith.train(c)
    finally:
        loop.save_checkpoint = original_save
    assert loop.total_steps is real_total
    tunesmith.train(c, resume=True)
    a = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in a if "loss" in r] == pytest.approx(
        [r["loss"] for r in b if "loss" in r], rel=1e-6
    )
    wa, wb = (
        load_file(str(full / "adapter_model.safetensors")),
        load_file(str(part / "adapter_model.safetensors")),
    )
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)


def test_existing_run_is_not_overwritten(llama, pc_data, tmp_path):
    out = tmp_path / "run"
    tunesmith.train(base_config(llama, pc_data, out, max_steps=1))
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(TunesmithError, match="already holds a run; pass --resume"):
        tunesmith.train(base_config(llama, pc_data, out, max_steps=1))
    assert (out / "adapter_model.safetensors").read_bytes() == before
    with pytest.raises(TunesmithError, match="finished run .* no checkpoint"):
        tunesmith.train(base_config(llama, pc_data, out, max_steps=1), resume=True)
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_cli_train_generate_eval_merge(llama, chat_data, tmp_path, capsys):
    import yaml

    out = tmp_path / "run"
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(base_config(llama, chat_data, out)))
    assert main(["train", str(cfg_path), "train.max_steps=3"]) == 0
    assert main(["generate", str(out), "--prompt", "1+2?", "--max-new-tokens", "5"]) == 0
    assert main(["eval", str(out), "--samples", "4"]) == 0
    printed = capsys.readouterr().out
    assert "eval_loss:" in printed and "exact_match:" in printed
    merged = tmp_path / "merged"
    assert main(["merge", str(out), "--out", str(merged)]) == 0
    ours, tok, _ = load_for_inference(str(out), torch.device("cpu"))
    x = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(
        AutoModelForCausalLM.from_pretrained(merged)(x).logits, ours(x).logits, atol=1e-5, rtol=1e-5
    )


def test_cli_errors_are_one_line(llama, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}, {"prompt": "b", "completion": "c"}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {llama}\ndata: {{train: {bad}, format: prompt_completion, eval: null}}\noutput_dir: {tmp_path / 'o'}\n"
    )
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "d.jsonl:1: missing field 'completion'" in err[-1]
    assert main(["train", str(cfg), "train.lrr=1"]) == 2
    assert "Did you mean 'lr'" in capsys.readouterr().err


def test_data_preview(llama, chat_data, tmp_path, capsys):
    import yaml

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(base_config(llama, chat_data, tmp_path / "o")))
    assert main(["data", "preview", str(cfg_path), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert (
        "[[" in out
        and "supervised tokens" in out
        and "packing efficiency" in out
        and "truncated" in out
    )


def test_virtual_token_methods_refuse_packing(llama, pc_data, tmp_path):
    """Prefix/prompt tuning prepend to rows: explicit packing is refused, ``auto`` turns it off."""
    raw = base_config(llama, pc_data, tmp_path / "a", max_steps=1)
    raw["method"] = "prefix"
    raw["data"]["packing"] = True
    with pytest.raises(ConfigError, match="data.packing: method 'prefix'"):
        tunesmith.train(raw)
    raw["data"]["packing"] = "auto"
    raw["output_dir"] = str(tmp_path / "b")
    assert tunesmith.train(raw).metrics["packing_efficiency"] < 1.0  # padded rows, not packed
    # (a packed run is below 1.0 too, so check what auto resolves to for each method itself)
    from tunesmith.data.kinds import EXAMPLES
    from tunesmith.methods import build_method, method_config
    from tunesmith.tasks.base import resolve_packing

    resolved = {
        m: (
            resolve_packing("auto", build_method(method_config(m)), EXAMPLES),
            build_method(method_config(m)).packing_ok
            and resolve_packing(True, build_method(method_config(m)), EXAMPLES),
        )
        for m in method_names()
    }
    assert resolved == {  # auto: length-grouped padded batches; explicit packing where allowed
        "adapter": (False, True),
        "full": (False, True),
        "lora": (False, True),
        "prefix": (False, False),
        "prompt": (False, False),
    }


def test_compiled_layers_train_as_eager(llama, pc_data, tmp_path, capfd):
    """``train.compile`` runs the decoder layers through torch.compile (fused LoRA included):
    the same losses and adapter as eager, to float tolerance. About 30 s of compiling on 2 cores."""
    runs = {}
    for compiled in (False, True):
        raw = base_config(llama, pc_data, tmp_path / str(compiled), max_steps=3, compile=compiled)
        raw["data"]["eval"] = None
        runs[compiled] = tunesmith.train(raw)
        said = capfd.readouterr().err
        assert ("train.compile: 2 modules go through torch.compile" in said) == compiled
    losses = [
        [
            json.loads(line)["loss"]
            for line in (r.output_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line
        ]
        for r in (runs[False], runs[True])
    ]
    assert len(losses[0]) == 3
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    eager, compiled = (
        load_file(str(r.output_dir / "adapter_model.safetensors")) for r in runs.values()
    )
    for k, v in eager.items():
        torch.testing.assert_close(compiled[k], v, rtol=1e-4, atol=1e-5)


def test_compile_layers_marks_each_decoder_layer(llama):
    from tunesmith.training.compile import compile_layers

    model = AutoModelForCausalLM.from_pretrained(llama)
    assert compile_layers(model) == len(model.model.layers) == 2
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert model._compiled_call_impl is None  # the root (masks, heads) stays eager
