"""Test-only: hmlm's DeepSpeed strategy on the CPU accelerator with gloo (Lightning allows DeepSpeed on CUDA only).

Three things differ from the CUDA path, and only these: Lightning's CUDA check and device-index validation are
skipped, DeepSpeed is given device_rank 0 (a CPU device has no index), and DeepSpeed's shared-memory all-reduce op is
not JIT-built (minutes of C++ on a CI core; gloo does the collectives). Everything hmlm does (config, one optimizer,
the bank outside the engine, checkpoint directories, resume) runs unchanged.
"""
from __future__ import annotations

import argparse
import os

import hmlm.train.deepspeed as hds


class CPUDeepSpeedStrategy(hds.HMLMDeepSpeedStrategy):
    accelerators = ("cpu",)

    def setup_environment(self) -> None:
        from lightning.pytorch.strategies import DDPStrategy

        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        import importlib

        from lightning.fabric.utilities.seed import reset_seed

        # the module itself: `import deepspeed.comm.torch as m` would bind the package's `torch` attribute (torch)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        params = filter(lambda p: p.requires_grad, model.parameters())
        engine, opt, _, _ = deepspeed.initialize(args=argparse.Namespace(device_rank=0), config=self.config,
                                                 model=model, model_parameters=params, optimizer=optimizer,
                                                 lr_scheduler=lr_scheduler, dist_init_required=False)
        return engine, opt


def use_cpu_deepspeed() -> None:
    """Make hmlm fit build the CPU strategy (call in every process, before fit)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    hds.strategy_class = CPUDeepSpeedStrategy
