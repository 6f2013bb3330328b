"""The `safekey-trl` command line: `train`, `export`, `data validate|inspect|convert|annotate|stats`, `eval`,
`eval-report` and `eval-probes`. The commands are thin: the logic lives in the modules they import, each inside the
command that needs it, so that `--help` and `recipes` start at once, without loading torch, transformers or TRL."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import subprocess
from collections.abc import Iterator
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from .cli_style import TRL_STYLE, RecipeHelpCommand

# TRL's flag style everywhere: `--max_length`, `--skip_invalid true`; the dashed spellings are hidden aliases
app = typer.Typer(help="SafeKey safety alignment for reasoning models, on TRL.", no_args_is_help=True, **TRL_STYLE)
data_app = typer.Typer(
    help="Check, convert, annotate and look at SafeKey-format data.", no_args_is_help=True, **TRL_STYLE
)
app.add_typer(data_app, name="data")
# No hard wrapping: an error line keeps its file, row and field in one piece
console = Console(soft_wrap=True)


@contextlib.contextmanager
def _bad_input(invalid_hint: str = "") -> Iterator[None]:
    """Turn bad input into one clear line and an exit code, never a traceback: 1 for rows that break the format
    (the message names the file, the row and the field), 2 for anything else wrong with the input or options."""
    from .data.rows import SafeKeyDataError

    try:
        yield
    except SafeKeyDataError as error:
        console.print(f"[red]invalid:[/red] {escape(str(error))}{invalid_hint}")
        raise typer.Exit(1) from None
    except (OSError, ValueError, ImportError) as error:
        # OSError: a full disk or an output that cannot be written, reported by the code that wrote (one line)
        message = str(error)
        if isinstance(error, OSError) and error.errno and error.strerror:
            message = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
        console.print(f"[red]error:[/red] {escape(message)}")
        raise typer.Exit(2) from None


TokenizerOption = Annotated[
    str | None,
    typer.Option(
        help="Tokenizer name or path; `tiny:qwen2` is the embedded offline one. Default: the recipe's model with "
        "--recipe, else tiny:qwen2 (a toy's counts)."
    ),
]
RecipeOption = Annotated[
    str | None,
    typer.Option(
        help="Count as a recipe trains: its model's tokenizer, chat template settings and max_length; without FILE, "
        "its data (`dataset_name` or the `datasets` mixture)."
    ),
]


@app.command(cls=RecipeHelpCommand, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    recipe: Annotated[
        str,
        typer.Option(
            "--config",
            "--recipe",
            help="Recipe name under recipes/ (e.g. tiny, qwen7b) or a YAML path (TRL: --config).",
        ),
    ] = "tiny",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print trainable parameters and a GPU memory estimate, then stop.")
    ] = False,
    accelerate: Annotated[
        str | None,
        typer.Option(
            "--accelerate",
            "--accelerate_config",
            help="Launch with accelerate: a config in recipes/accelerate/ (ddp, zero3, fsdp...) or a path "
            "(TRL: --accelerate_config).",
        ),
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
        except (FileNotFoundError, ValueError) as error:
            console.print(f"[red]error:[/red] {escape(str(error))}")
            raise typer.Exit(2) from None
        console.print(" ".join(command), markup=False)
        try:
            raise typer.Exit(subprocess.run(command).returncode)
        except KeyboardInterrupt:
            # the launched processes got the Ctrl-C too, and each reports the last checkpoint itself
            raise typer.Exit(130) from None
    with _bad_input():
        if dry_run:
            from .plan import plan_recipe

            console.print(plan_recipe(recipe, list(ctx.args)).render(), markup=False)
            return
        script_args, training_args, model_args = parse_recipe(recipe, list(ctx.args))
        # Fail now, not in the first step, when the attention kernel asked for cannot run here
        resolve_attn_implementation(model_args.attn_implementation)
    with _bad_input("\n(use --skip_invalid true to skip such rows with a report)"):
        try:
            run_training(script_args, training_args, model_args)
        except KeyboardInterrupt:
            _report_interrupted_training(training_args.output_dir)
            raise typer.Exit(130) from None


def _report_interrupted_training(output_dir: str) -> None:
    from .resume import latest_complete_checkpoint

    # A checkpoint being written when the Ctrl-C came is not complete: never recommend it
    last = latest_complete_checkpoint(output_dir)
    if last is None:
        console.print(f"[yellow]interrupted:[/yellow] no checkpoint saved yet in {escape(output_dir)}")
    else:
        console.print(
            f"[yellow]interrupted:[/yellow] the last checkpoint is {escape(last)}; resume with the same command and "
            f"--resume_from_checkpoint {escape(last)}"
        )


@app.command("export")
def export_command(
    run_dir: Annotated[str, typer.Argument(help="A run's output_dir or one of its checkpoint-* directories.")],
    out: Annotated[str, typer.Option(help="Directory to write the exported model to.")],
    merge: Annotated[bool, typer.Option(help="Merge a LoRA adapter into the base weights.")] = False,
    dtype: Annotated[str, typer.Option(help="dtype of merged weights: bfloat16, float16 or float32.")] = "bfloat16",
    push_to_hub: Annotated[
        str | None,
        typer.Option(help="Also upload the export to this Hub repo (user/name)."),
    ] = None,
    private: Annotated[bool, typer.Option(help="Create the Hub repo private.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a previous export in --out (never a file no export wrote).")
    ] = False,
) -> None:
    """Export a run: the model (or LoRA adapter, or adapter merged into the base), its safety head beside it and
    SafeKey's model card; `--push_to_hub REPO` uploads them."""
    from .export import export

    with _bad_input():
        path = export(
            run_dir,
            out,
            merge=merge,
            dtype=dtype,
            push_to_hub=push_to_hub,
            private=private or None,
            overwrite=overwrite,
        )
    console.print(f"exported to {path} (model loads with AutoModelForCausalLM; head in safekey_head.safetensors)")
    if push_to_hub is not None:
        console.print(f"pushed to https://huggingface.co/{push_to_hub}")


