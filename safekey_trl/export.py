"""Export what a SafeKey run trained: a clean causal LM (or LoRA adapter) with the safety head beside it."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from .heads import HEAD_ATTRIBUTE, HEAD_WEIGHTS_NAME
from .model_card import RunFacts, render_model_card
from .outputs import check_writable, disk_full_error, is_disk_full, move_into
from .resume import SAFEKEY_SETTINGS_NAME, check_checkpoint_complete, load_safekey_settings
from .run_lock import STAGING_DIR

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json")
MERGE_DTYPES = ("bfloat16", "float16", "float32")
# What an export wrote into its folder: a later `--overwrite` export replaces these files and no others
EXPORT_MANIFEST = "_safekey_export.json"


def export(
    run_dir: str | Path,
    out_dir: str | Path,
    merge: bool = False,
    dtype: str = "bfloat16",
    push_to_hub: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a run's model to `out_dir`, loadable with `AutoModelForCausalLM.from_pretrained`, with no head weights
    in it, the head beside it in `safekey_head.safetensors`, and SafeKey's model card in `README.md`; optionally
    upload the lot to a Hub repository.

    Args:
        run_dir: A run's `output_dir` or one of its `checkpoint-*` directories.
        out_dir: Where to write; created if missing. A folder that holds files is refused unless `overwrite`, and
            even then a file the export would write over is refused unless an earlier export wrote it (its
            `_safekey_export.json` lists them); files of another kind are left alone.
        merge: For a LoRA run, merge the adapter into the base weights in `dtype` instead of exporting the adapter
            alone; a QLoRA adapter into the base's dequantized 4-bit weights, which it was trained on (see
            [`merged_model`]). A full fine-tune has nothing to merge.
        dtype: The dtype of the merged weights.
        push_to_hub: A Hub repository id (`user/name`) to upload the export to; created if missing.
        private: Create that repository private (no effect on an existing one).
        token: A Hub token with write access; default: the logged-in one.
        overwrite: Write into a folder that holds a previous export (see `out_dir`).

    Everything is written aside (`out_dir/_safekey_incomplete/export`) and moved in once whole: a full disk leaves
    `out_dir` as it was and is reported as one line.
    """
    run, out = Path(run_dir), Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; the export needs a directory")
    if dtype not in MERGE_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(MERGE_DTYPES)}; got {dtype!r}")
    if out.exists() and run.exists() and out.resolve() == run.resolve():
        raise ValueError(f"{out}: is the run folder being exported; give --out another folder")
    head_file = run / HEAD_WEIGHTS_NAME
    if not head_file.is_file():
        raise FileNotFoundError(f"{run}: no {HEAD_WEIGHTS_NAME}; not a SafeKey run or checkpoint directory.")
    is_adapter = (run / "adapter_config.json").is_file()
    if not is_adapter and not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run}: neither a model (config.json) nor a LoRA adapter (adapter_config.json).")
    if merge and not is_adapter:
        raise ValueError(f"{run}: a full fine-tune has no adapter to merge; export it without --merge.")
    if run.name.startswith("checkpoint-"):
        check_checkpoint_complete(run)
    check_safetensors_files(run)
    previous = _check_target(out, overwrite)
    check_writable(out, "--out")  # before loading anything: a read-only or full target fails now
    staging = out / STAGING_DIR / "export"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _write_export(run, staging, head_file, is_adapter, merge, dtype, push_to_hub)
    except Exception as error:
        full = is_disk_full(error, staging)
        shutil.rmtree(out / STAGING_DIR, ignore_errors=True)
        if full:
            raise disk_full_error(staging, f"kept: {out} as it was, no partial file") from None
        raise
    written = _move_export(staging, out, previous)
    if push_to_hub is not None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(push_to_hub, private=private, exist_ok=True).repo_id
        # Exactly what this export wrote, not whatever else lies in the folder
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(out),
            allow_patterns=written,
            ignore_patterns=[EXPORT_MANIFEST, f"{STAGING_DIR}*"],
            commit_message="Upload SafeKey model",
        )
    return out


def _write_export(
    run: Path, out: Path, head_file: Path, is_adapter: bool, merge: bool, dtype: str, push_to_hub: str | None
) -> None:
    if is_adapter and merge:
        merged_model(run, getattr(torch, dtype)).save_pretrained(str(out))
    else:
        patterns = ADAPTER_FILES if is_adapter else MODEL_FILE_PATTERNS
        for pattern in patterns:
            for source in run.glob(pattern):
                shutil.copy2(source, out / source.name)
    AutoTokenizer.from_pretrained(str(run)).save_pretrained(str(out))
    shutil.copy2(head_file, out / HEAD_WEIGHTS_NAME)
    _check_no_head_weights(out)
    write_model_card(run, out, adapter=is_adapter and not merge, repo_id=push_to_hub)


