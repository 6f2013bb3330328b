"""Export what a SafeKey run trained: a clean causal LM (or LoRA adapter) with the safety head beside it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from .heads import HEAD_ATTRIBUTE, HEAD_WEIGHTS_NAME
from .model_card import RunFacts, render_model_card
from .resume import SAFEKEY_SETTINGS_NAME, load_safekey_settings

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json")


def export(
    run_dir: str | Path,
    out_dir: str | Path,
    merge: bool = False,
    dtype: str = "bfloat16",
    push_to_hub: str | None = None,
    private: bool | None = None,
    token: str | None = None,
) -> Path:
    """Write a run's model to `out_dir`, loadable with `AutoModelForCausalLM.from_pretrained`, with no head weights
    in it, the head beside it in `safekey_head.safetensors`, and SafeKey's model card in `README.md`; optionally
    upload the lot to a Hub repository.

    Args:
        run_dir: A run's `output_dir` or one of its `checkpoint-*` directories.
        out_dir: Where to write; created if missing.
        merge: For a LoRA run, merge the adapter into the base weights (loaded unquantized in `dtype`) instead of
            exporting the adapter alone. A full fine-tune has nothing to merge.
        dtype: The dtype of the merged weights.
        push_to_hub: A Hub repository id (`user/name`) to upload the export to; created if missing.
        private: Create that repository private (no effect on an existing one).
        token: A Hub token with write access; default: the logged-in one.
    """
    run, out = Path(run_dir), Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; the export needs a directory")
    head_file = run / HEAD_WEIGHTS_NAME
    if not head_file.is_file():
        raise FileNotFoundError(f"{run}: no {HEAD_WEIGHTS_NAME}; not a SafeKey run or checkpoint directory.")
    is_adapter = (run / "adapter_config.json").is_file()
    if not is_adapter and not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run}: neither a model (config.json) nor a LoRA adapter (adapter_config.json).")
    if merge and not is_adapter:
        raise ValueError(f"{run}: a full fine-tune has no adapter to merge; export it without --merge.")
    check_safetensors_files(run)
    out.mkdir(parents=True, exist_ok=True)

    if is_adapter and merge:
        from peft import PeftConfig, PeftModel

        base_name = PeftConfig.from_pretrained(str(run)).base_model_name_or_path
        base = AutoModelForCausalLM.from_pretrained(base_name, dtype=getattr(torch, dtype))
        merged = PeftModel.from_pretrained(base, str(run)).merge_and_unload()
        merged.save_pretrained(str(out))
    else:
        patterns = ADAPTER_FILES if is_adapter else MODEL_FILE_PATTERNS
        for pattern in patterns:
            for source in run.glob(pattern):
                shutil.copy2(source, out / source.name)
    AutoTokenizer.from_pretrained(str(run)).save_pretrained(str(out))
    shutil.copy2(head_file, out / HEAD_WEIGHTS_NAME)
    _check_no_head_weights(out)
    write_model_card(run, out, adapter=is_adapter and not merge, repo_id=push_to_hub)
    if push_to_hub is not None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(push_to_hub, private=private, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=str(out), commit_message="Upload SafeKey model")
    return out


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
