"""Per-rank peak memory of a training run, without its hardware (``--estimate-memory``) or on it
(``--measure-memory``).

The estimate builds the run's model on the meta device inside ``FakeTensorMode``, with a fake process
group of the run's world size, applies the trainer's own parallelisation (activation checkpointing, FSDP2,
mixed precision; :func:`~wmtp_train.train.parallelize.parallelize_model`), and runs two optimizer steps of
each stage with the trainer's own :meth:`~wmtp_train.train.step.Stage.step` (forward, fused loss, value
loss, backward, clipping, AdamW) on synthetic full-length micro-batches, under PyTorch's
``FSDPMemTracker``. Fake tensors have sizes but no data: nothing is allocated and nothing is computed, so a
7B model at world size 16 is estimated on a laptop. The second step is the steady state (AdamW's moments
exist from the first step on). torchtitan's ``scripts/estimate`` works the same way.

What the tracker cannot see is added explicitly and reported on its own line:

- the fused loss's workspace (its ``[C, V]`` chunk of logits, three ``[C, d]`` buffers and per-row data,
  ``wmtp_kernels._linear_pass``): a custom operator's internals are invisible to dispatch modes, so the
  workspace is computed from the kernel's own chunk budget and added to the tracked memory at the loss;
- on CUDA, FSDP2 overlaps communication with compute on separate streams, so one more block's
  all-gathered parameters (and, where blocks are trained, its reduce-scatter input) can be alive than in
  a one-stream simulation: the *stream allowance*.

Synthetic batches are the worst case: every sequence ``data.max_len`` tokens long and every token after
bos trained. ``parallel.compile`` is ignored: the estimate is for eager blocks (Inductor's partitioner
usually saves fewer activations). The ``rho1`` weighting cannot be estimated (its top-k selection reads a
token count from the device).

:func:`measure_memory` runs the same steps on real tensors in a real process group (``torchrun``) and
reports, next to the tracker's figures, the peak that the CPU allocator or CUDA's caching allocator saw
during each stage: that is how the estimate is validated (``benchmarks/validate_memory.py``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
import unittest.mock
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.utils._python_dispatch import TorchDispatchMode

from wmtp_train.config import TrainConfig
from wmtp_train.data.dataset import Sample, collate
from wmtp_train.data.tokenizer import load_tokenizer
from wmtp_train.model import ModelArgs
from wmtp_train.train.metrics import prediction_counts
from wmtp_train.train.model_builder import ModelBuilder
from wmtp_train.train.parallelize import DistInfo, transformer_blocks
from wmtp_train.train.stages import build_stages
from wmtp_train.train.step import StageContext, TrainerState

STEPS_PER_STAGE = 2
"""The first step creates AdamW's state; the second is the steady state."""
LOSS_ROW_BYTES = 80
"""Upper bound of the fused loss's per-row bookkeeping (row layout, targets, scales, weights, CE)."""

# FSDPMemTracker's categories, grouped into the ones this report shows.
CATEGORIES = {
    "parameters": ("Sharded Param", "Unsharded Param", "All Gather", "Buffer"),
    "gradients": ("Sharded Grad", "Unsharded Grad", "Reduce Scatter"),
    "optimizer state": ("OptState",),
    "activations": ("Activation",),
    "temporaries": ("Temp",),
    "inputs": ("Inputs",),
}


