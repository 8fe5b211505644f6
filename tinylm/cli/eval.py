"""Commands for generation, chat, evaluation and Hugging Face interop.

`register(app)` adds `generate`, `chat`, `eval`, `export` and `import` to a typer app (the top-level `tinylm`
one); `app` here is a standalone copy with the same commands.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from tinylm.cli.base import make_app, run as run_app
from tinylm.errors import UserError

BACKEND_HELP = "auto, mlx or torch."


def _model(ckpt: str, backend: str, committee: str | None = None, dtype: str = "float32"):
    from tinylm.generate import load_model

    if committee:
        from tinylm.eval.committee import load_committee

        return load_committee([ckpt] + [c for c in committee.split(",") if c.strip()], backend)
    return load_model(ckpt, backend, dtype)


def generate(
    ckpt: str = typer.Argument(..., metavar="CKPT", help="Checkpoint or run directory."),
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    max_tokens: int = typer.Option(128, "--max-tokens", min=1, help="Most new tokens."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample from the k most likely tokens (0: all)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
    stop: List[str] = typer.Option([], "--stop", help="Stop at this string (repeatable)."),
    seed: int = typer.Option(0, "--seed"),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Wrap the prompt in the chat template as "
                                        "a user turn (default: when the checkpoint is a chat model)."),
    committee: Optional[str] = typer.Option(None, "--committee", help="More checkpoints (comma-separated) sharing "
                                            "CKPT's tokenizer; decode from the average of their probabilities."),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
):
    """Continue a prompt; stdout carries the continuation alone."""
    from tinylm.generate import SamplingConfig, chat_prompt
    from tinylm.generate import generate as run

    lm, tok, ckpt_obj = _model(ckpt, backend, committee)
    if chat is None:
        chat = bool(ckpt_obj.meta.get("chat"))
    text = chat_prompt([{"role": "user", "content": prompt}], ckpt_obj.meta) if chat else prompt
    cfg = SamplingConfig(max_tokens, temperature, top_k, top_p, tuple(stop), seed)
    run(lm, tok, [text], cfg, ckpt_obj.meta, on_text=lambda _, piece: (sys.stdout.write(piece), sys.stdout.flush()))
    if sys.stdout.isatty():
        sys.stdout.write("\n")


def chat(
    ckpt: str = typer.Argument(..., metavar="CKPT", help="Checkpoint or run directory."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message to start with."),
    max_tokens: int = typer.Option(512, "--max-tokens", min=1),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0),
    seed: int = typer.Option(0, "--seed"),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
):
    """Talk with a model in the chat template; replies stream as they are generated. /reset, /exit."""
    from tinylm.generate import SamplingConfig, chat_prompt
    from tinylm.generate import generate as run

    if sys.stdin is None or sys.stdin.closed:  # started with standard input closed (`<&-`): nothing to read
        print("chat: standard input is closed, so there is nothing to answer", file=sys.stderr)
        return
    lm, tok, ckpt_obj = _model(ckpt, backend)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    turn = 0
    print("chat with the model; /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = list(start)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        cfg = SamplingConfig(max_tokens, temperature, 0, top_p, (), seed + turn)
        reply = run(lm, tok, [chat_prompt(history, ckpt_obj.meta)], cfg, ckpt_obj.meta,
                    on_text=lambda _, piece: (sys.stdout.write(piece), sys.stdout.flush()))[0]
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply.text})
        turn += 1


def eval_(
    ckpt: str = typer.Argument(..., metavar="CKPT", help="Checkpoint or run directory."),
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated: KIND:PATH (gsm8k, arc, hellaswag, piqa, "
                              "boolq, mc, text), classify:SPEC (accuracy and macro-F1 of a fine-tuned "
                              "classification head), a task file, or a built-in synthetic family."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="First N examples of each task."),
    as_json: bool = typer.Option(False, "--json", help="Print {task: {metric: value}} as JSON."),
    committee: Optional[str] = typer.Option(None, "--committee", help="More checkpoints (comma-separated) that "
                                            "share CKPT's tokenizer; their probabilities are averaged with CKPT's."),
    samples: int = typer.Option(1, "--samples", min=1, help="Generations per problem (pass@k for k <= N)."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="Sampling temperature for --samples > 1 "
                                      "(0 means 0.8 when sampling)."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Ask generative tasks in the chat "
                                        "template (default: when the checkpoint is a chat model)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="Most new tokens per generation "
                                             "(default: 256)."),
    output: Optional[Path] = typer.Option(None, "--output", help="Results JSON path (default: "
                                          "eval_results.json in the checkpoint); a .md table is written beside it."),
    log_samples: Optional[Path] = typer.Option(None, "--log-samples", help="Write one JSON line per generation "
                                               "of the generative tasks: prompt, completion, extracted and expected "
                                               "answer, verdict."),
    dtype: str = typer.Option("float32", "--dtype", help="What the weights compute in: float32 or bfloat16 "
                              "(faster on CPUs with bf16 instructions; a committee is scored in float32)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Generations decoded together."),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
):
    """Evaluate a checkpoint (or a committee) on tasks; prints a markdown table or JSON."""
    from tinylm.eval import harness
    from tinylm.eval.tasks import load_tasks

    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype {dtype!r}: choose float32 or bfloat16")
    if output is not None:
        writable_output(output)
    if log_samples is not None:
        writable_samples(log_samples)
    task_list = load_tasks(tasks, limit)
    for t in task_list:
        t.max_tokens = max_tokens or t.max_tokens
    lm, tok, ckpt_obj = _model(ckpt, backend, committee, dtype)
    out = writable_output(output or ckpt_obj.path / "eval_results.json")  # before the work, not after it
    if samples > 1 and temperature == 0:
        temperature = 0.8
    if chat is None:
        chat = bool(ckpt_obj.meta.get("chat"))
    rows: list | None = [] if log_samples is not None else None
    results = harness.run_tasks(lm, tok, task_list, ckpt_obj.meta, samples, temperature, chat, log=rows,
                                batch_size=batch_size)
    if log_samples is not None:
        write_samples(log_samples, rows)
    members = [str(ckpt_obj.path)] + ([c for c in committee.split(",") if c.strip()] if committee else [])
    report = {"checkpoint": members[0], "step": ckpt_obj.step, "committee": members if committee else None,
              "limit": limit, "dtype": "float32" if committee else dtype, "samples_per_problem": samples,
              "temperature": temperature, "results": results}
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = harness.markdown_table(results)
    out.with_suffix(".md").write_text(table)
    if as_json:
        print(json.dumps(harness.flat_metrics(results), indent=2))
    else:
        print(table, end="")
        print(f"results: {out}", file=sys.stderr)


def writable_output(path: Path) -> Path:
    """`path` as a results file that can be written, its folder made; refused while nothing has run yet."""
    if path.is_dir():
        raise UserError(f"--output {path} is a folder; name a file, such as {path / 'eval_results.json'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def writable_samples(path: Path) -> Path:
    """Refuse a --log-samples path that cannot be written before any work is done."""
    if path.is_dir():
        raise UserError(f"--log-samples {path} is a folder; name a file, such as {path / 'samples.jsonl'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise UserError(f"--log-samples {path} cannot be written ({e.strerror or e})") from None
    return path


def write_samples(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def export(
    ckpt: str = typer.Argument(..., metavar="CKPT", help="Checkpoint or run directory."),
    out_dir: Path = typer.Argument(..., metavar="DIR", help="Directory to write."),
    to: str = typer.Option("hf", "--to", help="Target format: hf (a transformers model directory) or gguf "
                           "(a llama GGUF file, DIR being the file)."),
    gguf_type: str = typer.Option("F16", "--type", help="GGUF tensor type of the matrices: F32, F16 or Q8_0."),
    force: bool = typer.Option(False, "--force", help="Write into DIR even if it is not empty."),
):
    """Write a checkpoint as a Hugging Face model directory (`--to hf DIR`) or a GGUF file (`--to gguf FILE`)."""
    if to == "gguf":
        from tinylm.interop.gguf import export_gguf

        print(export_gguf(ckpt, out_dir, gguf_type.upper(), force=force))
        return
    from tinylm.interop.hf import export_hf

    if to != "hf":
        raise UserError(f"unknown export format {to!r} (supported: hf, gguf)")
    print(export_hf(ckpt, out_dir, force=force))


def import_(
    hf_dir: Path = typer.Argument(..., metavar="SOURCE", help="Local Llama or Qwen3 model directory, or a "
                                  "llama GGUF file (FILE.gguf)."),
    out: Path = typer.Option(..., "--out", help="Run directory to write the checkpoint into."),
    force: bool = typer.Option(False, "--force", help="Write into an existing run directory (its checkpoints "
                               "are kept)."),
):
    """Read a local Hugging Face Llama/Qwen3 model or a llama GGUF file into a tinylm checkpoint (to continue
    training or fine-tune); GGUF weights are dequantized to float32."""
    from tinylm.interop.hf import import_hf

    if hf_dir.is_file():  # a GGUF file (a model directory is a folder)
        from tinylm.interop.gguf import import_gguf

        print(import_gguf(hf_dir, out, force=force))
        return
    print(import_hf(hf_dir, out, force=force))


def register(target: typer.Typer) -> None:
    target.command("generate")(generate)
    target.command("chat")(chat)
    target.command("eval")(eval_)
    target.command("export")(export)
    target.command("import")(import_)


app = make_app(help="Generation, evaluation and Hugging Face interop.")
register(app)


def main(argv: list[str] | None = None) -> int:
    """Run a command of the standalone app; returns the exit code (2 for bad input)."""
    return run_app(app, argv)


if __name__ == "__main__":
    sys.exit(main())
