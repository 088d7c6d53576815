"""Packed weights for decoding on a CPU (`--weights fp16 | int8` of `peftlab generate`, `eval` and `predict`): each
frozen linear layer also packed for fbgemm, PyTorch's CPU kernels for packed weights, and used where reading the
weights is the cost.

A decoding step reads every weight for one token per row, so its time is the time to read them (README, "Fast
decoding"); fp16 weights halve that read and int8 weights quarter it. A pass over a whole prompt (or an
evaluation's loss pass) is bound by arithmetic instead, where fbgemm's fp16 is no faster than fp32 here and int8
costs accuracy: so the packed weights are read only inside `packed_steps`, which `generation.logits_function`
enters for each one-token step, and every other product is the fp32 layer's own, bit for bit. An evaluation's loss
and the first token after each prompt are fp32's exactly (the first comes from the prompt's pass); the tokens
after it come from the packed weights.
- fp16: each weight rounded to fp16 (a relative error of at most 2^-11), the activations and the sums in fp32
  (`quantized::linear_dynamic_fp16`). Outputs move by ~1e-4 relative.
- int8: each output row's weights in int8 with its own scale (max |w| / 127), the activations quantized to 7 bits
  on every call with one scale for the whole input (`quantized::linear_dynamic`, as torch's dynamic quantization
  does on x86). Outputs move by ~1e-2 relative, and a row's values depend on the other rows of its batch through
  the input's scale. The MLP's output projection (Llama's down_proj, GPT-2's mlp.c_proj) gets fp16 instead: its
  input holds a few activations far larger than the rest, which leave the others a handful of levels (measured
  with every product packed, on an RT instruct run's 64 test reviews: int8 there took the loss from 0.284 to 1.709
  and the accuracy from 0.781 to 0.625; fp16 there, 0.289 and 0.797).

What stays fp32 only: embeddings, norms, attention, adapters' own weights (LoRA's A and B, IA3's vectors,
bottleneck layers), and the base of a DoRA layer (its forward reads the base weight itself). The fp32 weights are
kept, so memory grows by the packed copies. Inference only: the packed products have no gradient, and adapters
cannot be merged into packed weights.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from peftlab.catalog import WEIGHTS
from peftlab.errors import PeftlabError
from peftlab.peft.base import adapter_modules


class PackedSwitch:
    """Whether a packed model's layers compute with their packed weights now: only inside `packed_steps`."""

    def __init__(self):
        self.on = False


