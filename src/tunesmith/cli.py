"""The ``tunesmith`` command: parse arguments, build the config, call the library. Nothing else."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.training.guard import Interrupted

EPILOG = """examples:
  tunesmith quickstart
  tunesmith train configs/sft_lora.yaml train.lr=1e-4 output_dir=runs/try2
  tunesmith train configs/sft_lora.yaml --resume
  tunesmith data preview configs/sft_lora.yaml
  tunesmith generate runs/sft-lora --prompt "What is 12 plus 30?"
  tunesmith eval runs/sft-lora
  tunesmith merge runs/sft-lora --out runs/sft-lora-merged
  tunesmith train configs/dpo_lora.yaml model.name=runs/quickstart
  tunesmith compare configs/sft_lora.yaml --methods full,lora,prefix output_dir=runs/bakeoff
  tunesmith generate builtin:tiny --adapter a=runs/sft-lora --adapter b=runs/x --use all --prompt "What is 3 plus 4?"
  tunesmith predict runs/classify --text "a gripping, well acted film"
  tunesmith student runs/classify --layers 0,2,4 --out students/s3
  tunesmith score runs/reward-full --prompt "What is 2 plus 3?" --response 5 --response 6
  tunesmith feedback runs/quickstart --prompts builtin:arith:eval --out prefs.jsonl
"""


def _number(kind: type, low: float, high: float | None = None, above: bool = False) -> Any:
    """An argparse ``type`` for a ``kind`` (int or float) value from ``low`` (excluded when
    ``above``) up to ``high``: out of range or not a number is a one-line usage error."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"got {text!r}; expected {what}") from None
        if (
            value != value
            or (value <= low if above else value < low)
            or (high is not None and value > high)
        ):
            bound = f"> {low:g}" if above else f">= {low:g}"
            raise argparse.ArgumentTypeError(
                f"got {text}; must be {bound}" + (f" and <= {high:g}" if high is not None else "")
            )
        return value

    return parse


COUNT = _number(int, 1)  # one or more
AMOUNT = _number(int, 0)  # zero or more
PROBABILITY_MASS = _number(float, 0.0, 1.0, above=True)  # top-p