@dataclass(frozen=True)
class StagePeak:
    """The per-rank peak of one stage's steps, in bytes."""

    stage: str
    """``stage1`` or ``stage2``."""
    categories: dict[str, int]
    """The tracker's peak split (:data:`CATEGORIES`); ``inputs`` are the micro-batches and the stage's own
    tensors besides the model and the optimizer (stage 2's V_old copy of the value head)."""
    tracked_peak: int
    """The tracker's peak (the sum of :attr:`categories`)."""
    loss_held: int
    """What the fused loss's forward returns and autograd holds until backward: its gradients of the head
    states and of the unembedding, computed in the forward pass (counted in the activations)."""
    loss_workspace: int
    """The fused loss's transient workspace (not visible to the tracker)."""
    tracked_at_loss: int
    """Tracked bytes right after the fused loss's forward (its outputs included)."""
    stream_allowance: int
    """CUDA only: one more block's gathered parameters and reduce-scatter input (see the module doc)."""
    loss_calls: int
    """Forward calls of the fused loss over the stage's steps (activation checkpointing must not add any)."""
    measured: int | None = None
    """From :func:`measure_memory`: the allocator's peak during the stage's steps (the worst rank's)."""

    @property
    def peak(self) -> int:
        """The estimated peak: the tracker's, or the memory at the loss plus its workspace if larger, plus
        the stream allowance."""
        return max(self.tracked_peak, self.tracked_at_loss + self.loss_workspace) + self.stream_allowance


class LossOpCounter(TorchDispatchMode):
    """Counts the forward calls of the fused loss operator and the bytes of what they return; with a
    tracker, also the tracked memory right after each call.

    Args:
        tracker: an active ``FSDPMemTracker`` (entered before this mode) or None.
    """

    OP = "wmtp::fused_weighted_mtp_loss"

    def __init__(self, tracker: FSDPMemTracker | None = None):
        super().__init__()
        self.tracker = tracker
        self.calls = 0
        self.held = 0
        self.tracked_after = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        from torch.distributed.tensor import DTensor

        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor unwrap first, as the tracker does
        out = func(*args, **(kwargs or {}))
        if func._schema.name == self.OP:
            self.calls += 1
            self.held = max(self.held, sum(t.untyped_storage().nbytes() for t in out))
            if self.tracker is not None:
                current = self.tracker.get_tracker_snapshot("current")
                self.tracked_after = max(self.tracked_after, sum(s["Total"] for s in current.values()))
        return out