@app.command("recipes")
def recipes_command() -> None:
    """List the recipes and accelerate configs shipped with safekey-trl (`train --recipe NAME`, `--accelerate`)."""
    from .resources import recipes_dir, shipped_accelerate_configs, shipped_recipes

    console.print(f"recipes ({recipes_dir()}):")
    for recipe in shipped_recipes():
        console.print(f"  {recipe.name:<14} {recipe.model or '':<42} {recipe.description}", markup=False)
    console.print("accelerate configs (train --accelerate NAME):")
    for config in shipped_accelerate_configs():
        console.print(f"  {config.name:<14} {config.description}", markup=False)
    console.print("A path, or ./recipes/NAME.yaml in the current directory, wins over a shipped recipe of that name.")


TemplateOption = Annotated[
    str | None,
    typer.Option(
        help="Render in a model family's format: a family (r1_distill, deepseek_v3, qwen3, gpt_oss, nemotron_3, "
        "glm4_moe, gemma4, phi4_reasoning, olmo3_think) or a .jinja chat template file. Default: the tokenizer's own "
        "template."
    ),
]


def _tokenizer(name: str, template: str | None = None):
    """The tokenizer, its chat template replaced by `template`'s; the tiny one gets the family's special tokens too."""
    from .data.chat_formats import CHAT_FORMATS, family_template
    from .tiny import build_tiny_tokenizer, is_tiny_model_name, load_tokenizer

    if is_tiny_model_name(name) and template in CHAT_FORMATS:
        return build_tiny_tokenizer(family=template)
    try:
        tokenizer = load_tokenizer(name)
    except FileNotFoundError:
        raise  # a Hub name not in the cache, offline: already one line saying so
    except OSError as error:  # not found
        raise ValueError(
            f"cannot load the tokenizer {name!r}: {str(error).splitlines()[0]} (pass --tokenizer; tiny:qwen2 works "
            "offline)"
        ) from None
    if template is not None:
        tokenizer.chat_template = family_template(template)
        if template not in CHAT_FORMATS:
            from .data.chat_formats import ChatFormatError, resolve_chat_format

            try:  # a file whose template is no known family: say which file
                resolve_chat_format(tokenizer)
            except ChatFormatError as error:
                raise ChatFormatError(f"--template {template}: {error}") from None
    return tokenizer


@dataclasses.dataclass
class _Counting:
    """What a data command counts with: the tokenizer, the rendering, `max_length`, and the recipe's data."""

    tokenizer: object
    chat_format: object  # a ResolvedFormat
    max_length: int | None
    described: str  # which tokenizer counted, in words
    script_args: object | None = None


def _counting(tokenizer: str | None, template: str | None, recipe: str | None, max_length: int | None) -> _Counting:
    """The tokenizer a data command counts with: `--tokenizer`, else the recipe's model's (with the recipe's
    `chat_template_path`, `eos_token`, `pad_token`, chat format and `max_length`), else the toy tiny one."""
    from .data.chat_formats import resolve_chat_format

    if recipe is None:
        name = tokenizer or "tiny:qwen2"
        tok = _tokenizer(name, template)
        described = name if tokenizer else f"{name} (the embedded toy tokenizer: --recipe or --tokenizer for a model)"
        return _Counting(tok, resolve_chat_format(tok), max_length, described)
    from .modeling import apply_tokenizer_settings
    from .sft import parse_recipe, recipe_chat_format

    # Parsed as the dry run parses it: a GPU recipe's bf16 need not stop a CPU machine from counting
    script_args, training_args, model_args = parse_recipe(recipe, ["--use_cpu", "true"])
    name = tokenizer or model_args.model_name_or_path
    tok = _tokenizer(name, template)
    if template is None:
        apply_tokenizer_settings(tok, training_args)
        chat_format = recipe_chat_format(script_args, tok)
    else:
        chat_format = resolve_chat_format(tok)
    described = f"{name} ({'--tokenizer' if tokenizer else f'the model of recipe {recipe}'})"
    length = max_length if max_length is not None else training_args.max_length
    return _Counting(tok, chat_format, length, described, script_args)


def _data_to_count(file: str | None, counting: _Counting, recipe: str | None, skip_invalid: bool):
    """FILE's examples, or the recipe's data: `(examples, invalid-row report, label, mixture description)`."""
    from .data import load_examples
    from .resources import resolve_dataset_path

    if file is not None:
        examples, report = load_examples(file, skip_invalid=skip_invalid)
        return examples, report, file, None
    if recipe is None:
        raise ValueError("give a FILE or --recipe")
    from .data.mixture import load_mixture
    from .sft import check_recipe_data

    script_args = counting.script_args
    check_recipe_data(script_args)
    if script_args.datasets:
        examples, mixture = load_mixture(script_args.datasets, skip_invalid=skip_invalid)
        return examples, mixture.invalid, f"{recipe} mixture", mixture.describe()
    name = resolve_dataset_path(script_args.dataset_name)
    examples, report = load_examples(name, split=script_args.dataset_train_split, skip_invalid=skip_invalid)
    return examples, report, name, None