def _previous_export(out: Path) -> list[str]:
    try:
        return list(json.loads((out / EXPORT_MANIFEST).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _check_target(out: Path, overwrite: bool) -> list[str]:
    """Refuse a target folder that holds files, unless `overwrite`; return the files a previous export wrote."""
    present = sorted(entry.name for entry in out.iterdir() if entry.name != STAGING_DIR) if out.is_dir() else []
    if present and not overwrite:
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise ValueError(
            f"{out}: not empty ({len(present)} entries: {shown}); give an empty or new --out, or pass --overwrite to "
            "replace a previous export there (files it did not write are never replaced)"
        )
    return _previous_export(out)


def _move_export(staging: Path, out: Path, previous: list[str]) -> list[str]:
    """Move the staged export into `out`: refused, with nothing moved, when it would replace a file no export wrote;
    a previous export's files that this one does not write are removed. Returns the names written."""
    names = sorted(entry.name for entry in staging.iterdir())
    foreign = [name for name in names if (out / name).exists() and name not in previous]
    if foreign:
        shutil.rmtree(out / STAGING_DIR, ignore_errors=True)
        raise ValueError(
            f"{out}: the export would replace {', '.join(foreign)}, which no export wrote; move them away or give "
            "another --out"
        )
    move_into(staging, out)
    for name in previous:
        if name not in names and (out / name).is_file():
            (out / name).unlink()
    shutil.rmtree(out / STAGING_DIR, ignore_errors=True)
    manifest = {"files": names, "exported_at": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    temporary = out / f".{EXPORT_MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    temporary.replace(out / EXPORT_MANIFEST)
    return names


def merged_model(run: Path, dtype: torch.dtype):
    """A LoRA run's adapter merged into its base, in `dtype`.

    An adapter trained on a 4-bit base (QLoRA) learnt its update on top of the dequantized 4-bit weights: it is merged
    into those (the base loaded with the run's quantization config, then dequantized), so that the merged model
    computes what the trained one did. Merged into the unquantized base instead, the quantization error would remain.
    """
    from peft import PeftConfig, PeftModel

    base_name = PeftConfig.from_pretrained(str(run)).base_model_name_or_path
    saved = load_safekey_settings(run) or {}
    quantization = (saved.get("run") or {}).get("base_quantization")
    if quantization is not None:
        from transformers import BitsAndBytesConfig

        quantization_config = BitsAndBytesConfig.from_dict(dict(quantization))
        base = AutoModelForCausalLM.from_pretrained(base_name, quantization_config=quantization_config, dtype=dtype)
        base = base.dequantize(dtype=dtype)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_name, dtype=dtype)
    return PeftModel.from_pretrained(base, str(run)).merge_and_unload()


def check_safetensors_files(directory: str | Path) -> None:
    """Raise `ValueError` naming the first `*.safetensors` file in `directory` that cannot be read (truncated by a
    full disk or a killed copy, say), before anything loads it."""
    for weights in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(weights), "pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own SafetensorError, and OSError
            raise ValueError(f"{weights}: not a readable safetensors file ({error}); it may be truncated") from None


def write_model_card(run: Path, out: Path, adapter: bool, repo_id: str | None = None) -> Path | None:
    """Write SafeKey's model card for an export, from the run facts the trainer saved in `safekey_config.json`."""
    saved = load_safekey_settings(run)
    if saved is None:  # a run from before the settings were saved: no card rather than one with blanks
        logger.warning("%s: no %s, so no model card is written.", run, SAFEKEY_SETTINGS_NAME)
        return None
    run_facts = saved.pop("run", None) or {}
    facts = RunFacts.from_dict({**run_facts, "settings": saved, "adapter": adapter})
    path = out / "README.md"
    path.write_text(render_model_card(facts, repo_id=repo_id), encoding="utf-8")
    return path


def _check_no_head_weights(directory: Path) -> None:
    # The exported model must be the plain causal LM: a head key here would surface as an "unexpected key" on load
    for weights in directory.glob("*.safetensors"):
        if weights.name == HEAD_WEIGHTS_NAME:
            continue
        with safe_open(str(weights), "pt") as handle:
            leaked = [key for key in handle.keys() if f"{HEAD_ATTRIBUTE}." in key]
        if leaked:
            raise RuntimeError(f"{weights} holds safety-head weights {leaked[:3]}; the export would not be clean.")
