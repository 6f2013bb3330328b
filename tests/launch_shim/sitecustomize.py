"""Test-only, for the processes that tests/test_distributed.py launches: it puts this directory on their PYTHONPATH,
so Python imports this file at start-up. Each part acts only when its environment variable is set.

`SAFEKEY_TEST_FSDP_ON_CPU=1`: let accelerate run an FSDP config with CPU processes over gloo. Accelerate promotes a
run to FSDP only from a GPU-like distributed type; on CPU it runs plain DDP (which SafeKey refuses). After
`AcceleratorState.__init__`, a MULTI_CPU state given an FSDP plugin becomes FSDP, in `PartialState`'s shared state
too (or it reverts before the save). The test checks that the parameters really are sharded, so a fallback fails it.

`SAFEKEY_TEST_ZERO3_TRACE=FILE`: append a line to FILE each time ZeRO-3 drops its parameter trace (the module order
it prefetches by, and keeps small weights resident with); a step that breaks it gathers every weight on demand.
"""

import os

if os.environ.get("SAFEKEY_TEST_FSDP_ON_CPU") == "1":
    import functools

    from accelerate import state
    from accelerate.utils import DistributedType

    _init = state.AcceleratorState.__init__

    @functools.wraps(_init)
    def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if self.mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self.mixed_precision)
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if os.environ.get("SAFEKEY_TEST_ZERO3_TRACE"):
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    _invalidate = PartitionedParameterCoordinator._invalidate_trace

    def _invalidate_and_record(self):
        with open(os.environ["SAFEKEY_TEST_ZERO3_TRACE"], "a") as record:
            record.write(f"rank {os.environ.get('RANK')}\n")
        return _invalidate(self)

    PartitionedParameterCoordinator._invalidate_trace = _invalidate_and_record