class FakeChecksPass(TorchDispatchMode):
    """Answers True when code reads a boolean back from a fake tensor: a data check such as
    ``wmtp_kernels.value_loss``'s ``bool(torch.isfinite(rewards).all())``, which fake data (having none)
    passes. Any other read of fake data (a count, a float) still fails, so the trainer's step must not
    read back at all (:attr:`~wmtp_train.train.step.Stage.read_back`)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        from torch._subclasses.fake_tensor import is_fake

        if (
            func is torch.ops.aten._local_scalar_dense.default
            and args[0].dtype == torch.bool
            and is_fake(args[0])
        ):
            return True
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _separate_sharding_propagation():
    """DTensor derives an operator's output shapes by running it on fake tensors of the *global* shapes, in
    the active fake mode when there is one. FSDPMemTracker skips those phantom tensors only when they come
    from another fake mode than its own (PyTorch's stated intent), so under the estimate's fake mode it
    would count them: for ``clip_grad_norm_``'s ``_foreach_norm`` over all the gradients, a full fp32 copy
    of the unsharded gradients (27 GB at 7B). Here DTensor gets a fake mode of its own."""
    from torch.distributed.tensor import _sharding_prop

    with unittest.mock.patch.object(_sharding_prop, "detect_fake_mode", lambda *args: None):
        yield


def estimation_config(config: TrainConfig, device_type: str) -> TrainConfig:
    """The configuration the estimate runs: the run's, with the choices the training device would make
    spelled out (``mixed_precision = "auto"`` is bf16 on CUDA) and per-block compilation off.

    Args:
        config: the run's configuration.
        device_type: ``cuda`` or ``cpu``, the device of the run being estimated.

    Returns:
        A copy.
    """
    if config.stage2.weighting == "rho1":
        raise ValueError(
            "--estimate-memory does not support stage2.weighting = 'rho1' (its top-k selection reads the "
            "number of trained tokens from the device); estimate 'td' or 'uniform' and add a second, "
            "frozen model's sharded parameters"
        )
    cfg = copy.deepcopy(config)
    if cfg.parallel.mixed_precision == "auto":
        cfg.parallel.mixed_precision = "bf16" if device_type == "cuda" else "none"
    cfg.parallel.compile = False
    cfg.run.device = device_type
    return cfg


def synthetic_batch(args: ModelArgs, batch_size: int, seq_len: int, seed: int) -> dict[str, Any]:
    """A worst-case micro-batch through the trainer's own collate: ``batch_size`` sequences of ``seq_len``
    random tokens, each trained after its first (bos) token, rewards alternating 1 / 0.

    Args:
        args: the model's arguments (vocabulary size).
        batch_size: sequences.
        seq_len: tokens per sequence.
        seed: the token ids' seed.

    Returns:
        :func:`~wmtp_train.data.dataset.collate`'s dict on the CPU.
    """
    rng = random.Random(seed)
    samples = [
        Sample([rng.randrange(args.vocab_size) for _ in range(seq_len)], 1, float(i % 2 == 0), 1, f"s{i}")
        for i in range(batch_size)
    ]
    return collate(samples, pad_id=0)


def loss_workspace_bytes(args: ModelArgs, rows: int, dtype: torch.dtype, device_type: str) -> int:
    """The fused loss's transient memory for ``rows`` valid predictions: its chunk loop's buffers as the
    kernel sizes them on ``device_type`` (``wmtp_kernels._linear_pass.workspace_bytes``, with the backend
    the device gets), plus :data:`LOSS_ROW_BYTES` per row.

    Args:
        args: the model's arguments.
        rows: valid (head, position) predictions of the micro-batch.
        dtype: the unembedding's compute dtype.
        device_type: ``cuda`` or ``cpu`` (the chunk budget and the backend differ).

    Returns:
        Bytes.
    """
    from wmtp_kernels._common import resolve_impl
    from wmtp_kernels._linear_pass import workspace_bytes

    impl = resolve_impl(None, torch.device(device_type))
    itemsize = torch.finfo(dtype).bits // 8
    chunk_loop = workspace_bytes(rows, args.vocab_size, args.dim, itemsize, impl, device_type)
    return chunk_loop + rows * LOSS_ROW_BYTES


def _stream_allowance(model: nn.Module, config: TrainConfig, device_type: str) -> int:
    if device_type != "cuda" or not config.parallel.fsdp:
        return 0
    block = transformer_blocks(model)[0]
    numel = sum(p.numel() for p in block.parameters())  # sharded DTensors report the global size
    param_bytes = 2 if config.parallel.mixed_precision == "bf16" else 4
    trained = any(p.requires_grad for p in block.parameters())
    return numel * param_bytes + (numel * 4 if trained else 0)


def _stage_tensors(stage: Any) -> list[torch.Tensor]:
    """Tensors of the modules a stage keeps besides the model (stage 2's V_old copy of the value head)."""
    modules = [m for m in vars(stage).values() if isinstance(m, nn.Module)]
    return [t for m in modules for t in m.state_dict().values()]


def _fsdp_submodules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from torch.distributed.fsdp import FSDPModule

    return [(name, m) for name, m in model.named_modules() if isinstance(m, FSDPModule) and m is not model]


def _record_every_module(tracker: FSDPMemTracker, model: nn.Module) -> None:
    """Start a tracked iteration: FSDPMemTracker records one iteration at a time and creates its record of
    a module at the module's first forward, but its post-backward hook expects a record for every FSDP
    module, even one that the stage never runs. Records all but the root up front (a record at forward
    time adds only the per-module peaks, which this estimate does not use)."""
    from torch.distributed._tools.fsdp2_mem_tracker import _FSDPModMemStats

    tracker.reset_mod_stats()
    for name, module in _fsdp_submodules(model):
        tracker.memory_tracking[module] = _FSDPModMemStats(f"{type(model).__name__}.{name}")


def _allocator_peak(prof: Any, stage: str) -> int:
    """The peak of the bytes held through PyTorch's CPU allocator during ``stage``'s record_function, from
    the profiler's allocation events since profiling began.

    The profiler records allocations and frees of the profiled thread only; gloo releases some tensors
    on its own threads. A block address handed out again was therefore freed before, whether or not its
    free was seen.
    """
    from torch._C._profiler import _EventType

    events, window = [], None
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.typed[0] == _EventType.Allocation:
            events.append((event.start_time_ns, event.typed[1].ptr, event.typed[1].alloc_size))
        elif event.name == stage:
            window = (event.start_time_ns, event.end_time_ns)
    live: dict[int, int] = {}
    held = peak = 0
    for time, ptr, size in sorted(events):
        held -= live.pop(ptr, 0)
        if size > 0:
            live[ptr] = size
            held += size
        if window[0] <= time <= window[1]:
            peak = max(peak, held)
    return peak


def _run_stages(config: TrainConfig, info: DistInfo, fake_mesh: Any, to_device: Any, device_type: str):
    """Two steps of every stage under the tracker; yields a :class:`StagePeak` per stage. ``fake_mesh``:
    the fake process group's mesh (estimation: the model is allocated, not initialised) or None (the real
    process group; on CUDA the stage's ``max_memory_allocated`` is recorded as ``measured``)."""
    cuda = info.device.type == "cuda"
    builder = ModelBuilder(config, info, load_tokenizer(config.model.checkpoint_dir or None).vocab_size)
    model = builder.build(config.model.checkpoint_dir) if fake_mesh is None else builder.allocate(fake_mesh)
    model.train()
    args, state = builder.args, TrainerState()
    stages = build_stages(StageContext(config, model, args, info, state), builder)
    dtype = torch.bfloat16 if config.parallel.mixed_precision == "bf16" else torch.float32
    for name, stage in stages.items():
        settings = stage.settings
        with unset_fake_temporarily():  # real CPU batches, then moved (or faked) like the trainer's
            cpu_batches = [
                synthetic_batch(args, settings.micro_batch_size, config.data.max_len, seed=i)
                for i in range(settings.grad_accum)
            ]
            rows = max(
                int(prediction_counts(b["labels"], b["attention_mask"], args.n_future_tokens).sum())
                for b in cpu_batches
            )
        batches = [{k: to_device(v) if torch.is_tensor(v) else v for k, v in b.items()} for b in cpu_batches]
        state.stage, state.stage_step = name, 0
        stage.prepare()
        stage.read_back = False
        tracker = FSDPMemTracker(model, stage.optimizer)
        tracker.track_inputs((batches, _stage_tensors(stage)))
        counter = LossOpCounter(tracker)
        if cuda:
            torch.cuda.synchronize(info.device)
            torch.cuda.reset_peak_memory_stats(info.device)
        with torch.profiler.record_function(name), tracker, counter:
            for _ in range(STEPS_PER_STAGE):
                _record_every_module(tracker, model)
                stage.step(batches)
                state.step += 1
                state.stage_step += 1
        snapshot = {}
        for device_snapshot in tracker.get_tracker_snapshot("peak").values():
            for key, value in device_snapshot.items():
                snapshot[key] = snapshot.get(key, 0) + value
        categories = {group: sum(snapshot.get(k, 0) for k in keys) for group, keys in CATEGORIES.items()}
        uses_loss = counter.calls > 0
        yield StagePeak(
            stage=name,
            categories=categories,
            tracked_peak=snapshot["Total"],
            loss_held=counter.held,
            loss_workspace=loss_workspace_bytes(args, rows, dtype, device_type) if uses_loss else 0,
            tracked_at_loss=counter.tracked_after,
            stream_allowance=_stream_allowance(model, config, device_type),
            loss_calls=counter.calls,
            measured=torch.cuda.max_memory_allocated(info.device) if cuda else None,
        )
        stage.release()


def estimate_memory(config: TrainConfig, world_size: int, device_type: str = "cuda") -> list[StagePeak]:
    """Estimate the per-rank peak of every stage of ``config`` at ``world_size`` ranks on fake tensors.

    Initialises (and destroys) a fake process group: call it where no process group exists.

    Args:
        config: the run's configuration (any recipe and ``--set`` overrides, except ``rho1``).
        world_size: the ranks of the run.
        device_type: the device of the run (``cuda`` or ``cpu``).

    Returns:
        One :class:`StagePeak` per stage, in order.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    cfg = estimation_config(config, device_type)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))  # outside the fake mode (it reads real values)
        info = DistInfo(0, world_size, 0, 1, torch.device("cpu"))
        with FakeTensorMode() as fake, FakeChecksPass(), _separate_sharding_propagation():
            return list(_run_stages(cfg, info, mesh, fake.from_tensor, device_type))
    finally:
        dist.destroy_process_group()


def measure_memory(config: TrainConfig, info: DistInfo) -> list[StagePeak]:
    """Run the same steps as :func:`estimate_memory` on real tensors in the current process group, and
    record each stage's allocator peak (:attr:`StagePeak.measured`; collective).

    On CUDA the peak is ``torch.cuda.max_memory_allocated`` over the stage; on the CPU it is the peak of
    the bytes allocated through PyTorch's CPU allocator since the model was built (the profiler's memory
    events), so it includes the fused loss's internal buffers, which the tracker cannot see.

    Args:
        config: the run's configuration.
        info: this process's place in the job.

    Returns:
        One :class:`StagePeak` per stage, with ``measured`` set.
    """
    device_type = info.device.type
    cfg = estimation_config(config, device_type)
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        peaks = list(_run_stages(cfg, info, None, lambda t: t.to(info.device), device_type))
    worst = [_allocator_peak(prof, p.stage) if p.measured is None else p.measured for p in peaks]
    if dist.is_initialized() and dist.get_world_size() > 1:  # the planning figure is the worst rank's
        worst_ranks = torch.tensor(worst, dtype=torch.float64, device=info.device)
        dist.all_reduce(worst_ranks, op=dist.ReduceOp.MAX)
        worst = [int(v) for v in worst_ranks.tolist()]
    return [dataclasses.replace(peak, measured=value) for peak, value in zip(peaks, worst)]


def format_report(peaks: list[StagePeak], config: TrainConfig, world_size: int, device_type: str) -> str:
    """The per-rank peaks as a table (MiB), one column per stage, with the settings that decide them.

    Args:
        peaks: :func:`estimate_memory`'s or :func:`measure_memory`'s result.
        config: the run's configuration.
        world_size: the ranks.
        device_type: the device of the run.

    Returns:
        The text.
    """
    cfg = estimation_config(config, device_type)
    shapes = ", ".join(
        f"{p.stage} {getattr(cfg, p.stage).micro_batch_size} x {cfg.data.max_len} tokens "
        f"x {getattr(cfg, p.stage).grad_accum} micro-batches"
        for p in peaks
    )
    lines = [
        f"Per-rank peak memory (MiB): {cfg.model.checkpoint_dir or cfg.model.preset}, recipe {cfg.recipe}, "
        f"{world_size} ranks on {device_type}, parameters {cfg.parallel.mixed_precision}, activation "
        f"checkpointing {cfg.parallel.activation_checkpoint}; {shapes}",
        f"{'':<44}" + "".join(f"{p.stage:>12}" for p in peaks),
    ]
    rows = [(name, [p.categories[name] for p in peaks]) for name in CATEGORIES]
    rows += [
        ("  (activations: the fused loss's gradients)", [p.loss_held for p in peaks]),
        ("tracked peak", [p.tracked_peak for p in peaks]),
        ("fused loss workspace (added at the loss)", [p.loss_workspace for p in peaks]),
        ("CUDA stream allowance", [p.stream_allowance for p in peaks]),
        ("estimated peak", [p.peak for p in peaks]),
    ]
    if all(p.measured is not None for p in peaks):
        rows.append(("measured peak (allocator)", [p.measured for p in peaks]))
    for label, values in rows:
        lines.append(f"{label:<44}" + "".join(f"{v / 2**20:>12.1f}" for v in values))
    if all(p.measured for p in peaks):
        lines.append(f"{'estimate / measured':<44}" + "".join(f"{p.peak / p.measured:>12.3f}" for p in peaks))
    return "\n".join(lines)
