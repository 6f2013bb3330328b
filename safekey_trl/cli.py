"""The `safekey-trl` command line: `train`, `data validate` and `data inspect`."""

from __future__ import annotations

import logging
import subprocess
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from .data import SafeKeyDataError, featurize, load_examples, render, token_spans

app = typer.Typer(help="SafeKey safety alignment for reasoning models, on TRL.", no_args_is_help=True)
data_app = typer.Typer(help="Check and look at SafeKey-format data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
# No hard wrapping: an error line keeps its file, row and field in one piece
console = Console(soft_wrap=True)

TokenizerOption = Annotated[
    str, typer.Option(help="Tokenizer name or path; `tiny:qwen2` is the embedded offline one.")
]


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    recipe: Annotated[
        str, typer.Option(help="Recipe name under recipes/ (e.g. tiny, qwen7b) or a YAML path.")
    ] = "tiny",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print trainable parameters and a GPU memory estimate, then stop.")
    ] = False,
    accelerate: Annotated[
        str | None,
        typer.Option(help="Launch with accelerate: a config in recipes/accelerate/ (ddp, zero3, fsdp...) or a path."),
    ] = None,
    num_processes: Annotated[int | None, typer.Option(help="Processes in all (with --accelerate).")] = None,
    num_machines: Annotated[int | None, typer.Option(help="Nodes (with --accelerate).")] = None,
    machine_rank: Annotated[int | None, typer.Option(help="This node's rank (with --accelerate).")] = None,
    main_process_ip: Annotated[str | None, typer.Option(help="Rank 0 node's address (with --accelerate).")] = None,
    main_process_port: Annotated[int | None, typer.Option(help="Rank 0 node's port (with --accelerate).")] = None,
) -> None:
    """Train with a recipe. Any recipe field can be overridden after it: `--learning_rate 2e-5 --output_dir out`."""
    from .modeling import resolve_attn_implementation
    from .sft import accelerate_launch_command, parse_recipe
    from .sft import train as run_training

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if accelerate is not None and not dry_run:
        try:
            command = accelerate_launch_command(
                accelerate,
                recipe,
                list(ctx.args),
                num_processes=num_processes,
                num_machines=num_machines,
                machine_rank=machine_rank,
                main_process_ip=main_process_ip,
                main_process_port=main_process_port,
            )
        except FileNotFoundError as error:
            console.print(f"[red]error:[/red] {escape(str(error))}")
            raise typer.Exit(2) from None
        console.print(" ".join(command), markup=False)
        raise typer.Exit(subprocess.run(command).returncode)
    try:
        script_args, training_args, model_args = parse_recipe(recipe, list(ctx.args))
        if dry_run:
            from .plan import plan_training

            console.print(plan_training(training_args, model_args).render())
            return
        # Fail now, not in the first step, when the attention kernel asked for cannot run here
        resolve_attn_implementation(model_args.attn_implementation)
    except (FileNotFoundError, ValueError) as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(2) from None
    try:
        run_training(script_args, training_args, model_args)
    except SafeKeyDataError as error:
        console.print(
            f"[red]invalid data:[/red] {escape(str(error))}\n(use --skip_invalid true to skip such rows with a report)"
        )
        raise typer.Exit(1) from None


@app.command("export")
def export_command(
    run_dir: Annotated[str, typer.Argument(help="A run's output_dir or one of its checkpoint-* directories.")],
    out: Annotated[str, typer.Option(help="Directory to write the exported model to.")],
    merge: Annotated[bool, typer.Option(help="Merge a LoRA adapter into the base weights.")] = False,
    dtype: Annotated[str, typer.Option(help="dtype of merged weights: bfloat16, float16 or float32.")] = "bfloat16",
) -> None:
    """Export a run: the model (or LoRA adapter, or adapter merged into the base) and its safety head beside it."""
    from .export import export

    try:
        path = export(run_dir, out, merge=merge, dtype=dtype)
    except (FileNotFoundError, ValueError) as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(2) from None
    console.print(f"exported to {path} (model loads with AutoModelForCausalLM; head in safekey_head.safetensors)")


def _tokenizer(name: str):
    from .tiny import load_tokenizer

    return load_tokenizer(name)


@data_app.command()
def validate(
    file: Annotated[str, typer.Argument(help="A .jsonl, .json or .parquet file, or a Hub dataset name.")],
    tokenizer: TokenizerOption = "tiny:qwen2",
    max_length: Annotated[int | None, typer.Option(help="Count the K spans this length would cut.")] = None,
    skip_invalid: Annotated[
        bool, typer.Option(help="Report every invalid row instead of stopping at the first.")
    ] = True,
) -> None:
    """Check every row against the format and a tokenizer; report counts."""
    try:
        examples, report = load_examples(file, skip_invalid=skip_invalid)
        rows_read = len(examples) + report.count
        _, stats = featurize(examples, _tokenizer(tokenizer), max_length, skip_invalid=skip_invalid, report=report)
    except SafeKeyDataError as error:
        console.print(f"[red]invalid:[/red] {escape(str(error))}")
        raise typer.Exit(1) from None
    invalid_rows = {error.row for error in report.errors}
    valid = [example for example in examples if example.row not in invalid_rows]
    harmful = sum(example.unsafe for example in valid)
    console.print(f"{file}: {rows_read} rows read")
    console.print(f"  valid: {len(valid)} ({harmful} harmful, {len(valid) - harmful} benign)")
    if max_length is not None:
        console.print(
            f"  K cut by max_length={max_length}: {stats.key_truncated}; dropped: {stats.dropped_no_response}"
        )
    if report.count:
        console.print(f"[red]  invalid: {report.count}[/red]")
        for error in report.errors:
            console.print(f"    {escape(str(error))}")
        raise typer.Exit(1)
    console.print("[green]  every row is valid[/green]")


@data_app.command()
def inspect(
    file: Annotated[str, typer.Argument(help="A .jsonl, .json or .parquet file, or a Hub dataset name.")],
    row: Annotated[int, typer.Option(help="1-based row number (the line number in a .jsonl file).")] = 1,
    tokenizer: TokenizerOption = "tiny:qwen2",
) -> None:
    """Show one row's query, U, K and the rest as the tokenizer sees them, coloured by segment."""
    examples, _ = load_examples(file, skip_invalid=True)
    matches = [example for example in examples if example.row == row]
    if not matches:
        console.print(f"[red]error:[/red] {file}: no valid row {row}")
        raise typer.Exit(1)
    example = matches[0]
    tok = _tokenizer(tokenizer)
    rendered = render(example, tok)
    encoding = tok(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in encoding["offset_mapping"]]
    prompt_len, key_start, key_end = token_spans(starts, rendered)
    segments = [
        ("query (prompt)", 0, prompt_len, "cyan"),
        ("U: understanding", prompt_len, key_start, "yellow"),
        ("K: key sentence", key_start, key_end, "bold magenta"),
        ("rest of trace and answer", key_end, len(starts), "white"),
    ]
    console.print(f"{file} row {row}: {'harmful' if example.unsafe else 'benign'}, {len(starts)} tokens")
    text = Text()
    for name, start, end, style in segments:
        console.print(f"  [{style}]{name}[/{style}]: tokens [{start}, {end})")
        text.append(tok.decode(encoding["input_ids"][start:end]), style=style)
    console.print(text)