def _sampling_options(
    p: argparse.ArgumentParser, temperature: float, about_zero: str, top_p: float
) -> None:
    """The options of a command that generates: length, temperature, top-p and seed."""
    p.add_argument("--max-new-tokens", type=COUNT, default=64, help="default 64")
    p.add_argument(
        "--temperature",
        type=_number(float, 0.0),
        default=temperature,
        help=f"sampling temperature ({about_zero}; default {temperature})",
    )
    p.add_argument(
        "--top-p",
        type=PROBABILITY_MASS,
        default=top_p,
        help=f"nucleus sampling mass (default {top_p})",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tunesmith",
        description="Fine-tune Hugging Face language models from one config file.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train from a YAML config",
        description="Train from a YAML config; dotted key=value pairs override it.",
    )
    t.add_argument("config", help="YAML config file")
    t.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 method.rank=8"
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output_dir from its last checkpoint",
    )

    d = sub.add_parser(
        "data", help="inspect training data", description="Inspect the data a config trains on."
    )
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    pv = dsub.add_parser(
        "preview",
        help="rendered examples with trained tokens marked, and statistics",
        description="Print rendered examples with the trained tokens marked [[like this]], and dataset statistics.",
    )
    pv.add_argument("config", help="YAML config file")
    pv.add_argument("overrides", nargs="*", help="dotted overrides")
    pv.add_argument("-n", "--examples", type=AMOUNT, default=3, help="examples to show (default 3)")

    g = sub.add_parser(
        "generate",
        help="generate text with a model or a run",
        description="Generate from a model folder, hub id, builtin:NAME, or a tunesmith run folder.",
    )
    g.add_argument("model", help="run folder, model folder, hub id or builtin:NAME")
    g.add_argument(
        "--prompt", action="append", required=True, help="prompt text (repeat for several)"
    )
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    _sampling_options(g, 0.8, "> 0 with --sample", 0.95)
    g.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    g.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=RUN",
        help="attach a trained adapter run to the base under NAME (repeat for several)",
    )
    g.add_argument(
        "--use",
        metavar="NAME",
        help="adapter to generate with: a NAME, 'base' (no adapter) or 'all' (each in turn)",
    )

    e = sub.add_parser(
        "eval",
        help="held-out metrics of a run (sft: loss, perplexity, exact match; reward/dpo: preference accuracy)",
        description="Evaluate a run folder on its config's held-out split (the metrics its task reports), or an sft config's base model.",
    )
    e.add_argument("target", help="run folder or YAML config")
    e.add_argument("overrides", nargs="*", help="dotted overrides of the config")
    e.add_argument(
        "--samples",
        type=AMOUNT,
        default=200,
        help="held-out examples scored by exact match (0 to skip; default 200)",
    )

    cp = sub.add_parser(
        "compare",
        help="train the same task once per method and compare",
        description="Train the config's task once per method (same data, settings, step budget) and write a comparison: trainable parameters, peak memory, tokens/s, wall time, eval loss, exact match, artifact size.",
    )
    cp.add_argument("config", help="YAML config file (its output_dir receives one run per method)")
    cp.add_argument("overrides", nargs="*", help="dotted overrides of the config")
    cp.add_argument(
        "--methods",
        default="full,lora,adapter,prefix,prompt",
        help="comma-separated methods (default full,lora,adapter,prefix,prompt)",
    )
    cp.add_argument(
        "--set",
        action="append",
        default=[],
        dest="options",
        metavar="METHOD.KEY=VALUE",
        help="a setting for one method's run: lora.rank=4, or any section's, full.train.lr=3e-4 (repeatable)",
    )
    cp.add_argument(
        "--samples",
        type=AMOUNT,
        default=200,
        help="held-out examples scored by exact match (default 200)",
    )

    sc = sub.add_parser(
        "score",
        help="rewards of responses under a reward model",
        description="Print the reward a trained reward model (a task: reward run folder) gives each response.",
    )
    sc.add_argument("model", help="reward run folder or sequence-classification model folder")
    sc.add_argument("--prompt", required=True, help="the prompt")
    sc.add_argument(
        "--response", action="append", required=True, help="a response (repeat for several)"
    )
    sc.add_argument(
        "--raw", action="store_true", help="do not wrap prompt and response in the chat template"
    )

    pr = sub.add_parser(
        "predict",
        help="class labels and probabilities from a classifier run",
        description="Print the label and class probabilities a classifier (a task: classify run) gives each input.",
    )
    pr.add_argument("model", help="classify run folder or sequence-classification model folder")
    pr.add_argument("--text", action="append", help="an input text (repeat for several)")
    pr.add_argument(
        "--text-pair", action="append", help="the second text of a pair, one per --text"
    )
    pr.add_argument(
        "--file", help="inputs: .jsonl with 'text' (+ 'text_pair'), or one text per line"
    )

    st = sub.add_parser(
        "student",
        help="build a smaller student from a teacher's layers (DistilBERT's initialisation)",
        description="Write a student model that keeps some of the teacher's layers (default every other one), with its embeddings, head and tokenizer.",
    )
    st.add_argument("teacher", help="teacher model folder (or a run folder of a whole model)")
    st.add_argument("--layers", help="teacher layers to keep, e.g. 0,2,4 (default every other one)")
    st.add_argument("--out", required=True, help="folder for the student")

    m = sub.add_parser(
        "merge",
        help="fold a LoRA run into its base model",
        description="Write a merged model (transformers layout) from a LoRA run folder.",
    )
    m.add_argument("run", help="run folder of a LoRA run")
    m.add_argument("--out", required=True, help="folder for the merged model")

    q = sub.add_parser(
        "quickstart",
        help="the built-in demo: LoRA SFT on the built-in model and task",
        description="Build (or load) the built-in base model, measure it on the built-in arithmetic task, fine-tune it with LoRA, and measure again.",
    )
    q.add_argument(
        "--output-dir",
        default="runs/quickstart",
        help="run folder (default runs/quickstart; a folder an earlier quickstart made is replaced, any other must be new or empty)",
    )

    sub.add_parser(
        "tasks",
        help="the registered tasks and methods, and what each pair saves",
        description="List the registered tasks and the task x method matrix (every pair works).",
    )

    fb = sub.add_parser(
        "feedback",
        help="people compare (or rate) a model's responses in a local web page",
        description="Generate two responses per prompt (two samples of MODEL, or one each with --against), serve a page where people pick the better one, and append every judgement to --out as a preference record (task: dpo / reward read it as is).",
    )
    fb.add_argument("model", help="run folder, model folder, hub id or builtin:NAME")
    fb.add_argument(
        "--prompts",
        required=True,
        help="prompt data: .jsonl/.json/.csv/.parquet, builtin:NAME[:eval] or a hub id",
    )
    fb.add_argument("--out", required=True, help="preference file to append to (.jsonl)")
    fb.add_argument(
        "--against", metavar="OTHER", help="compare with this model's responses (one from each)"
    )
    fb.add_argument(
        "--mode",
        choices=["pair", "rate"],
        default="pair",
        help="pair: pick the better of two (default); rate: score single responses 1-5",
    )
    fb.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to serve on (default 127.0.0.1; any other needs the printed token)",
    )
    fb.add_argument(
        "--port",
        type=_number(int, 0, 65535),
        default=8765,
        help="default 8765; 0 takes any free port",
    )
    fb.add_argument(
        "--judges-per-pair",
        type=COUNT,
        default=1,
        help="how many people judge each pair (2+ measures agreement; default 1)",
    )
    fb.add_argument("--limit", type=COUNT, help="use the first N distinct prompts")
    _sampling_options(fb, 1.0, "0: greedy, with --against", 1.0)
    fb.add_argument(
        "--raw", action="store_true", help="do not wrap text prompts in the chat template"
    )

    b = sub.add_parser(
        "builtin",
        help="the built-in base model and tasks",
        description="Manage the built-in base model and tasks.",
    )
    bsub = b.add_subparsers(dest="builtin_command", required=True, metavar="SUBCOMMAND")
    bb = bsub.add_parser("build", help="(re)build the built-in base model and say where it lives")
    bb.add_argument("--name", default="tiny", help="built-in model name (default tiny)")
    bsub.add_parser("tasks", help="list the built-in tasks")
    return p


