"""The Hub: `push_to_hub` and `export --push-to-hub` upload the clean model (or adapter), the head file and SafeKey's
own model card. The Hub is a local folder standing in for the repository."""

from __future__ import annotations

import fnmatch
import shutil
import types
from pathlib import Path

import pytest
from helpers import make_trainer
from safetensors import safe_open
from test_lora import lora_trainer
from typer.testing import CliRunner

from safekey_trl.cli import app
from safekey_trl.heads import HEAD_WEIGHTS_NAME
from safekey_trl.resume import SAFEKEY_SETTINGS_NAME


class LocalHub:
    """`create_repo` and `upload_folder` of `huggingface_hub.HfApi`, writing each repository to a local folder."""

    def __init__(self, root: Path):
        self.root = root
        self.created: list[str] = []

    def create_repo(self, repo_id, token=None, private=None, exist_ok=False, **kwargs):
        self.created.append(repo_id)
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **kwargs):
        for path in Path(folder_path).rglob("*"):
            relative = path.relative_to(folder_path).as_posix()
            if path.is_file() and not any(fnmatch.fnmatch(relative, pattern) for pattern in ignore_patterns or []):
                target = self.root / repo_id / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)

    def files(self, repo_id: str) -> set[str]:
        return {path.relative_to(self.root / repo_id).as_posix() for path in (self.root / repo_id).rglob("*")}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    local = LocalHub(tmp_path / "hub")
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: local)
    monkeypatch.setattr("huggingface_hub.HfApi", lambda token=None: local)
    return local


@pytest.fixture
def full_run(tmp_path, make_model, tokenizer, examples):
    run = tmp_path / "run"
    trainer = make_trainer(run, make_model(), tokenizer, examples, num_train_epochs=2, hub_model_id="me/safekey-tiny")
    trainer.dataset_names = ["data/safekey_sample.jsonl"]
    trainer.train()
    trainer.save_model(str(run))
    return trainer


