"""The one object that owns everything distributed (OpenRLHF's rule): process group, DeepSpeed
engine, ZeRO-3 parameter gathering, collectives and checkpoints. No module outside train/dist/
calls torch.distributed or deepspeed.comm, or reads DeepSpeed's parameter attributes: they ask
the strategy (or train/dist/params.py).

The same code runs on the CPU (gloo; tests and the demo) and on GPUs (NCCL), started by the
`deepspeed` launcher (which passes --local_rank), by torchrun, or as a plain single process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys

import torch

from data_tools.readback import DamagedFile
from train.common.exit_codes import Refused
from train.common.launch_env import free_port, tasks_per_node, under_srun
from train.dist.placement import misplaced, move_to


def _quiet_cpu_accelerator() -> None:
    """Tell DeepSpeed it is on the CPU (else it warns at every start that it guessed so)."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def _env_from_slurm() -> None:
    """Under `srun` (one task per rank, as slurm/continual.sh launches), the ranks come from
    SLURM; MASTER_ADDR and MASTER_PORT are exported by the launcher before srun."""
    e = os.environ
    if not under_srun(e):
        return
    e.update(
        RANK=e["SLURM_PROCID"],
        WORLD_SIZE=e["SLURM_NTASKS"],
        LOCAL_RANK=e.get("SLURM_LOCALID", "0"),
        LOCAL_WORLD_SIZE=str(tasks_per_node(e)),
    )


def _single_process_env() -> None:
    """A bare `python train/main.py` is a world of one (DeepSpeed would otherwise look for MPI)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port("127.0.0.1")))


def device_index(local_rank: int, visible: int) -> int:
    """The GPU of a rank among those its process sees. Every GPU of the node is visible under the
    deepspeed launcher, torchrun and `srun --gpus-per-node`: the rank's local index. Under
    `srun --gpus-per-task=1` each task sees only its own GPU (SLURM sets CUDA_VISIBLE_DEVICES per
    task), as device 0; with k per task, the local rank picks one of its k."""
    return local_rank % visible


def _gpu_of_this_rank() -> None:
    """LOCAL_RANK names the rank's GPU for DeepSpeed as well (its engine and zero.Init place
    tensors on `cuda:<LOCAL_RANK>`), so where the process sees fewer GPUs than its local rank
    (one GPU per task) it becomes the index of the GPU this rank uses."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        os.environ["LOCAL_RANK"] = str(device_index(local, torch.cuda.device_count()))