def _cmd_train(a: argparse.Namespace) -> None:
    from tunesmith.config import load_config
    from tunesmith.pipeline import run_training
    from tunesmith.prepare import ensure_model
    from tunesmith.training import distributed

    cfg = load_config(a.config, a.overrides)
    distributed.setup(cfg.train)  # under torchrun: join the other processes
    # build builtin:NAME / merge a run folder, once (rank 0 first under torchrun)
    distributed.main_first(lambda: ensure_model(cfg.model.name))
    run_training(cfg, a.resume)


def _cmd_data(a: argparse.Namespace) -> None:
    from tunesmith.config import load_config
    from tunesmith.prepare import ensure_model
    from tunesmith.preview import preview
    from tunesmith.tasks import get_task

    cfg = load_config(a.config, a.overrides)
    task = get_task(cfg.task)
    if task.prepare is not None:  # settings that come from the data (a classifier's classes)
        task.prepare(cfg)
    print(preview(cfg, task.records, ensure_model(cfg.model.name), a.examples, task.shares_prompt))


def _cmd_generate(a: argparse.Namespace) -> None:
    import torch

    from tunesmith.generate import chat_prompt, generate
    from tunesmith.models import load_for_inference

    def show(model: Any, tok: Any, title: str | None = None) -> None:
        torch.manual_seed(a.seed)
        prompts = [chat_prompt(tok, p, a.raw) for p in a.prompt]
        outs = generate(model, tok, prompts, a.max_new_tokens, a.sample, a.temperature, a.top_p)
        if title:
            print(f"=== {title}")
        for p, o in zip(a.prompt, outs):
            print(f">>> {p}\n{o}\n" if len(a.prompt) > 1 else o)

    if a.sample and a.temperature == 0:
        raise TunesmithError(
            "--temperature 0 with --sample: sampling needs a temperature > 0; leave out --sample "
            "for greedy decoding."
        )
    _prepare_source(a.model)
    if not a.adapter:
        if a.use:
            raise TunesmithError("--use picks one of the --adapter NAME=RUN given; none was.")
        model, tok, _ = load_for_inference(a.model)
        show(model, tok)
        return
    from tunesmith.multi import MultiAdapter

    adapters = {}
    for item in a.adapter:
        name, sep, run = item.partition("=")
        if not sep or not name or not run or name in ("base", "all"):
            raise TunesmithError(
                f"--adapter {item}: write NAME=RUN_FOLDER (NAME not 'base' or 'all')."
            )
        if name in adapters:
            raise TunesmithError(
                f"--adapter {item}: the name '{name}' is given twice; give each its own."
            )
        adapters[name] = run
    if a.use is None and len(adapters) > 1:
        raise TunesmithError(
            f"--use: several adapters attached ({', '.join(adapters)}); pick one, 'base' or 'all'."
        )
    multi = MultiAdapter.load(a.model, adapters)
    choice = a.use or next(iter(adapters))
    names = [None, *adapters] if choice == "all" else [None if choice == "base" else choice]
    for name in names:
        multi.use(name)
        show(multi, multi.tokenizer, (name or "base") if choice == "all" else None)