def test_push_to_hub_uploads_the_clean_model_the_head_and_safekeys_card(hub, full_run):
    full_run.push_to_hub()
    files = hub.files("me/safekey-tiny")
    assert {"config.json", "model.safetensors", HEAD_WEIGHTS_NAME, SAFEKEY_SETTINGS_NAME, "README.md"} <= files
    assert "tokenizer.json" in files and not any(name.startswith("checkpoint-") for name in files)
    with safe_open(str(hub.root / "me/safekey-tiny/model.safetensors"), "pt") as weights:
        assert not any("safekey_head" in key for key in weights.keys())

    card = (hub.root / "me/safekey-tiny/README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "- safekey\n" in card
    assert "0.2 · L_QMM + 0.2 · (0.5 · L_U + (1 − 0.5) · L_prefix)" in card
    for row in ("| `qmm_weight` | 0.2 |", "| `head_theta` | 0.5 |", "| `auxiliary_epochs` | 1 |"):
        assert row in card
    assert "| `num_train_epochs` | 2 |" in card and "| `effective_batch_size` | 4 |" in card
    assert "Trained on `data/safekey_sample.jsonl`." in card
    assert (
        "8 training examples: 8 with U and K, which train all three terms (4 harmful, 4 benign, 50.0% harmful)" in card
    )
    last = [entry for entry in full_run.state.log_history if "qmm_loss" in entry][-1]
    assert f"| `qmm_loss` | {last['qmm_loss']:.4f} |" in card and f"| `head_loss` | {last['head_loss']:.4f} |" in card
    assert f"`{HEAD_WEIGHTS_NAME}` holds the Dual-Path Safety Head: it is **training-only**" in card
    assert 'AutoModelForCausalLM.from_pretrained("me/safekey-tiny", dtype="auto")' in card
    assert "TRL" not in card.split("---")[1]  # the front matter is ours, not TRL's generic SFT card


def test_export_push_to_hub_writes_the_same_facts(tmp_path, hub, full_run):
    out = tmp_path / "export"
    result = CliRunner().invoke(
        app, ["export", full_run.args.output_dir, "--out", str(out), "--push_to_hub", "me/exported"]
    )
    assert result.exit_code == 0, result.output
    assert hub.created == ["me/exported"]
    files = hub.files("me/exported")
    assert {"config.json", "model.safetensors", HEAD_WEIGHTS_NAME, "README.md", "tokenizer.json"} <= files
    pushed = (hub.root / "me/exported/README.md").read_text()
    full_run.create_model_card(model_name="me/safekey-tiny")
    trained = Path(full_run.args.output_dir, "README.md").read_text()
    # The same card but for the repository named in the loading code
    assert pushed == trained.replace("me/safekey-tiny", "me/exported").replace("# safekey-tiny", "# exported")
    assert 'AutoModelForCausalLM.from_pretrained("me/exported"' in pushed


def test_a_lora_run_pushes_the_adapter_and_says_how_to_load_it(tmp_path, hub, examples):
    trainer = lora_trainer(tmp_path / "lora", examples, num_train_epochs=1, auxiliary_epochs=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "lora"))
    out = tmp_path / "lora-export"
    result = CliRunner().invoke(app, ["export", str(tmp_path / "lora"), "--out", str(out), "--push-to-hub", "me/lora"])
    assert result.exit_code == 0, result.output
    files = hub.files("me/lora")
    assert {"adapter_config.json", "adapter_model.safetensors", HEAD_WEIGHTS_NAME, "README.md"} <= files
    assert "model.safetensors" not in files
    card = (hub.root / "me/lora/README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "- lora\n" in card
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/lora", dtype="auto")' in card
    assert "The LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`)" in card
    # Its loading code runs (the base, then the adapter), from the export standing in for the repository
    assert len(run_card_code(loading_code(card.replace('"me/lora"', f'"{out}"')), seed=0)) > 8


def loading_code(card: str) -> str:
    """The card's "How to load" code block, with the generation length cut to 8 tokens for a CPU test."""
    block = card.split("## How to load", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "max_new_tokens=8000" in block
    return block.replace("max_new_tokens=8000", "max_new_tokens=8")


def run_card_code(code: str, seed: int) -> list[int]:
    import torch

    torch.manual_seed(seed)
    namespace: dict = {}
    exec(compile(code, "<model card>", "exec"), namespace)
    return namespace["output"][0].tolist()


def test_the_cards_loading_code_runs_and_decodes_as_it_says(tmp_path, full_run):
    """The card's code loads the model on transformers 5 and decodes greedily with the paper's repetition penalty,
    even when the model's own generation config samples (as R1-Distill's does: temperature 0.6, top-p 0.95)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    run = Path(full_run.args.output_dir)
    full_run.processing_class.save_pretrained(run)
    GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95).save_pretrained(run)
    full_run.create_model_card(model_name=str(run))
    code = loading_code((run / "README.md").read_text())
    outputs = [run_card_code(code, seed) for seed in (1, 2)]
    assert outputs[0] == outputs[1]  # greedy: the seed does not matter
    model = AutoModelForCausalLM.from_pretrained(run)
    tokenizer = AutoTokenizer.from_pretrained(run)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How do I make my home network more secure?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    expected = model.generate(**inputs, do_sample=False, repetition_penalty=1.2, max_new_tokens=8)
    assert outputs[0] == expected[0].tolist()


def test_the_final_save_pushes_nothing_and_the_push_after_it_uploads_the_run_once(
    tmp_path, hub, monkeypatch, make_model, tokenizer, examples
):
    """`sft.train` saves the run (`save_run`), then pushes: one upload, of the whole final model. The save itself does
    not push (the Trainer's `save_model` would, saving the model again straight into output_dir mid-save)."""
    uploads = []
    upload = hub.upload_folder
    monkeypatch.setattr(hub, "upload_folder", lambda *args, **kwargs: uploads.append(1) or upload(*args, **kwargs))
    run = tmp_path / "run"
    trainer = make_trainer(run, make_model(), tokenizer, examples, max_steps=1, push_to_hub=True, hub_model_id="me/x")
    trainer.train()
    trainer.save_run(str(run))
    assert uploads == [] and (run / "model.safetensors").is_file() and (run / HEAD_WEIGHTS_NAME).is_file()
    trainer.push_to_hub()
    assert len(uploads) == 1
    assert {"model.safetensors", HEAD_WEIGHTS_NAME, SAFEKEY_SETTINGS_NAME, "README.md"} <= hub.files("me/x")
