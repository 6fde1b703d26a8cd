"""Sharded models on PyTorch FSDP2 (``training.sharding: fsdp``).

Each process holds 1/N of the student's parameters, gradients and optimizer state:
``fully_shard`` is applied to every transformer block (the children of the model's
largest ``nn.ModuleList``: decoder layers, encoder layers) and then to the root, as
torchtune's and torchtitan's recipes do. A forward pass gathers one block's parameters
at a time; the backward pass reduce-scatters (averages) the gradients, so the engine's
own gradient averaging is not used for the sharded parameters.

FSDP2 is called directly, on the CPU (gloo) and on GPUs (NCCL) alike: one code path.
Accelerate's FSDP plugin is not used, as it drives FSDP on GPUs only and would wrap the
model in its own objects where kdforge's checkpoints, evaluation and saved models
expect the module itself.

A sharded model is not a model one process can run, save or evaluate alone: at the end
of training :func:`gather_whole` turns it back into an ordinary module (every process
gets the whole weights, as before sharding), which the runner evaluates and saves as
an ordinary transformers or sentence-transformers folder. A model is sharded only on
several processes; on one, ``sharding: fsdp`` trains it whole (its checkpoints are still
written with DCP, so a run continues on any number of processes).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from kdforge.distributed import world_size
from kdforge.errors import KDForgeError


def sharded(cfg: Any) -> bool:
    """Whether this run shards its models: ``training.sharding: fsdp`` on several processes."""
    return getattr(cfg, "sharding", "none") == "fsdp" and world_size() > 1


def block_list(model: nn.Module) -> nn.ModuleList | None:
    """The ``nn.ModuleList`` holding the model's repeated blocks: its largest (by parameters); None if it has none."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters())) if lists else None


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the children of :func:`block_list`."""
    found = block_list(model)
    return list(found) if found is not None else []


def _mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size(),))


def _mixed_precision(precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    # the parameters are gathered in half precision and the gradients reduced in float32, as
    # torchtune's recipes do; the sharded master weights and the optimizer stay float32
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()


def shard(
    model: nn.Module,
    device: torch.device,
    *,
    precision: str = "fp32",
    offload: bool = False,
    root_reshard: bool | None = None,
) -> nn.Module:
    """Shard ``model`` in place over every process (per block, then the root); returns it."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    found = blocks(model)
    if not found:
        raise KDForgeError(
            f"training.sharding: fsdp shards a model per transformer block, and {type(model).__name__} has none"
            " (no nn.ModuleList of layers); use sharding: none for it"
        )
    model.to(device)
    mesh = _mesh(device)
    options: dict[str, Any] = {"mesh": mesh, "mp_policy": _mixed_precision(precision)}
    if offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for block in found:
        fully_shard(block, **options)
    root = {} if root_reshard is None else {"reshard_after_forward": root_reshard}
    unit = root_unit(model)
    before = type(unit)
    fully_shard(unit, **options, **root)
    _keep_output_recording(unit, before)
    return model


def _keep_output_recording(unit: nn.Module, before: type) -> None:
    """FSDP gives a sharded module a class of its own (``FSDPBertModel``); transformers looks up which
    outputs a model can record (attentions, hidden states) by its class, so the new class gets the old one's."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # another transformers: models there record outputs their own way
        return
    recorded = dict.get(_CAN_RECORD_REGISTRY, str(before))
    if recorded:
        _CAN_RECORD_REGISTRY[unit] = recorded


def root_unit(model: nn.Module) -> nn.Module:
    """The module sharded as the root: the outermost transformers model inside ``model`` (the one a
    task's adapter calls: a causal LM itself, a sentence-transformers model's BERT), else ``model``.
    FSDP gathers a unit's own weights when its forward is called, so the root must be a module that is
    called; weights outside it (a sentence-transformers Dense layer) stay whole on every process."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover (a dependency)
        return model
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)


def replicated(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters FSDP does not hold (outside the root unit): whole on every process, their
    gradients averaged by the engine."""
    return [p for p in params if not hasattr(p, "to_local")]


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over sharded and whole parameters together: one norm over all of them (a
    sharded gradient's norm is reduced over the processes), every gradient scaled by the same factor."""
    grads = [p.grad for p in params if p.grad is not None]
    parts = [[g for g in grads if hasattr(g, "to_local")], [g for g in grads if not hasattr(g, "to_local")]]
    norms = []
    for part in parts:
        if part:
            norm = torch.nn.utils.get_total_norm(part)
            norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    for part in parts:
        if part:
            torch.nn.utils.clip_grads_with_norm_(part, max_norm, total)
    return total


def shard_for_inference(model: nn.Module, device: torch.device, precision: str = "fp32") -> nn.Module:
    """A teacher sharded the same way: no gradients, no optimizer state, its blocks gathered one at a
    time, and its root's weights (embeddings, head) sharded again after each forward pass too (a training
    model keeps them whole until its backward pass, which a teacher never has)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return shard(model, device, precision=precision, root_reshard=True)


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s structure whose parameters and persistent buffers take no memory (meta
    tensors): what :func:`gather_whole` fills with the trained weights. Non-persistent buffers (rotary
    tables) are copied as they are, since no state dict holds them."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    persistent = {id(t) for t in model.state_dict(keep_vars=True).values()}
    for b in model.buffers():
        if id(b) in persistent:
            memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def gather_whole(model: nn.Module, plain: nn.Module) -> nn.Module:
    """The sharded ``model``'s weights, gathered whole on every process into ``plain`` (its
    :func:`skeleton`); returns ``plain``, an ordinary module."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    device = next(iter(state.values())).device if state else torch.device("cpu")
    _materialize(plain, device)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KDForgeError(
            f"the gathered student does not fit its structure (missing {missing}, unexpected {unexpected})"
        )
    return plain


def unshard_in_place(model: nn.Module, plain: nn.Module) -> None:
    """Gather the sharded ``model`` whole (into ``plain``, its :func:`skeleton`) and make the same object an
    ordinary module again: whoever holds it (the run's teacher view, a report's sample generations) then
    runs it alone. The object takes ``plain``'s class and attributes; FSDP's records of it are dropped."""
    gathered = gather_whole(model, plain)
    try:
        from torch.distributed._composable_state import _module_state_mapping

        for module in model.modules():
            _module_state_mapping.pop(module, None)
    except ImportError:  # another torch keeps its records elsewhere; sharding the object again may refuse
        pass
    model.__class__ = type(gathered)
    model.__dict__ = gathered.__dict__


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Storage for every meta parameter and buffer (filled by a state dict next); a tensor two
    modules share (a tied LM head) stays one tensor."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table, wrap in ((module._parameters, True), (module._buffers, False)):
            for name, t in list(table.items()):
                if t is None or not t.is_meta:
                    continue
                if id(t) not in made:
                    fresh = torch.empty_like(t, device=device)
                    made[id(t)] = nn.Parameter(fresh, requires_grad=t.requires_grad) if wrap else fresh
                table[name] = made[id(t)]


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this process's shard
    return local.numel() * local.element_size()


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """The bytes this process holds for ``model``'s weights and gradients and the optimizer's state."""
    params = list(model.parameters())
    return {
        "weights": sum(_local_bytes(p) for p in params),
        "gradients": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(
            _local_bytes(v) for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)
        ),
    }


def largest_over_processes(held: dict[str, int]) -> dict[str, int]:
    """Each entry's largest value over processes (what the fullest process holds)."""
    if world_size() == 1:
        return held
    import torch.distributed as dist

    values = torch.tensor(list(held.values()), dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return dict(zip(held, (int(v) for v in values.tolist())))