@data_app.command()
def validate(
    file: Annotated[
        str | None, typer.Argument(help="A .jsonl, .json or .parquet file, or a Hub dataset name.")
    ] = None,
    tokenizer: TokenizerOption = None,
    template: TemplateOption = None,
    max_length: Annotated[
        int | None, typer.Option(help="Count the K spans this length would cut (default: the recipe's).")
    ] = None,
    skip_invalid: Annotated[
        bool, typer.Option(help="Report every invalid row instead of stopping at the first.")
    ] = True,
    recipe: RecipeOption = None,
    num_proc: Annotated[
        int,
        typer.Option(help="Processes rendering and tokenizing the rows (each holds its own copy of the tokenizer)."),
    ] = 1,
) -> None:
    """Check every row against the format and a tokenizer; report counts."""
    from .data import featurize

    with _bad_input():
        counting = _counting(tokenizer, template, recipe, max_length)
        examples, report, file, mixture = _data_to_count(file, counting, recipe, skip_invalid)
        rows_read = len(examples) + report.count
        max_length = counting.max_length
        _, stats = featurize(
            examples,
            counting.tokenizer,
            max_length,
            skip_invalid=skip_invalid,
            report=report,
            chat_format=counting.chat_format,
            num_proc=num_proc,
            status_only=True,  # counts and errors only: no token lists written to the cache
        )
    invalid_rows = {(error.source, error.row) for error in report.errors}
    valid = [example for example in examples if (example.source, example.row) not in invalid_rows]
    harmful = sum(example.unsafe for example in valid if not example.lm_only)
    lm_only = sum(example.lm_only for example in valid)
    if mixture is not None:
        console.print(escape(mixture))
    console.print(f"{file}: {rows_read} rows read, rendered in the {counting.chat_format.template_name} format")
    console.print(f"  tokens counted with {escape(counting.described)}")
    console.print(f"  valid: {len(valid)} ({harmful} harmful, {len(valid) - harmful - lm_only} benign)")
    if lm_only:
        console.print(f"  LM-only (no U/K, plain SFT): {lm_only}")
    console.print(f"  K in the answer (outside the trace): {sum(example.key_in_answer for example in valid)}")
    if report.duplicates:
        console.print(f"[yellow]  {escape(report.duplicates_summary())}[/yellow]")
    if report.implausible:
        console.print(f"[yellow]  {escape(report.implausible_summary())}[/yellow]")
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
    tokenizer: TokenizerOption = None,
    template: TemplateOption = None,
    recipe: Annotated[
        str | None, typer.Option(help="Render as a recipe trains: its model's tokenizer and chat template settings.")
    ] = None,
) -> None:
    """Show one row's query, U, K and the rest as the tokenizer sees them, coloured by segment."""
    from .data import load_examples, tokenize_example

    with _bad_input():
        examples, _ = load_examples(file, skip_invalid=True)
    matches = [example for example in examples if example.row == row]
    if not matches:
        console.print(f"[red]error:[/red] {file}: no valid row {row}")
        raise typer.Exit(1)
    example = matches[0]
    with _bad_input():
        counting = _counting(tokenizer, template, recipe, None)
        tok = counting.tokenizer
        tokenized = tokenize_example(example, tok, counting.chat_format)
    input_ids, prompt_len = tokenized.input_ids, tokenized.prompt_len
    key_start, key_end = tokenized.key_start, tokenized.key_end
    segments = [
        ("query (prompt)", 0, prompt_len, "cyan"),
        ("U: understanding", prompt_len, key_start, "yellow"),
        ("K: key sentence", key_start, key_end, "bold magenta"),
        ("rest of trace and answer", key_end, len(input_ids), "white"),
    ]
    console.print(
        f"{file} row {row}: {'harmful' if example.unsafe else 'benign'}, {len(input_ids)} tokens, "
        f"in the {counting.chat_format.template_name} format"
    )
    console.print(f"  tokens counted with {escape(counting.described)}")
    text = Text()
    for name, start, end, style in segments:
        console.print(f"  [{style}]{name}[/{style}]: tokens [{start}, {end})")
        text.append(tok.decode(input_ids[start:end]), style=style)
    console.print(text)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: `eval`, `eval-report`, `eval-probes` (the logic lives in evaluation/ and probes.py)


def default_eval_dir(model: str):
    """`<model's name>-eval`: beside a local model directory (a run's output_dir), else in the current directory."""
    import re
    from pathlib import Path

    path = Path(model)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", path.name or model).strip("_.") or "model"
    return (path.parent if path.is_dir() else Path()) / f"{name}-eval"