class DeepSpeedStrategy:
    def __init__(self, timeout_minutes: int = 30):
        _env_from_slurm()
        _single_process_env()
        _gpu_of_this_rank()
        _quiet_cpu_accelerator()
        import deepspeed

        self.cuda = torch.cuda.is_available()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.cuda:
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            # Ranks share the cores: one BLAS pool each unless the user chose (torchrun sets 1).
            if "OMP_NUM_THREADS" not in os.environ:
                local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        deepspeed.init_distributed(
            dist_backend="nccl" if self.cuda else "gloo",
            verbose=False,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
        from deepspeed import comm

        self.comm = comm
        self.rank = comm.get_rank()
        self.world_size = comm.get_world_size()
        # torchrun and srun (train/dist/strategy.py) set LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
        self.ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or self.world_size)
        self.ds_config: dict | None = None
        self._hf_ds_config = None
        self.engine = None

    # ---- set-up -----------------------------------------------------------------------------

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def bf16_supported(self) -> bool:
        return self.cuda and torch.cuda.is_bf16_supported()

    @property
    def zero_stage(self) -> int:
        return int((self.ds_config or {}).get("zero_optimization", {}).get("stage", 0))

    def use_ds_config(self, ds_config: dict) -> None:
        """Adopt the resolved ds_config. Under ZeRO-3, HfDeepSpeedConfig must be alive (and stay
        referenced) before `from_pretrained`, so each rank only ever loads its partition."""
        self.ds_config = ds_config
        if self.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(ds_config)

    def initialize(self, model: torch.nn.Module, param_groups: list[dict], make_optimizer, make_scheduler):
        """Wrap the model in a DeepSpeed engine. The optimizer is ours unless the ds_config names
        one (offload needs DeepSpeed's CPU Adam); the scheduler is a factory over the optimizer."""
        import deepspeed

        optimizer = None if "optimizer" in self.ds_config else make_optimizer(param_groups)
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=param_groups if optimizer is None else None,
            lr_scheduler=make_scheduler,
            config=self.ds_config,
        )
        engine.checkpoint_engine = _safe_checkpoint_engine(engine.checkpoint_engine)
        move_to(engine.module, self.device)
        offloaded = self.ds_config.get("zero_optimization", {}).get("offload_param", {}).get("device") == "cpu"
        wrong = misplaced(engine.module, self.device, offloaded_params=offloaded)
        if wrong:
            raise RuntimeError(f"{len(wrong)} tensors of the model are not on {self.device} (first: {wrong[:3]})")
        self.engine = engine
        return engine

    @contextlib.contextmanager
    def plain_loading(self):
        """`from_pretrained` builds a whole model on this rank inside the block, not a ZeRO-3
        partition (transformers partitions while an HfDeepSpeedConfig is alive): an evaluation
        replica, a model read for comparison."""
        from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            if self._hf_ds_config is not None:
                set_hf_deepspeed_config(self._hf_ds_config)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch's tensors on this rank's device."""
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    # ---- ZeRO-3 parameters --------------------------------------------------------------------

    def gathered(self, params: list[torch.nn.Parameter], modify: bool = False):
        """Whole parameters inside the block (collective: every rank must enter it). With
        `modify`, rank 0's changes are scattered back to the partitions on exit."""
        if self.zero_stage != 3 or not params:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)

    def full_grads(self, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        """Each parameter's whole gradient (flat, fp32) after the backward and before the step, as
        DeepSpeed has reduced it over the ranks. Collective under ZeRO (the partitions are
        gathered): every rank asks, for the same parameters in the same order."""
        from deepspeed.utils import safe_get_full_grad

        return {k: safe_get_full_grad(p).detach().float().reshape(-1) for k, p in params.items()}

    # ---- collectives --------------------------------------------------------------------------

    def all_reduce_sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (on this rank's device) summed over the ranks, in place; no read-back to the host."""
        if self.world_size > 1:
            self.comm.all_reduce(t, op=self.comm.ReduceOp.SUM)
        return t

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            self.comm.all_reduce(t, op=self.comm.ReduceOp.SUM)
        return t.tolist()

    def gather_to_rank0(self, obj) -> list | None:
        """Every rank's `obj` (picklable), in rank order, on rank 0; None elsewhere (collective)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.is_rank0 else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def broadcast_object(self, obj):
        """Rank 0's `obj` (picklable) on every rank (collective): one decision for all."""
        if self.world_size == 1:
            return obj
        box = [obj if self.is_rank0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (a decision all ranks must share)."""
        return self.all_reduce_sum([1.0 if flag else 0.0])[0] > 0

    def agree(self, problem: str | None) -> None:
        """One decision for all about an error of the inputs (collective: every rank calls it at
        the same point, with the line of what it found wrong, or None). If any rank found
        something, rank 0 prints the line of the lowest such rank once, as `error: <line>`,
        every rank waits until it is out, and every rank raises Refused (train/main.py exits 2,
        quietly): no rank is left waiting in a collective, none prints a traceback."""
        problems = self.gather_to_rank0(problem)
        first = self.broadcast_object(next((p for p in problems if p), None) if self.is_rank0 else None)
        if first is None:
            return
        if self.is_rank0:
            print(f"error: {first}", file=sys.stderr, flush=True)
        self.barrier()  # the line is out before any rank leaves (a launcher then stops the others)
        raise Refused(first)

    @contextlib.contextmanager
    def agreeing(self):
        """A block that reads inputs on some ranks (rank 0 alone, or each its own share), ended by
        one decision for all (collective, in place of a barrier): a DamagedFile raised inside on
        any rank is printed once and every rank raises Refused (`agree`)."""
        problem = None
        try:
            yield
        except DamagedFile as e:
            problem = str(e)
        self.agree(problem)

    def barrier(self) -> None:
        if self.world_size > 1:
            self.comm.barrier()

    def close(self) -> None:
        self.barrier()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _safe_checkpoint_engine(engine):
    """DeepSpeed's torch checkpoint engine loads with `weights_only=False`, which can execute code
    from a tampered file. Ours loads with `weights_only=True` and allows only the few DeepSpeed
    types its own checkpoints contain."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine) is not TorchCheckpointEngine:
        return engine  # another engine (nebula, fast...) was configured: leave it alone

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_checkpoint_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(engine.__dict__)
    return safe


def _checkpoint_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]
