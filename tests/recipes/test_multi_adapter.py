"""Many adapters on one base: each gives its own outputs, the base comes back when none is active."""

import pytest
import torch
from conftest import base_config

import tunesmith
from tunesmith.cli import main
from tunesmith.errors import TunesmithError
from tunesmith.models import load_for_inference

# Order matters for the test, not for users: LoRA is attached after a bottleneck adapter already
# wraps the blocks it targets, and a second LoRA on top of the first.
KINDS = {
    "ad": {"name": "adapter", "bottleneck": 8},
    "lo": {"name": "lora", "rank": 4, "alpha": 8},
    "lo2": {"name": "lora", "rank": 2, "alpha": 4, "targets": ["q_proj", "down_proj"]},
    "pf": {"name": "prefix", "virtual_tokens": 4},
    "pr": {"name": "prompt", "virtual_tokens": 4},
}


@pytest.fixture(scope="module")
def runs(llama, tmp_path_factory):
    from conftest import write_jsonl

    root = tmp_path_factory.mktemp("multi")
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(6)]
    data = write_jsonl(root / "pc.jsonl", rows)
    out = {}
    for name, method in KINDS.items():
        raw = base_config(llama, data, root / name, max_steps=3)
        raw["method"] = method
        out[name] = str(tunesmith.train(raw).output_dir)
    return out


def test_each_adapter_gives_its_own_outputs_and_base_when_none(llama, runs):
    x = torch.randint(6, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    base, _, _ = load_for_inference(str(llama), torch.device("cpu"))
    expected = {name: load_for_inference(run, torch.device("cpu"))[0] for name, run in runs.items()}
    with torch.no_grad():
        want = {name: m(x).logits for name, m in expected.items()}
        want_base = base(x).logits
    multi = tunesmith.MultiAdapter.load(str(llama), runs, torch.device("cpu"))
    before = sum(p.numel() for p in base.parameters())
    own = sum(p.numel() for m in expected.values() for p in m.parameters()) - len(runs) * before
    assert sum(p.numel() for p in multi.parameters()) == before + own  # only the adapters' weights
    with torch.no_grad():
        for name in [*runs, None, *reversed(runs)]:  # switch back and forth, no reload
            multi.use(name)
            got = multi(x).logits
            torch.testing.assert_close(got, want[name] if name else want_base)
    assert all(not p.requires_grad for p in multi.parameters())


def test_multi_adapter_errors(llama, runs, tmp_path):
    multi = tunesmith.MultiAdapter.load(str(llama), {"lo": runs["lo"]}, torch.device("cpu"))
    with pytest.raises(TunesmithError, match="no adapter of that name; attached: lo"):
        multi.use("nope")
    with pytest.raises(TunesmithError, match="name is taken"):
        multi.add("lo", runs["lo"])
    with pytest.raises(TunesmithError, match="not a tunesmith run folder"):
        multi.add("x", str(tmp_path))


def test_cli_generate_with_adapters(llama, runs, capsys):
    args = ["generate", str(llama), "--prompt", "1+2=", "--raw", "--max-new-tokens", "4"]
    adapters = ["--adapter", f"lo={runs['lo']}", "--adapter", f"pr={runs['pr']}"]
    assert main([*args, *adapters, "--use", "all"]) == 0
    out = capsys.readouterr().out
    assert "=== base" in out and "=== lo" in out and "=== pr" in out
    assert main([*args, *adapters]) == 2  # several adapters and no --use
    assert "--use: several adapters attached (lo, pr)" in capsys.readouterr().err


def test_failed_attach_leaves_the_model_as_it_was(llama, runs, tmp_path):
    """An adapter whose weights do not load is never left half-attached and computing."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(runs["pr"], broken)
    (broken / "adapter_model.safetensors").unlink()
    x = torch.randint(6, 90, (1, 7), generator=torch.Generator().manual_seed(1))
    multi = tunesmith.MultiAdapter.load(str(llama), {"lo": runs["lo"]}, torch.device("cpu"))
    with torch.no_grad():
        multi.use("lo")
        with_lora = multi(x).logits
        multi.use(None)
        base = multi(x).logits
    with pytest.raises(TunesmithError, match="no adapter_config.json and adapter_model"):
        multi.add("broken", str(broken))
    assert multi.active is None and list(multi.adapters) == ["lo"]
    with torch.no_grad():
        torch.testing.assert_close(multi(x).logits, base)
        multi.use("lo")
        torch.testing.assert_close(multi(x).logits, with_lora)