@app.command("eval")
def eval_command(
    model: Annotated[
        str, typer.Argument(help="A trained model or LoRA adapter directory, a Hub name, or tiny:qwen2.")
    ],
    suite: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated suites: strongreject, jailbreakbench, wildjailbreak, harmbench, advbench, "
            "sorry-bench, hex-phi, fortress, airbench, advbench-prefill, safekey-multiturn (harmful); xstest, "
            "jailbreakbench-benign, phtest, orbench-hard, falsereject, coconot (over-refusal); aime24, math500, "
            "gpqa-diamond (capability; livecodebench with --backend lighteval); name=FILE for a local copy of one (it "
            "replaces the preset's Hub load); or prompt files (.jsonl, .json multi-turn, .csv goal,target prefilling "
            "or WildChat-style)."
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="A named protocol: safekey-reference (alias paper: the SafeKey reference's suites, decoding, "
            "wording and judge) or deepseek-r1 (DeepSeek-R1's capability protocol). Add local suites with --suite."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N prompts of each suite.")] = None,
    sample: Annotated[
        int | None, typer.Option(help="Draw N prompts of each suite with --seed (0: all). Default: the suite's own.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of --sample (default: the suite's, 42).")] = None,
    output_dir: Annotated[
        str | None,
        typer.Option(
            help="Where the results (and the weights of a LoRA adapter merged for vLLM) go. Default: <model's "
            "name>-eval, beside a local model directory, else in the current one."
        ),
    ] = None,
    out: Annotated[
        str | None, typer.Option(help="Results JSONL, appended to and resumed. Default: OUTPUT_DIR/<label>.jsonl.")
    ] = None,
    label: Annotated[str | None, typer.Option(help="The model's name in results and reports.")] = None,
    chat_format: Annotated[
        str,
        typer.Option(
            help="The model family rendering prompts and splitting responses, as in training: auto (recognise the "
            "chat template), a family (r1_distill, qwen3, gpt_oss, ...) or verbatim."
        ),
    ] = "auto",
    chat_format_turn: Annotated[
        str | None,
        typer.Option(
            help="As a recipe's chat_format_turn: the assistant turn as the model writes it after the generation "
            "prompt, with {trace} and {answer}, for a family the table does not know."
        ),
    ] = None,
    chat_template_kwargs: Annotated[
        str | None,
        typer.Option(help='Chat template variables as JSON, as a recipe\'s: \'{"reasoning_effort": "high"}\'.'),
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Generation length limit [default: 8000].")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(help="Repetition penalty [default: 1.2].")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature; 0 is greedy [default: 0].")] = None,
    top_p: Annotated[float | None, typer.Option(help="Top-p of sampling [default: 1].")] = None,
    samples: Annotated[
        int | None, typer.Option(help="Rollouts per prompt (default: the preset's, or the suite's convention).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts per generation batch (8; vllm 256).")] = None,
    prefill: Annotated[
        str | None, typer.Option(help="Prefilling attack: text forced at the start of every trace without its own.")
    ] = None,
    prefill_tokens: Annotated[
        int | None, typer.Option(help="Force only the first N tokens of --prefill (AdvBench-style: 20).")
    ] = None,
    prefill_on: Annotated[
        str, typer.Option(help="Which prompts --prefill attacks: harmful (the attack's targets) or all.")
    ] = "harmful",
    prefill_separator: Annotated[
        str, typer.Option(help="Put before a forced prefill, after the trace's opening (the reference's space).")
    ] = " ",
    backend: Annotated[
        str,
        typer.Option(
            help="auto (vllm where it can run), transformers, vllm, replay (with --replay), or lighteval (AIME, "
            "MATH-500, GPQA-Diamond run by lighteval as open-r1 runs them)."
        ),
    ] = "auto",
    code_sandbox: Annotated[
        bool,
        typer.Option(
            "--code_sandbox",
            help="This machine is a sandbox where model-written code may run (livecodebench under lighteval).",
        ),
    ] = False,
    replay: Annotated[
        str | None,
        typer.Option(help="Replay completions from this JSONL ({suite, id, sample, completion}), not generate."),
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto, bfloat16, float16 or float32.")] = "auto",
    tensor_parallel_size: Annotated[int, typer.Option(help="vllm: GPUs to split the model over.")] = 1,
    max_model_len: Annotated[
        int | None,
        typer.Option(help="vllm: context length; default: the longest prompt plus --max_new_tokens (never less)."),
    ] = None,
    gpu_memory_utilization: Annotated[
        float | None,
        typer.Option(help="vllm: its share of GPU memory (default 0.9, less what a --classifier on the GPU needs)."),
    ] = None,
    lora: Annotated[
        str, typer.Option(help="A LoRA adapter MODEL under vllm: auto, serve (LoRARequest) or merge first.")
    ] = "auto",
    judge_url: Annotated[str | None, typer.Option(help="OpenAI-compatible API root; SAFEKEY_JUDGE_BASE_URL.")] = None,
    judge_model: Annotated[str | None, typer.Option(help="Judge model name; env SAFEKEY_JUDGE_MODEL.")] = None,
    judge_api_key: Annotated[str | None, typer.Option(help="Judge API key; env SAFEKEY_JUDGE_API_KEY.")] = None,
    judge_rubric: Annotated[
        str | None,
        typer.Option(
            help="Harmfulness rubric: project, reference (the SafeKey reference's; the presets'), or strongreject "
            "(StrongREJECT's published rubric, a 0-1 score)."
        ),
    ] = None,
    judge_prompt: Annotated[
        str | None,
        typer.Option(help="Harmfulness judge prompt file, with {request} and {response} (instead of the rubric)."),
    ] = None,
    refusal_prompt: Annotated[
        str | None, typer.Option(help="Refusal judge prompt file (benign prompts), with {request} and {response}.")
    ] = None,
    judge_part: Annotated[
        str | None,
        typer.Option(
            help="What the judge reads: both (trace and answer), trace, or answer (reference: --part). Default: both "
            "for an endpoint or --classifier, answer (the trace stripped) for --guard."
        ),
    ] = None,
    judge_max_tokens: Annotated[
        int | None, typer.Option(help="Judge output limit (default 512; 1024 for the reference rubric's analysis).")
    ] = None,
    judge_timeout: Annotated[float, typer.Option(help="Seconds per judge request.")] = 120.0,
    judge_retries: Annotated[int, typer.Option(help="Retries of a failed judge request.")] = 3,
    judge_backoff: Annotated[float, typer.Option(help="Seconds before the first retry, doubled at each.")] = 2.0,
    judge_workers: Annotated[int, typer.Option(help="Judge requests in flight at once.")] = 8,
    classifier: Annotated[
        str | None, typer.Option(help="A local Llama-Guard-style classifier to judge with, instead of an endpoint.")
    ] = None,
    classifier_batch_size: Annotated[int, typer.Option(help="Conversations per classifier batch.")] = 16,
    guard: Annotated[
        str | None,
        typer.Option(
            help="Local guard models judging harmfulness, comma-separated: llama-guard-3, wildguard, qwen3guard, "
            "harmbench (its classifier); NAME=MODEL loads one from a directory. Several vote (--vote_min)."
        ),
    ] = None,
    vote_min: Annotated[
        int | None,
        typer.Option(help="Harmful when at least this many guards say so (default: a strict majority; a tie is not)."),
    ] = None,
    guard_batch_size: Annotated[int, typer.Option(help="Conversations per guard batch.")] = 16,
    guard_max_tokens: Annotated[
        int | None, typer.Option(help="The guards' context: longer judged texts are cut (default: each one's own).")
    ] = None,
    no_judge: Annotated[bool, typer.Option("--no-judge", help="Only generate; judge later by running again.")] = False,
    threshold: Annotated[
        int, typer.Option(help="A harmfulness score at least this counts as harmful (recorded in every row).")
    ] = 4,
) -> None:
    """Generate answers to safety, over-refusal and capability suites, judge or score them, and print the rates.
    Exits 1 when a rollout could not be judged or scored (run again to retry it)."""
    from pathlib import Path

    # Options that cannot work are refused before anything loads, by name
    _refuse_eval_options(
        limit=limit,
        sample=sample,
        samples=samples,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        prefill_tokens=prefill_tokens,
        tensor_parallel_size=tensor_parallel_size,
        max_model_len=max_model_len,
        judge_timeout=judge_timeout,
        judge_retries=judge_retries,
        judge_workers=judge_workers,
        classifier_batch_size=classifier_batch_size,
        threshold=threshold,
        guard_batch_size=guard_batch_size,
        guard_max_tokens=guard_max_tokens,
        vote_min=vote_min,
    )
    from .data.chat_formats import resolve_chat_format
    from .evaluation import (
        JUDGED_PARTS,
        JudgePrompt,
        PromptFileError,
        default_results_path,
        get_preset,
        load_eval_tokenizer,
        load_suite,
        make_generator,
        make_judge,
        render_prompt,
        run_eval,
        suite_sampling,
        summarize,
        summary_table,
        turn_layout,
        with_prefill,
    )
    from .evaluation.access import GatedAccessError
    from .evaluation.lighteval import LightevalFailed
    from .evaluation.suites import DEFAULT_PROMPT_FORMAT

    label = label or model
    path = None  # the results file, once known (a disk that fills is reported against it)
    try:
        chosen = get_preset(preset) if preset is not None else None
        if judge_part is not None and judge_part not in JUDGED_PARTS:
            raise ValueError(f"--judge_part {judge_part!r}: use {', '.join(JUDGED_PARTS)}.")
        if replay is not None and backend not in ("auto", "replay"):
            raise ValueError(f"--replay replays completions: it takes no --backend {backend}.")
        backend = "replay" if replay is not None else backend
        specs = [spec.strip() for spec in (suite or "").split(",") if spec.strip()]
        # Options given override the preset's settings (or the reference's safety protocol without a preset)
        overrides = {
            name: value
            for name, value in (
                ("max_new_tokens", max_new_tokens),
                ("repetition_penalty", repetition_penalty),
                ("temperature", temperature),
                ("top_p", top_p),
                ("samples", samples),
            )
            if value is not None
        }
        if backend == "lighteval":
            # What lighteval does not take would be left out without a word: refused instead
            given = {
                "--limit": limit,
                "--sample": sample,
                "--prefill": prefill,
                "--chat_format_turn": chat_format_turn,
                "--chat_template_kwargs": chat_template_kwargs,
            }
            unused = [name for name, value in given.items() if value is not None]
            if unused:
                raise ValueError(
                    f"--backend lighteval runs whole tasks with the model's template: it takes no {', '.join(unused)}."
                )
            engine = dict(
                dtype=dtype,
                tensor_parallel_size=tensor_parallel_size,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
            )
            _run_lighteval(model, specs, chosen, output_dir, code_sandbox, lora, overrides, engine)
            return
        if chosen is not None:
            # A local copy given as NAME=FILE stands in for the preset's Hub load of NAME
            local = {spec.partition("=")[0] for spec in specs if "=" in spec}
            specs = list(dict.fromkeys([*(name for name in chosen.suites if name not in local), *specs]))
        if not specs:
            raise ValueError("Give --suite (or --preset safekey-reference).")
        prompt_format = chosen.prompt_format if chosen is not None else DEFAULT_PROMPT_FORMAT
        sampling = {}
        prompts = []
        for spec in specs:
            loaded = load_suite(spec, limit, sample, seed, prompt_format)
            for name in {p.suite for p in loaded}:
                sampling[name] = suite_sampling(spec, chosen, **overrides)
            prompts += loaded
        if prefill is not None:
            prompts = with_prefill(prompts, prefill, prefill_tokens, prefill_on)
        _check_generation_length(model, sampling, max_new_tokens is not None)
        directory = Path(output_dir) if output_dir is not None else default_eval_dir(model)
        path = out or directory / default_results_path(label).name
        from .outputs import check_writable

        check_writable(Path(path).parent, "--out")  # a read-only or full disk found now, not after generating
        tokenizer = load_eval_tokenizer(model)
        template_kwargs = _json_mapping(chat_template_kwargs, "--chat_template_kwargs")
        layout = turn_layout(tokenizer, resolve_chat_format(tokenizer, chat_format, chat_format_turn, template_kwargs))
        rubric = judge_rubric or (chosen.rubric if chosen is not None else "project")
        harm_prompt = JudgePrompt.from_file(judge_prompt) if judge_prompt is not None else rubric
        refusal = JudgePrompt.from_file(refusal_prompt) if refusal_prompt is not None else None
        endpoint = dict(
            timeout=judge_timeout,
            max_retries=judge_retries,
            backoff=judge_backoff,
            max_workers=judge_workers,
            rubric=harm_prompt,
            max_tokens=judge_max_tokens,
            refusal_prompt=refusal,
        )
        judge = make_judge(
            guard=guard,
            classifier=classifier,
            no_judge=no_judge,
            judge_url=judge_url,
            judge_model=judge_model,
            judge_api_key=judge_api_key,
            endpoint=endpoint,
            vote_min=vote_min,
            guard_batch_size=guard_batch_size,
            guard_max_tokens=guard_max_tokens,
            classifier_batch_size=classifier_batch_size,
            dtype=dtype,
            threshold=threshold,
        )
        rendered = [(render_prompt(tokenizer, p, layout, prefill_separator), sampling[p.suite]) for p in prompts]
        engine = _engine_settings(backend, model, tokenizer, rendered, max_model_len, gpu_memory_utilization, judge)
        generator, tokenizer = make_generator(
            model,
            backend,
            batch_size,
            dtype,
            tensor_parallel_size=tensor_parallel_size,
            lora_mode=lora,
            merge_dir=directory / "merged",
            tokenizer=tokenizer,
            replay=replay,
            **engine,
        )
        recorded = {"preset": chosen.name if chosen is not None else None, "harm_threshold": threshold}
        rows = run_eval(
            prompts,
            generator,
            tokenizer,
            path,
            label,
            judge,
            sampling,
            recorded,
            chat_format=layout,
            judge_part=judge_part,
            prefill_separator=prefill_separator,
        )
    except (FileNotFoundError, ValueError, PromptFileError, ImportError, GatedAccessError) as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt as stop:
        _report_interrupted_eval(stop)
    except OSError as error:
        from .outputs import DiskFullError, NotWritableError, device_of, is_disk_full

        if isinstance(error, (NotWritableError, DiskFullError)):  # found before generating
            console.print(f"[red]error:[/red] {escape(error.strerror)}")
            raise typer.Exit(2) from None
        if path is None or not is_disk_full(error, Path(path)):
            raise
        console.print(
            f"[red]error:[/red] no space left on {escape(device_of(path))} while writing {escape(str(path))}; kept: "
            "the rows already written there; run the same command again once there is room (it resumes)"
        )
        raise typer.Exit(2) from None
    except LightevalFailed as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(1) from None
    summaries = summarize(rows, threshold)
    console.print(summary_table(summaries))
    errors = [error for summary in summaries for error in summary.errors]
    for error in errors[:5]:
        console.print(f"[yellow]unjudged[/yellow] {escape(error)}")
    console.print(f"results: {path}")
    if errors:
        console.print(
            f"[red]{len(errors)} rollout(s) could not be judged or scored[/red]: run the same command again to retry "
            "them (their responses are kept)."
        )
        raise typer.Exit(1)