def _cmd_eval(a: argparse.Namespace) -> None:
    from tunesmith.evaluate import evaluate_target
    from tunesmith.models import is_run_dir
    from tunesmith.prepare import ensure_model

    if not is_run_dir(a.target) and os.path.isfile(a.target):  # a config: its starting model
        from tunesmith.config import load_config

        ensure_model(load_config(a.target, a.overrides).model.name)
    for k, v in evaluate_target(a.target, a.overrides, a.samples).items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")


def _cmd_compare(a: argparse.Namespace) -> None:
    from tunesmith.compare import compare

    compare(
        a.config,
        [m.strip() for m in a.methods.split(",") if m.strip()],
        a.overrides,
        a.options,
        a.samples,
    )


def _cmd_score(a: argparse.Namespace) -> None:
    from tunesmith.score import score

    for response, reward in zip(a.response, score(a.model, a.prompt, a.response, a.raw)):
        print(f"{reward:+.4f}  {response}")


def _cmd_predict(a: argparse.Namespace) -> None:
    from tunesmith.predict import predict, read_inputs

    if bool(a.text) == bool(a.file):
        raise TunesmithError("predict: give --text (repeatable) or --file, not both.")
    if a.file:
        inputs = read_inputs(a.file)
    else:
        pairs = a.text_pair or []
        if pairs and len(pairs) != len(a.text):
            raise TunesmithError(
                f"predict: {len(a.text)} --text but {len(pairs)} --text-pair; give one pair per text."
            )
        inputs = list(zip(a.text, pairs or [None] * len(a.text)))
    for p in predict(a.model, inputs):
        probs = "  ".join(f"{k}={v:.3f}" for k, v in p.probabilities.items())
        shown = p.text if p.text_pair is None else f"{p.text} ||| {p.text_pair}"
        print(f"{p.label}\t{probs}\t{shown}")


def _cmd_student(a: argparse.Namespace) -> None:
    from tunesmith.paths import require_new_folder
    from tunesmith.student import build_student

    require_new_folder(a.out, "--out")  # before anything loads
    layers = None
    if a.layers:
        try:
            layers = [int(x) for x in a.layers.split(",")]
        except ValueError:
            raise TunesmithError(
                f"--layers: got {a.layers!r}; give comma-separated layer indices like 0,2,4."
            ) from None
    out = build_student(a.teacher, a.out, layers)
    print(f"student written to {out}")


def _cmd_merge(a: argparse.Namespace) -> None:
    from tunesmith.merge import merge_run

    out = merge_run(a.run, a.out)
    print(f"merged model written to {out}")


