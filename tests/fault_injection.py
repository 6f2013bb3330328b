"""`safekey-trl` with a fault injected on one process, for tests that launch it with `accelerate launch`.

Environment: SAFEKEY_TEST_REPORT, a folder where each process writes what it saw (`rank{N}.json`: its pid and the
lock's holder when training began) and its weights at the end (`rank{N}.pt`); SAFEKEY_TEST_NAN_STEP, a step at which
process 1 alone sees a NaN loss term (its gradients stay finite, so only the gathered decision can keep the processes
in step). The rest of the command line is `safekey-trl`'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from safekey_trl.cli import app
from safekey_trl.run_lock import LOCK_NAME
from safekey_trl.trainer import SafeKeySFTTrainer

REPORT = Path(os.environ["SAFEKEY_TEST_REPORT"])
NAN_STEP = int(os.environ.get("SAFEKEY_TEST_NAN_STEP", "0"))
_note_step, _train = SafeKeySFTTrainer._note_step, SafeKeySFTTrainer.train


def note_step(self, lm_loss, qmm_sum, head_sum, loss):
    if self.accelerator.process_index == 1 and self.state.global_step + 1 == NAN_STEP:
        lm_loss = lm_loss.detach() * float("nan")
    _note_step(self, lm_loss, qmm_sum, head_sum, loss)


def train(self, *args, **kwargs):
    lock = Path(self.args.output_dir) / LOCK_NAME
    holder = json.loads(lock.read_text()) if lock.is_file() else None
    result = _train(self, *args, **kwargs)
    rank = self.accelerator.process_index
    (REPORT / f"rank{rank}.json").write_text(json.dumps({"pid": os.getpid(), "holder": holder}))
    weights = torch.cat([parameter.detach().flatten() for parameter in self.model.parameters()])
    torch.save(weights, REPORT / f"rank{rank}.pt")
    return result


SafeKeySFTTrainer._note_step = note_step
SafeKeySFTTrainer.train = train

if __name__ == "__main__":
    app()