def _engine_settings(
    backend: str,
    model: str,
    tokenizer,
    rendered: list,
    max_model_len: int | None,
    gpu_memory_utilization: float | None,
    judge,
) -> dict:
    """vLLM's context length (what the run needs: the longest rendered prompt plus its max_new_tokens) and its memory
    share (room left for a classifier judge already on the GPU); nothing for the other backends."""
    from .evaluation.generation import (
        check_model_len,
        engine_memory_share,
        kv_cache_bytes,
        required_model_len,
        vllm_available,
    )

    if backend not in ("vllm", "auto") or (backend == "auto" and not vllm_available()):
        return {}
    needed = required_model_len(tokenizer, rendered)
    length = check_model_len(max_model_len, needed, _model_limit(model))
    share = gpu_memory_utilization
    local = [m for m in (judge.local_models() if judge is not None else []) if m.device.type == "cuda"]
    if local:
        import torch

        free, total = torch.cuda.mem_get_info(local[0].device)
        # Each local judge's cache for a batch of the longest conversations, plus 1 GiB for its activations
        reserve = sum(kv_cache_bytes(m.config, judge.batch_size * (length + 512)) + (1 << 30) for m in local)
        share = engine_memory_share(free, total, reserve, gpu_memory_utilization)
    return {"max_model_len": length, "gpu_memory_utilization": share}