def _cmd_quickstart(a: argparse.Namespace) -> None:
    from tunesmith.quickstart import quickstart

    quickstart(a.output_dir)


def _prepare_source(name: str | None) -> None:
    """Build a builtin:NAME model on first use (run folders load as they are)."""
    from tunesmith.models import is_run_dir
    from tunesmith.prepare import ensure_model

    if name and not is_run_dir(name):
        ensure_model(name)


def _cmd_feedback(a: argparse.Namespace) -> None:
    from tunesmith.feedback import Sampling, serve_feedback

    _prepare_source(a.model)
    _prepare_source(a.against)
    sampling = Sampling(a.max_new_tokens, a.temperature, a.top_p, seed=a.seed)
    serve_feedback(a.model, a.prompts, a.out, a.against, a.mode, a.host, a.port,
                   a.judges_per_pair, a.limit, a.raw, sampling)  # fmt: skip


def _cmd_builtin(a: argparse.Namespace) -> None:
    if a.builtin_command == "build":
        from tunesmith.builtin.specs import SPECS
        from tunesmith.prepare import ensure_builtin_model

        if a.name not in SPECS:
            raise TunesmithError(
                f"--name: unknown built-in model '{a.name}'; available: {', '.join(SPECS)}."
            )
        path = ensure_builtin_model(a.name, rebuild=True)
        print(f"built-in model '{a.name}' is at {path}")
    else:
        from tunesmith.builtin.tasks import describe_tasks

        print(describe_tasks())


def _cmd_tasks(a: argparse.Namespace) -> None:
    from tunesmith.tasks import TASKS, matrix_markdown

    for task in TASKS.values():
        print(f"{task.name:<8} {task.about}")
    print()
    print(matrix_markdown())


COMMANDS = {
    "train": _cmd_train,
    "data": _cmd_data,
    "generate": _cmd_generate,
    "eval": _cmd_eval,
    "compare": _cmd_compare,
    "score": _cmd_score,
    "predict": _cmd_predict,
    "student": _cmd_student,
    "merge": _cmd_merge,
    "quickstart": _cmd_quickstart,
    "feedback": _cmd_feedback,
    "builtin": _cmd_builtin,
    "tasks": _cmd_tasks,
}


TRAINING_COMMANDS = ("train", "compare", "quickstart")


def _restart_under_caching_allocator(a: argparse.Namespace) -> None:
    """Before a training command loads anything: restart this process once with tcmalloc
    preloaded, where the system has it and ``train.cpu_memory`` is ``fast`` (the default; see
    training/memory.py for why and what it measured). Returns if it does not restart."""
    from tunesmith.training.memory import allocator_env, caching_allocator

    if a.command not in TRAINING_COMMANDS:
        return
    mode = "fast"
    if getattr(a, "config", None) is not None:
        from pathlib import Path

        from tunesmith.config import read_config_data

        if not Path(a.config).is_file():  # a pipe can be read only once: no restart
            return
        try:
            data = read_config_data(a.config, a.overrides)
            mode = data.get("train", {}).get("cpu_memory", "fast")
        except Exception:  # whatever is wrong, the command's own loading reports it
            return
    env = allocator_env(os.environ, mode, caching_allocator())
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        # the same interpreter flags, script or -m, and arguments (sys.orig_argv)
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    # Overrides may follow options (``data preview C -n 2 train.lr=1``): argparse leaves them over.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in x or x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv is None:  # the command line itself, not a call from Python
        _restart_under_caching_allocator(args)
    try:
        COMMANDS[args.command](args)
    except Interrupted as e:  # SIGTERM / SIGINT: a checkpoint was written
        again = [a for a in (argv if argv is not None else sys.argv[1:])]
        again += [] if "--resume" in again else ["--resume"]
        print(f"tunesmith: {e}; resume with: tunesmith {shlex.join(again)}", file=sys.stderr)
        return e.exit_code
    except TunesmithError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; checkpoints already written are kept (resume with --resume).",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
