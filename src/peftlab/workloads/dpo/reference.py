"""DPO's reference model without a second model: the policy itself, switched to the reference for a pass.

- No --init-from: the reference is the base model, the policy with its adapter modules disabled
  (`peft.disable_adapters`: each module computes exactly its base layer; nothing is merged or copied).
- --init-from RUN (an SFT run): the reference is that run's adapter, frozen. Its tensors are read from RUN's
  checkpoint file (never from the current weights, so a resumed run keeps the reference it started with) and, for
  a reference pass, become the adapter parameters' storage: `param.data` is pointed at the frozen tensor and back
  afterwards (a pointer swap, no copy, no merge). The optimizer and autograd keep seeing the same Parameter objects.

Either way the base weights are shared, so every trainable tensor must live in an adapter module: a full fine-tune,
BitFit, or trained heads, norms or biases (--extra-trainable) would move the reference with the policy, and are
refused (`check_reference_possible`). The reference pass runs under `torch.no_grad` with every module in eval mode
(no dropout), so it is one fixed function whatever the policy's training mode.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from peftlab.cache import state_digest
from peftlab.errors import PeftlabError
from peftlab.peft.base import adapter_modules, adapter_parameters, disable_adapters
from peftlab.peft.checkpoint import checkpoint_parameters


@dataclass(frozen=True)
class ReferenceState:
    """What the reference is: the adapters disabled (`frozen` empty), or the adapter parameters each holding a
    frozen tensor of an earlier run's checkpoint (`frozen`: (parameter, tensor) pairs, `names` their names)."""

    source: str  # for messages: "the base model (adapters disabled)" or the checkpoint directory
    frozen: tuple[tuple[nn.Parameter, torch.Tensor], ...] = ()
    names: tuple[str, ...] = ()


DISABLED = ReferenceState("the base model (adapters disabled)")


def check_reference_possible(model: nn.Module, method: str, extra_trainable: Sequence[str]) -> None:
    """Refuse a model whose training would move the reference: DPO's reference shares every weight outside the
    adapter modules with the policy, so only adapter modules may train."""
    reason = ("the reference is the same model with its adapter switched off (or frozen), so everything that trains "
              "must be an adapter module")
    if extra_trainable:
        raise PeftlabError(f"--objective dpo cannot train --extra-trainable {','.join(extra_trainable)}: {reason}. "
                           "Fix: leave --extra-trainable out")
    adapter = {id(parameter) for parameter in adapter_parameters(model)}
    outside = [name for name, parameter in model.named_parameters()
               if parameter.requires_grad and id(parameter) not in adapter]
    if outside or not adapter:
        raise PeftlabError(f"--objective dpo cannot train with --method {method} (it trains "
                           f"{outside[0] if outside else 'no adapter module'}{' and more' if len(outside) > 1 else ''})"
                           f": {reason}. Fix: --method lora (or dora, ia3, adapter, prefix)")


def load_reference_state(model: nn.Module, checkpoint: str | Path | None) -> ReferenceState:
    """The reference of a run: DISABLED without a checkpoint; else the checkpoint's adapter tensors, on the model's
    device and in each parameter's dtype. A checkpoint that trained tensors outside its adapter modules is refused
    (they would not be part of the reference when this run resumes)."""
    if checkpoint is None:
        return DISABLED
    fits, _ = checkpoint_parameters(model, checkpoint)
    adapter = {id(parameter) for parameter in adapter_parameters(model)}
    unfit = len(adapter - {id(parameter) for parameter, _ in fits.values()})
    if unfit:
        raise PeftlabError(f"the DPO reference {checkpoint} does not fit this run's adapter ({unfit} adapter tensor(s) "
                           "of another shape). Fix: give this run that run's adapter settings")
    outside = sorted(name for name, (parameter, _) in fits.items() if id(parameter) not in adapter)
    if outside:
        raise PeftlabError(f"the DPO reference {checkpoint} trained {outside[0]}{' and more' if len(outside) > 1 else ''}"
                           " besides its adapter; the reference can only be an adapter over the shared base. Fix: "
                           "start from a run trained without --extra-trainable")
    names = tuple(sorted(name for name, (parameter, _) in fits.items()))
    frozen = tuple((fits[name][0], fits[name][1].to(fits[name][0].device, fits[name][0].dtype)) for name in names)
    return ReferenceState(str(checkpoint), frozen, names)


@contextmanager
def reference_model(model: nn.Module, reference: ReferenceState) -> Iterator[nn.Module]:
    """Within the block `model` computes the DPO reference (see the module docstring), without gradient and in
    eval mode; on leaving it, the policy's adapter and every module's training flag are back as they were."""
    merged = [name for name, module in adapter_modules(model) if module.mergeable and module.merged]
    if merged:
        raise PeftlabError(f"the DPO reference needs unmerged adapters, but {merged[0]} is merged. Fix: leave "
                           "`merged(model)` first")
    training = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), (_holding(reference.frozen) if reference.frozen else disable_adapters(model)):
            yield model
    finally:
        for module, mode in training:
            module.training = mode


def reference_digest(model: nn.Module, reference: ReferenceState) -> str:
    """`cache.state_digest` of the model as the reference: with the frozen tensors in the adapter, or, with the
    adapters disabled, with zeros in place of their tensors, which the reference does not use (so the policy's
    training, a resumed run or an evaluation of a trained one leaves the digest as it was)."""
    unused = tuple((parameter, torch.zeros_like(parameter)) for parameter in adapter_parameters(model))
    with torch.no_grad(), _holding(reference.frozen or unused):
        return state_digest(model)


@contextmanager
def _holding(frozen: Sequence[tuple[nn.Parameter, torch.Tensor]]) -> Iterator[None]:
    """Each parameter's storage is its frozen tensor within the block (a pointer swap both ways, no copy)."""
    trained = [parameter.data for parameter, _ in frozen]
    for parameter, tensor in frozen:
        parameter.data = tensor
    try:
        yield
    finally:
        for (parameter, _), data in zip(frozen, trained):
            parameter.data = data