def _refuse_eval_options(**values: int | float | None) -> None:
    """`eval`'s counts that cannot work (`--limit -1` would drop the last prompt, `--judge_workers 0` fail after
    generating), refused by name before anything loads."""
    least = {"sample": 0, "judge_retries": 0}
    for name, value in values.items():
        if value is None or name in ("judge_timeout", "threshold"):
            continue
        if value < least.get(name, 1):
            console.print(f"[red]error:[/red] --{name} must be at least {least.get(name, 1)}, got {value}")
            raise typer.Exit(2)
    if not values.get("judge_timeout", 1) > 0:
        console.print(
            f"[red]error:[/red] --judge_timeout must be a number of seconds > 0, got {values['judge_timeout']}"
        )
        raise typer.Exit(2)
    if not 1 <= values.get("threshold", 1) <= 5:
        console.print(
            f"[red]error:[/red] --threshold must be a harmfulness score from 1 to 5, got {values['threshold']}"
        )
        raise typer.Exit(2)


def _check_generation_length(model: str, sampling: dict, given: bool) -> None:
    """Refuse a generation length the model has no room for (`--max_new_tokens` not below its positions)."""
    positions = _model_limit(model)
    if positions is None:
        return
    for suite, settings in sampling.items():
        if settings.max_new_tokens >= positions:
            where = "--max_new_tokens" if given else f"the preset's max_new_tokens for {suite}"
            raise ValueError(
                f"{where} {settings.max_new_tokens} is not below {model}'s {positions} positions "
                "(max_position_embeddings): the prompt and the generation must fit in them"
            )


def _report_interrupted_eval(stop: KeyboardInterrupt) -> None:
    """Ctrl-C during `eval`: say what the results file holds and how to resume, then leave at once (the judge
    requests still in flight are not waited for: each row is flushed as it is written, so nothing is lost)."""
    import os
    import sys

    from .evaluation.runner import EvalInterrupted

    if isinstance(stop, EvalInterrupted):
        console.print(
            f"[yellow]interrupted:[/yellow] {stop.path} holds {stop.judged} judged rollout(s) of {stop.total}, and "
            f"{stop.unjudged} generated but not yet judged (kept: they are judged without generating again). Run the "
            "same command again to resume."
        )
    else:
        console.print("[yellow]interrupted[/yellow] before generation began; nothing was written")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def _json_mapping(text: str | None, option: str) -> dict | None:
    """A JSON object given on the command line (None when not given); anything else is an error naming the option."""
    import json

    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{option} {text!r} is not JSON: {error.msg}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a JSON object, got {text!r}")
    return value


def _run_lighteval(
    model: str,
    specs: list[str],
    preset,
    output_dir: str | None,
    code_sandbox: bool,
    lora: str,
    overrides: dict,
    engine: dict,
) -> None:
    """`eval --backend lighteval`: the capability suites run by lighteval as open-r1 runs them, grouped by their
    decoding settings (a preset's, then the options'), and its results shown."""
    from pathlib import Path

    from .evaluation import suite_sampling
    from .evaluation.generation import merge_adapter, model_path, plan_lora
    from .evaluation.lighteval import LIGHTEVAL_TASKS, check_lighteval_suites, lighteval_command, run_lighteval

    if preset is not None:
        specs = list(dict.fromkeys([*(name for name in preset.suites if name in LIGHTEVAL_TASKS), *specs]))
    names = check_lighteval_suites(specs, code_sandbox)
    directory = Path(output_dir) if output_dir is not None else default_eval_dir(model)
    path = model_path(model)
    plan = plan_lora(path, lora)
    if plan is not None:  # lighteval's vLLM loads full weights: a LoRA adapter is merged into its base first
        dtype = "bfloat16" if engine["dtype"] == "auto" else engine["dtype"]
        path = str(merge_adapter(plan, directory / "merged" / Path(path).name, dtype))
    groups: dict = {}
    for name in names:
        groups.setdefault(suite_sampling(name, preset, **overrides), []).append(name)
    for sampling, group in groups.items():
        if sampling.samples > 1:
            note = "lighteval's tasks draw their own samples per problem: --samples is not passed to it"
            console.print(f"[yellow]note:[/yellow] {note}")
        command = lighteval_command(path, group, sampling, directory / "lighteval", **engine)
        console.print(f"running: {escape(' '.join(command.argv))}")
        results_file, results = run_lighteval(command)
        for task, metrics in results.items():
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
            console.print(f"{escape(task)}: {escape(shown)}")
        console.print(f"lighteval results: {results_file}")