class PackedLinear(nn.Module):
    """An `nn.Linear` (kept, fp32) with its weights also packed in fp16 or int8 for fbgemm. It computes the fp32
    layer's product, bit for bit, except while its model's switch is on (`packed_steps`, during decoding steps),
    when it reads the packed weights."""

    def __init__(self, layer: nn.Linear, weights: str, switch: PackedSwitch):
        super().__init__()
        self.layer, self.switch = layer, switch
        weight = layer.weight.detach().float()  # (out, in)
        if weights == "int8":
            weight = quantized_rows(weight)
        self.pack(weight, None if layer.bias is None else layer.bias.detach().float(), weights)

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None, weights: str) -> None:
        """Pack `weight` (out, in): fp32 for fp16 (rounded when packed), or a per-row quantized int8 tensor."""
        (self.out_features, self.in_features), self.weights = weight.shape, weights
        prepack = torch.ops.quantized.linear_prepack_fp16 if weights == "fp16" else torch.ops.quantized.linear_prepack
        self.packed = prepack(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.switch.on and x.dtype == torch.float32:
            return self.packed_product(x)
        return self.layer(x)

    def packed_product(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (rows, in)
        if self.weights == "fp16":
            out = torch.ops.quantized.linear_dynamic_fp16(rows, self.packed)
        else:  # 7-bit activations (reduce_range), as x86's dynamic quantization: fbgemm's int16 sums cannot overflow
            out = torch.ops.quantized.linear_dynamic(rows, self.packed, True)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"weights={self.weights} (decoding steps)"


class JoinedPackedLinear(PackedLinear):
    """PackedLinear layers side by side as one packed product (decode_step's q/k/v and gate/up, called during
    decoding steps only): their packed weights stacked, the same values, so the outputs are theirs bit for bit."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, weights: str):
        nn.Module.__init__(self)
        self.pack(weight, bias, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed_product(x)


@contextmanager
def packed_steps(model: nn.Module) -> Iterator[None]:
    """Within the block the model's packed layers read their packed weights (a decoding step); outside it, and for
    a model that is not packed, every product is the fp32 layer's."""
    switch = getattr(model, SWITCH_ATTRIBUTE, None)
    if switch is None:
        yield
        return
    switch.on = True
    try:
        yield
    finally:
        switch.on = False


SWITCH_ATTRIBUTE = "peftlab_packed_switch"  # set on a model by `pack_linear_layers`


def join_packed(parts: list[PackedLinear]) -> JoinedPackedLinear | None:
    """`parts` as one JoinedPackedLinear, or None when they cannot be joined (other kinds, a bias on some only)."""
    if len({part.weights for part in parts}) > 1:
        return None
    int8 = parts[0].weights == "int8"
    unpack = torch.ops.quantized.linear_unpack if int8 else torch.ops.quantized.linear_unpack_fp16
    weights, biases = zip(*(unpack(part.packed) for part in parts))
    if len({bias is None for bias in biases}) > 1:
        return None
    bias = None if biases[0] is None else torch.cat(biases)
    if not int8:  # fp32 tensors holding the fp16 values: packed again exactly
        return JoinedPackedLinear(torch.cat(weights), bias, "fp16").eval()
    integers = torch.cat([weight.int_repr() for weight in weights])
    scales = torch.cat([weight.q_per_channel_scales() for weight in weights])
    return JoinedPackedLinear(per_channel_int8(integers, scales), bias, "int8").eval()


def quantized_rows(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) fp32 -> int8 with one scale per row, max |w| / 127 (symmetric), as fbgemm packs it."""
    scales = (weight.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # (out,)
    return per_channel_int8(torch.round(weight / scales[:, None]).to(torch.int8), scales)


def per_channel_int8(integers: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(out, in) int8 values with one scale per row as the per-channel qint8 tensor fbgemm packs."""
    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors; fbgemm's packing still takes them
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        return torch._make_per_channel_quantized_tensor(integers, scales.double(),
                                                        torch.zeros(len(scales), dtype=torch.long), 0)


def pack_linear_layers(model: nn.Module, weights: str) -> int:
    """Wrap the model's frozen linear layers in `PackedLinear`s of `weights` (fp16 | int8; fp32 leaves the model as
    it is); returns how many were packed. The output embedding is packed too (the input embedding stays as it is).
    Refused off the CPU, in training mode, on merged adapters, and on a model packed already."""
    if weights not in WEIGHTS:
        raise PeftlabError(f"--weights must be one of {', '.join(WEIGHTS)}, got '{weights}'")
    if weights == "fp32":
        return 0
    if any(parameter.device.type != "cpu" for parameter in model.parameters()):
        raise PeftlabError(f"--weights {weights} runs on a CPU only (fbgemm kernels); on a GPU leave --weights fp32")
    if model.training:
        raise PeftlabError(f"--weights {weights} is for inference: the packed products have no gradient")
    if hasattr(model, SWITCH_ATTRIBUTE):
        raise PeftlabError("the model's linear layers are packed already; load it again to pack them otherwise")
    if any(getattr(module, "merged", False) for _, module in adapter_modules(model)):
        raise PeftlabError(f"--weights {weights} packs the base weights as they are: un-merge the adapters first "
                           "(drop --merge-for-evaluation)")
    keep = set()  # linear layers that stay fp32: adapters' own, and bases whose adapter reads the weight itself
    for _, module in adapter_modules(model):
        keep |= {id(parameter) for parameter in module.adapter_parameters()}
        if getattr(module, "reads_base_weight", False):
            keep |= {id(parameter) for parameter in module.base.parameters()}
    targets = [name for name, module in model.named_modules()
               if type(module) is nn.Linear and id(module.weight) not in keep]
    switch = PackedSwitch()
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        kind = "fp16" if weights == "int8" and MLP_OUTPUT.search(name) else weights
        setattr(parent, child, PackedLinear(getattr(parent, child), kind, switch).eval())
    setattr(model, SWITCH_ATTRIBUTE, switch)
    return len(targets)


MLP_OUTPUT = re.compile(r"(^|\.)mlp\.(down_proj|c_proj)(\.|$)")  # int8 packs these fp16 (module docstring)


def pack_for_decoding(model: nn.Module, weights: str) -> None:
    """`pack_linear_layers` as the commands call it (--weights), saying what it did (nothing for fp32)."""
    packed = pack_linear_layers(model, weights)
    if weights != "fp32":
        mlp_outputs = " (the MLP's output projections fp16)" if weights == "int8" else ""
        print(f"--weights {weights}: {packed} linear layers packed (fbgemm){mlp_outputs} for the decoding steps; "
              "prompts and loss passes, embeddings, norms and adapters stay fp32", flush=True)
