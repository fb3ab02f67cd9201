"""Supervised fine-tuning: any method, any supported record format."""

from __future__ import annotations

from tunesmith.config import Config
from tunesmith.data.batching import Batches
from tunesmith.data.dataset import prepare_data
from tunesmith.objectives.sft import SFTObjective
from tunesmith.recipes.common import (
    RunResult,
    parameter_counts,
    prepare_output_dir,
    save_artifacts,
    say,
    setup_model,
)
from tunesmith.report import write_report
from tunesmith.training.loop import train_loop


def run(cfg: Config, resume: bool = False) -> RunResult:
    out = prepare_output_dir(cfg, resume)
    model, tokenizer, method, device, base_path = setup_model(cfg)
    data = prepare_data(cfg.data, tokenizer, cfg.train.seed)
    for note in data.notes:
        say(note)
    d, t = cfg.data, cfg.train
    train = Batches(
        data.train, t.batch_size, d.max_length, tokenizer.pad_token_id, d.packing, t.seed
    )
    evals = (
        Batches(
            data.eval,
            t.batch_size,
            d.max_length,
            tokenizer.pad_token_id,
            False,
            t.seed,
            shuffle=False,
        )
        if data.eval
        else None
    )
    trainable, total = parameter_counts(model, method)
    say(
        f"{cfg.method.name} on {cfg.model.name}: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%); "
        f"{data.stats.examples} train / {data.eval_stats.examples} eval examples, {data.stats.tokens:,} tokens "
        f"({100 * data.stats.supervised / max(data.stats.tokens, 1):.0f}% supervised), device {device}"
    )
    result = train_loop(model, method, SFTObjective(), train, evals, t, out, device, resume)
    info = {
        "steps": result.steps,
        "train_loss": result.final_train_loss,
        **result.eval,
        "tokens_per_s": result.tokens_per_s,
        "train_seconds": result.train_seconds,
        "peak_memory_mb": result.peak_memory_mb,
        "trainable_params": trainable,
        "total_params": total,
        "train_examples": data.stats.examples,
        "truncated": data.stats.truncated,
        "packing_efficiency": train.packing_efficiency(),
    }
    save_artifacts(out, cfg, model, tokenizer, method, base_path, data.template, info)
    write_report(out, cfg, info, result.history)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.eval.items())
    say(
        f"done in {result.train_seconds:.0f}s ({result.tokens_per_s:,.0f} tokens/s); {shown or 'no eval split'}; saved to {out}"
    )
    return RunResult(out, info)