def _model_limit(model: str) -> int | None:
    """The model's context (`max_position_embeddings`) where its config can be read."""
    try:
        from transformers import AutoConfig

        from .evaluation.generation import model_path

        config = AutoConfig.from_pretrained(model_path(model))
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(config, "max_position_embeddings", None)
    except Exception:  # a LoRA adapter directory, no network: vLLM checks it itself
        return None


@app.command("eval-report")
def eval_report(
    results: Annotated[list[str], typer.Argument(help="Results JSONL files of `safekey-trl eval`, one per run.")],
    out: Annotated[str, typer.Option(help="The Markdown report to write.")] = "safekey_eval_report.md",
    threshold: Annotated[
        int | None,
        typer.Option(help="A score at least this counts as harmful (default: the threshold each run recorded, 4)."),
    ] = None,
    charts: Annotated[
        str | None, typer.Option(help="Also write PNG bar charts to this directory (needs matplotlib).")
    ] = None,
    bootstrap: Annotated[int, typer.Option(help="Resamples of the paired bootstrap comparing runs.")] = 10000,
    seed: Annotated[int, typer.Option(help="Seed of the paired bootstrap.")] = 0,
) -> None:
    """Compare runs side by side (base vs SafeKey): tables per kind of suite, bar charts, paired tests of each run
    against the first (McNemar's exact test, a seeded paired bootstrap), each suite's categories, how generation
    ended, the judges' agreement, how each run was made (with warnings where runs differ), and the sources."""
    from pathlib import Path

    from .evaluation import build_report, summarize, summary_table
    from .evaluation.report import load_runs, setting_warnings

    try:
        if bootstrap < 1:
            raise ValueError(f"--bootstrap {bootstrap}: give a positive number of resamples.")
        report = build_report(results, threshold, charts, bootstrap, seed)
        runs = load_runs(results)
        rows = [row for _, _, run_rows in runs for row in run_rows]
    except (FileNotFoundError, ValueError, KeyError, ImportError) as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(2) from None
    Path(out).write_text(report, encoding="utf-8")
    console.print(summary_table(summarize(rows, threshold)))
    for warning in setting_warnings(runs):
        console.print(f"[yellow]warning:[/yellow] {escape(warning[2:])}")
    console.print(f"report: {out}")


@app.command("eval-probes")
def eval_probes(
    model: Annotated[str, typer.Argument(help="A trained model directory (safety head beside it), or tiny:qwen2.")],
    data: Annotated[str, typer.Option(help="Held-out SafeKey-format data: .jsonl, .json, .parquet or a Hub name.")],
    split: Annotated[str, typer.Option(help="Split of a Hub dataset.")] = "train",
    max_length: Annotated[int | None, typer.Option(help="Truncate examples to this many tokens.")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = 4,
    theta: Annotated[float, typer.Option(help="θ mixing the head's two paths, as in training.")] = 0.5,
    head: Annotated[
        str | None, typer.Option(help="Directory holding safekey_head.safetensors (default: the model directory).")
    ] = None,
    out: Annotated[str | None, typer.Option(help="Write the metrics, per example too, to this JSON file.")] = None,
) -> None:
    """Judge-free probe metrics: safety-head accuracy/AUROC, K-token accuracy, K's attention on U vs the query."""
    import json
    from pathlib import Path

    from rich.table import Table

    from .data import SafeKeyDataError, load_safekey_dataset
    from .evaluation import load_eval_model
    from .heads import HEAD_WEIGHTS_NAME, DualPathSafetyHead
    from .probes import probe_metrics

    head_dir = Path(head or model)
    _refuse_eval_options(max_length=max_length, batch_size=batch_size)
    try:
        positions = _model_limit(model)
        if max_length is not None and positions is not None and max_length > positions:
            raise ValueError(
                f"--max_length {max_length} is more than {model}'s {positions} positions (max_position_embeddings)"
            )
        language_model, tokenizer = load_eval_model(model, attn_implementation="eager", dtype="float32")
        dataset, _, _ = load_safekey_dataset(data, tokenizer, max_length, split=split)
        safety_head = None
        if (head_dir / HEAD_WEIGHTS_NAME).is_file():
            safety_head = DualPathSafetyHead.from_pretrained(head_dir)
        elif head is not None:
            raise FileNotFoundError(f"{head_dir}: no {HEAD_WEIGHTS_NAME}")
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        metrics = probe_metrics(language_model, dataset, pad_token_id, safety_head, theta, batch_size, progress=True)
    except (FileNotFoundError, ValueError, SafeKeyDataError) as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(2) from None
    table = Table(title=f"SafeKey probes on {data} ({metrics.examples} examples, {metrics.key_tokens} K tokens)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.as_dict().items():
        if name not in ("examples", "key_tokens"):
            table.add_row(name, "n/a (no head)" if value is None else f"{value:.4f}")
    console.print(table)
    if out is not None:
        Path(out).write_text(json.dumps(metrics.as_dict(per_example=True), indent=2), encoding="utf-8")
        console.print(f"metrics: {out}")


@data_app.command()
def annotate(
    in_file: Annotated[str, typer.Argument(help="Rows with question/response or messages: .jsonl, .json, .parquet.")],
    out_file: Annotated[str, typer.Argument(help="Where to write the annotated rows: .jsonl, .json or .parquet.")],
    method: Annotated[str, typer.Option(help="heuristic (offline) or llm (an OpenAI-compatible endpoint).")] = (
        "heuristic"
    ),
    base_url: Annotated[str | None, typer.Option(help="llm: endpoint base URL [env SAFEKEY_LLM_BASE_URL].")] = None,
    model: Annotated[str | None, typer.Option(help="llm: model name [env SAFEKEY_LLM_MODEL].")] = None,
    api_key: Annotated[str | None, typer.Option(help="llm: API key [env SAFEKEY_LLM_API_KEY].")] = None,
    concurrency: Annotated[int, typer.Option(help="llm: requests in flight at once.")] = 8,
    timeout: Annotated[float, typer.Option(help="llm: seconds per request.")] = 60.0,
    retries: Annotated[int, typer.Option(help="llm: retries per row, with exponential back-off.")] = 4,
    cache: Annotated[str | None, typer.Option(help="llm: answer cache (default OUT.cache.jsonl beside OUT).")] = None,
    skip_invalid: Annotated[
        bool, typer.Option(help="Send malformed rows to OUT.failed.jsonl instead of stopping at the first.")
    ] = False,
) -> None:
    """Find U and K in every row's reasoning trace and write `summary_end_idx`/`next_sentence_end_idx`."""
    from .data.annotate import METHODS, AnnotationInterrupted, annotate_file, resolve_llm_settings, sidecar_path

    if method not in METHODS:
        console.print(f"[red]error:[/red] --method must be one of {', '.join(METHODS)}")
        raise typer.Exit(2)
    for name, value, least in (("--concurrency", concurrency, 1), ("--retries", retries, 0)):
        if value < least:
            console.print(f"[red]error:[/red] {name} must be at least {least}, got {value}")
            raise typer.Exit(2)
    if not timeout > 0:
        console.print(f"[red]error:[/red] --timeout must be a number of seconds > 0, got {timeout}")
        raise typer.Exit(2)
    settings = None
    with _bad_input("\n(use --skip_invalid to set such rows aside)"):
        if method == "llm":
            settings = resolve_llm_settings(
                base_url, model, api_key, concurrency=concurrency, timeout=timeout, max_retries=retries
            )
        try:
            report = annotate_file(in_file, out_file, method, settings, cache, skip_invalid)
        except AnnotationInterrupted as stop:
            kept = (
                f"the LLM's answers so far are kept in {stop.cache}: run the same command again to resume (only rows "
                "without a cached answer are sent)"
                if stop.cache is not None
                else "run the same command again to annotate them"
            )
            console.print(
                f"[yellow]interrupted:[/yellow] {stop.done} of {stop.total} rows annotated; nothing written to "
                f"{escape(out_file)} (rows are written at the end); {escape(kept)}"
            )
            raise typer.Exit(130) from None
    console.print(escape(report.summary()))
    console.print(f"  written: {out_file}")
    if report.failed:
        console.print(f"[red]  rows not annotated: {sidecar_path(out_file, 'failed')}[/red]")
        raise typer.Exit(1)


@data_app.command()
def convert(
    in_file: Annotated[str, typer.Argument(help="A .jsonl, .json or .parquet file, or a Hub dataset name.")],
    out_file: Annotated[str, typer.Argument(help="Where to write SafeKey-format rows: .jsonl, .json or .parquet.")],
    from_: Annotated[str, typer.Option("--from", help="Input layout: star1 or messages.")] = "star1",
    benign: Annotated[bool, typer.Option("--benign", help="Label every row benign (unsafe: false).")] = False,
    harmful: Annotated[bool, typer.Option("--harmful", help="Label every row harmful (unsafe: true).")] = False,
    column_map: Annotated[
        list[str] | None, typer.Option(help="Rename an input column first, as old=new (repeatable).")
    ] = None,
    annotate_with: Annotated[
        str | None, typer.Option("--annotate", help="Also find U and K: `heuristic` (for llm, run annotate after).")
    ] = None,
    skip_invalid: Annotated[bool, typer.Option(help="Skip bad rows with a report instead of stopping.")] = False,
) -> None:
    """Convert STAR-1 or `messages` rows to the SafeKey format (then annotate them, or chain with --annotate)."""
    from .data.annotate import annotate_rows, sidecar_path, write_rows
    from .data.convert import FORMATS, convert_file, parse_column_map

    if from_ not in FORMATS or (benign and harmful) or annotate_with not in (None, "heuristic"):
        console.print(
            f"[red]error:[/red] --from must be one of {', '.join(FORMATS)}; --benign and --harmful exclude each "
            "other; --annotate takes `heuristic`"
        )
        raise typer.Exit(2)
    label = "benign" if benign else "harmful" if harmful else None
    with _bad_input():
        rows, report = convert_file(
            in_file, from_, label, parse_column_map(column_map or []), skip_invalid, keep_offsets=annotate_with is None
        )
        if annotate_with is None:
            write_rows(out_file, rows)
            # the counts only once the rows are written: a failed write converted nothing
            console.print(escape(report.summary()))
            without = report.converted - report.with_offsets
            notes = [f"{report.with_offsets} with their offsets, checked"] if report.with_offsets else []
            if without:
                notes.append(f"{without} without offsets yet: `safekey-trl data annotate {out_file} OUT`")
            console.print(escape(f"  written: {out_file} ({'; '.join(notes)})"))
            return
        annotated, failed, annotate_report = annotate_rows(enumerate(rows, start=1), annotate_with, str(in_file))
        write_rows(out_file, annotated)
        if failed:
            write_rows(sidecar_path(out_file, "failed"), failed)
    console.print(escape(report.summary()))
    console.print(escape(annotate_report.summary()))
    console.print(f"  written: {out_file}")
    if failed:
        console.print(f"[red]  rows not annotated: {sidecar_path(out_file, 'failed')}[/red]")
        raise typer.Exit(1)


@data_app.command()
def stats(
    file: Annotated[
        str | None, typer.Argument(help="A SafeKey-format .jsonl, .json or .parquet file, or a Hub name.")
    ] = None,
    tokenizer: TokenizerOption = None,
    max_length: Annotated[
        int | None, typer.Option(help="Count the K spans this length would cut (default: the recipe's).")
    ] = None,
    recipe: RecipeOption = None,
) -> None:
    """Rows, harmful/benign balance, U and K lengths in tokens, and the K spans `max_length` would cut."""
    from .data.stats import compute_example_stats, render_stats

    with _bad_input():
        counting = _counting(tokenizer, None, recipe, max_length)
        examples, report, file, mixture = _data_to_count(file, counting, recipe, skip_invalid=True)
        if mixture is not None:
            console.print(escape(mixture))
        measured = compute_example_stats(
            examples, report, counting.tokenizer, counting.max_length, counting.chat_format
        )
    console.print(escape(render_stats(measured, file)))
    console.print(f"  tokens counted with {escape(counting.described)}")
