"""One decoding step (one new token per row) of a GPT-2 or Llama model, without transformers' module stack.

At batch 1 a decode step reads every weight once and does little arithmetic, so its time should be the time to
read the weights. Through the transformers modules it is far from that on a CPU (bench/bench_generate.py
--profile): Python and dispatch between the ~30 small operations of each layer cost as much as the attention,
and MKL runs each one-row product on one thread, well below the memory bandwidth. `DecodeStep` computes the same
layer with the same operations:
- q, k, v (and Llama's gate and up) are one product with their weights concatenated, and every product runs as a
  batch of blocks of output rows (`blocked_product`), which reads the weights on every thread;
- positions, rotary angles and the attention mask are computed once per step, not once per layer;
- attention is called as transformers calls it for one query column, and keys and values go into the model's
  own cache (`kv_cache.InPlaceLayer`), so the prompt's forward pass (through the model, as before) and the steps
  after it share one cache.

The logits are the model body's bit for bit (each output is still one dot product in the same order; tested on
GPT-2 and Llama, with and without adapters), so decoding gives the same tokens, greedy or sampled. A linear layer
that is not a plain `nn.Linear` (a LoRA, IA3 or DoRA module, a bottleneck adapter, a hooked layer) is called as
the module it is, so adapters work unmerged, as in evaluation. Anything else this step does not reproduce (prefix
tuning's hook on the body, training mode, other attention or rotary variants, hooks on blocks) makes `build`
return None and the caller runs the model itself. The concatenated q/k/v and gate/up weights are a copy
(SmolLM2-135M: 266 MB) made once per model and made again when a weight changes in place (training between
evaluations) or a module is added or removed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary
from transformers.activations import NewGELUActivation
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2Block, GPT2LMHeadModel, GPT2MLP
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP,
                                                      LlamaRMSNorm)

from peftlab.weights import PackedLinear, join_packed


MIN_BLOCK_ROWS = 64  # output rows per block at least (`blocks_pay`)


class Projection:
    """x (rows, in) -> the outputs of `layers` side by side (rows, sum of outs): one product with their weights
    concatenated when every layer is a plain `nn.Linear`, else each layer called as it is.

    On a CPU the product runs as a batch of `parts` products over consecutive blocks of output rows
    (`torch.bmm` over a view of the weight): MKL computes a one-row product on one thread, well below the memory
    bandwidth, while the blocks run on every thread (`bench_roofline.py --shapes` measures both on SmolLM2's
    shapes). Each output is still one dot product over the input, as in `F.linear`."""

    def __init__(self, layers: Sequence[nn.Module], parts: int):
        self.layers = None if all(plain_linear(layer) for layer in layers) else list(layers)
        if self.layers is not None:
            joined = join_packed(self.layers) if len(layers) > 1 and all(
                type(layer) is PackedLinear and without_hooks(layer) for layer in layers) else None
            self.layers = self.layers if joined is None else [joined]  # `--weights`: one packed call, same values
            return
        self.weight = torch.cat([layer.weight for layer in layers]) if len(layers) > 1 else layers[0].weight
        self.bias = None
        if layers[0].bias is not None:
            self.bias = torch.cat([layer.bias for layer in layers]) if len(layers) > 1 else layers[0].bias
        self.parts = parts if blocks_pay(self.weight, parts) else 1
        self.blocks = weight_blocks(self.weight.contiguous(), self.parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.layers is not None:
            outputs = [layer(x) for layer in self.layers]
            return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        if self.parts == 1:
            return F.linear(x, self.weight, self.bias)
        return blocked_product(x, self.blocks, self.bias)


def blocks_pay(weight: torch.Tensor, parts: int) -> bool:
    """Whether `weight` splits into `parts` blocks of at least MIN_BLOCK_ROWS rows, fp32 on a CPU (where the blocks
    are tested to equal one product bit for bit): smaller blocks gain nothing, and MKL computes a product that
    small with other kernels, which round differently."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and len(weight) % parts == 0
            and len(weight) // parts >= MIN_BLOCK_ROWS)


def weight_blocks(weight: torch.Tensor, parts: int) -> torch.Tensor:
    """A contiguous weight (out, in) as `parts` blocks of consecutive output rows, each transposed: (parts, in,
    out / parts), a view (no copy)."""
    return weight.view(parts, len(weight) // parts, weight.shape[1]).transpose(1, 2)


def blocked_product(x: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (rows, in) @ each block (+ bias), side by side: (rows, out) in the weight's row order, bit for bit
    `F.linear(x, weight, bias)` (each output is the same dot product, the bias added as addmm adds it; tested)."""
    parts, rows = len(blocks), len(x)
    inputs = x.expand(parts, rows, x.shape[-1])
    if bias is None:
        out = torch.bmm(inputs, blocks)  # (parts, rows, out / parts)
    else:
        out = torch.baddbmm(bias.view(parts, 1, -1).expand(parts, rows, -1), inputs, blocks)
    return out.view(1, -1) if rows == 1 else out.transpose(0, 1).reshape(rows, -1)


def projection_parts() -> int:
    """Blocks per product: two per thread (measured here: 2 threads, 4 blocks read best at batch 1 and 8)."""
    return 2 * torch.get_num_threads()


def plain_linear(layer: nn.Module) -> bool:
    """A `nn.Linear` exactly, with no hooks, whose weight may be copied (an inference tensor has no version to tell
    when it changes)."""
    return (type(layer) is nn.Linear and not layer._forward_hooks and not layer._forward_pre_hooks
            and not layer.weight.is_inference())


def without_hooks(*modules: nn.Module) -> bool:
    return not any(module._forward_hooks or module._forward_pre_hooks for module in modules)


class DecodeStep:
    """`step(input_ids (A, 1), attention_mask (A, W), position_ids (A, 1), cache)` -> last hidden state (A, H),
    after the final norm, for the output projection; `build(model)` makes one, or None where it does not apply:
    fp32 on a CPU only, where its values are tested to be the model's bit for bit (on a GPU, or in half precision,
    a fused product may be computed by another kernel and round differently)."""

    @staticmethod
    def build(model: nn.Module) -> DecodeStep | None:
        if any(parameter.device.type != "cpu" or parameter.dtype != torch.float32 for parameter in model.parameters()):
            return None
        if any(module.training for module in model.modules()):
            return None  # dropout would act
        if type(model) is LlamaForCausalLM:
            return LlamaStep.build(model)
        if type(model) is GPT2LMHeadModel:
            return GPT2Step.build(model)
        return None

    def __call__(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        raise NotImplementedError


def attention(query: torch.Tensor, layer_index: int, key: torch.Tensor, value: torch.Tensor, cache,
              mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """query (A, heads, 1, d), key/value (A, kv heads, 1, d) -> (A, heads * d): the new column goes into the
    cache, the query attends to every filled column the mask allows. SDPA is called as transformers calls it for
    one query column (so the values are the same bit for bit): a group of query heads sharing a kv head is SDPA's
    grouped-query mode without a mask, and the group's queries as one kv head's query rows with one."""
    keys, values = cache.update(key, value, layer_index)
    rows, heads, kv_heads = len(query), query.shape[1], keys.shape[1]
    if heads == kv_heads or mask is None:
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale,
                                             enable_gqa=heads != kv_heads)  # (A, heads, 1, d)
    else:
        packed = query.reshape(rows, kv_heads, heads // kv_heads, query.shape[-1])  # (A, kv heads, group, d)
        out = F.scaled_dot_product_attention(packed, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(rows, -1)


def step_mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """(A, W) 1/0 -> (A, 1, 1, W) bool for SDPA, or None when every column is attended (no padding)."""
    if bool(attention_mask.all()):
        return None
    return attention_mask[:, None, None, :].bool()


def model_signature(model: nn.Module) -> tuple:
    """What a built step depends on: every module (an adapter added or removed changes it) and every parameter's
    version (training between two decodes changes it)."""
    return (tuple(id(module) for module in model.modules()),
            tuple((id(parameter), parameter._version) for parameter in model.parameters()))


STEPS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # model -> its DecodeStep, rebuilt when its signature changes


def decode_step(model: nn.Module) -> DecodeStep | None:
    """The model's `DecodeStep`, built once and rebuilt when a weight or a module changed; None where the model
    must run itself."""
    if any(parameter.is_inference() for parameter in model.parameters()):
        return DecodeStep.build(model)  # no version to compare: built afresh every time
    signature = model_signature(model)
    entry = STEPS.get(model)
    if entry is None or entry[0] != signature:
        entry = (signature, DecodeStep.build(model))
        STEPS[model] = entry
    return entry[1]


class LlamaStep(DecodeStep):
    """LlamaDecoderLayer: x += o(attention(rotary(q), rotary(k), v)) of rmsnorm(x); x += down(silu(gate) * up) of
    rmsnorm(x); then the final rmsnorm."""

    def __init__(self, model: LlamaForCausalLM):
        body, config = model.model, model.config
        self.embed = body.embed_tokens.weight
        self.inverse_frequencies = body.rotary_emb.inv_freq.float()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_size = config.hidden_size // self.heads
        self.scale = body.layers[0].self_attn.scaling
        parts = projection_parts()
        self.layers = [(layer.input_layernorm,
                        Projection([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], parts),
                        Projection([layer.self_attn.o_proj], parts), layer.post_attention_layernorm,
                        Projection([layer.mlp.gate_proj, layer.mlp.up_proj], parts),
                        Projection([layer.mlp.down_proj], parts))
                       for layer in body.layers]
        self.norm = body.norm

    @staticmethod
    def build(model: LlamaForCausalLM) -> LlamaStep | None:
        body, config = model.model, model.config
        rotary = body.rotary_emb
        supported = (
            type(body.embed_tokens) is nn.Embedding and type(body.norm) is LlamaRMSNorm
            and config.hidden_act == "silu" and getattr(rotary, "rope_type", "default") == "default"
            and rotary.attention_scaling == 1.0 and config.hidden_size % config.num_attention_heads == 0
            and getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
            == config.hidden_size // config.num_attention_heads
            and without_hooks(model, body, body.embed_tokens, body.norm, rotary)
            and all(llama_layer_supported(layer) for layer in body.layers))
        return LlamaStep(model) if supported else None

    def __call__(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        rows, heads, kv_heads, size = len(input_ids), self.heads, self.kv_heads, self.head_size
        x = self.embed[input_ids[:, 0]]  # (A, H)
        angles = position_ids.float() * self.inverse_frequencies  # (A, d/2): one product each, as transformers'
        angles = torch.cat((angles, angles), dim=-1)[:, None, None, :]  # (A, 1, 1, d)
        cos, sin = angles.cos().to(self.embed.dtype), angles.sin().to(self.embed.dtype)
        mask = step_mask(attention_mask)
        for index, (norm1, qkv, out, norm2, gate_up, down) in enumerate(self.layers):
            projected = qkv(rms_norm(x, norm1))  # (A, [q | k | v])
            rotated = rotate(projected[:, : (heads + kv_heads) * size].view(rows, heads + kv_heads, 1, size), cos, sin)
            query, key = rotated[:, :heads], rotated[:, heads:]  # q and k rotated as one tensor
            value = projected[:, (heads + kv_heads) * size :].view(rows, kv_heads, 1, size)
            x = x + out(attention(query, index, key, value, cache, mask, self.scale))
            gate, up = gate_up(rms_norm(x, norm2)).chunk(2, dim=-1)
            x = x + down(F.silu(gate) * up)
        return rms_norm(x, self.norm)


def llama_layer_supported(layer: nn.Module) -> bool:
    attention_module, mlp = layer.self_attn, layer.mlp
    plain_biases = [module.bias is not None for module in (attention_module.q_proj, attention_module.k_proj,
                                                         attention_module.v_proj, mlp.gate_proj, mlp.up_proj)
                    if type(module) is nn.Linear]
    return (type(layer) is LlamaDecoderLayer and type(attention_module) is LlamaAttention and type(mlp) is LlamaMLP
            and type(layer.input_layernorm) is LlamaRMSNorm and type(layer.post_attention_layernorm) is LlamaRMSNorm
            and without_hooks(layer, attention_module, mlp, layer.input_layernorm, layer.post_attention_layernorm)
            and len(set(plain_biases)) <= 1 and attention_module.scaling == attention_module.head_dim ** -0.5
            and getattr(attention_module, "sliding_window", None) is None)


def rms_norm(x: torch.Tensor, norm: LlamaRMSNorm) -> torch.Tensor:
    """LlamaRMSNorm as one fused operation (the same values: weight * (x * rsqrt(mean(x^2) + eps)))."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, transformers' `apply_rotary_pos_emb` for one column: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class GPT2Step(DecodeStep):
    """GPT2Block: x += c_proj(attention(c_attn(ln_1(x)))); x += c_proj(gelu_new(c_fc(ln_2(x)))); then ln_f; the
    input is token embedding + position embedding."""

    def __init__(self, model: GPT2LMHeadModel):
        body = model.transformer
        self.embed, self.positions = body.wte.weight, body.wpe.weight
        self.heads = model.config.n_head
        self.head_size = model.config.n_embd // self.heads
        self.scale = body.h[0].attn.scaling
        parts = projection_parts()
        self.layers = [(block.ln_1, Projection([block.attn.c_attn], parts), Projection([block.attn.c_proj], parts),
                        block.ln_2, Projection([block.mlp.c_fc], parts), block.mlp.act,
                        Projection([block.mlp.c_proj], parts))
                       for block in body.h]
        self.norm = body.ln_f

    @staticmethod
    def build(model: GPT2LMHeadModel) -> GPT2Step | None:
        body, config = model.transformer, model.config
        supported = (
            config.scale_attn_weights and not config.scale_attn_by_inverse_layer_idx
            and not config.reorder_and_upcast_attn and type(body.ln_f) is nn.LayerNorm
            and without_hooks(model, body, body.wte, body.wpe, body.ln_f)
            and all(gpt2_block_supported(block) for block in body.h))
        return GPT2Step(model) if supported else None

    def __call__(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        rows, heads, size = len(input_ids), self.heads, self.head_size
        x = self.embed[input_ids[:, 0]] + self.positions[position_ids[:, 0]]  # (A, H)
        mask = step_mask(attention_mask)
        width = heads * size
        for index, (norm1, qkv, out, norm2, up, activation, down) in enumerate(self.layers):
            projected = qkv(layer_norm(x, norm1))  # (A, 3H)
            query, key, value = (projected[:, start : start + width].reshape(rows, heads, 1, size)
                                 for start in (0, width, 2 * width))
            x = x + out(attention(query, index, key, value, cache, mask, self.scale))
            x = x + down(activation(up(layer_norm(x, norm2))))
        return layer_norm(x, self.norm)


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def gpt2_block_supported(block: nn.Module) -> bool:
    return (type(block) is GPT2Block and type(block.attn) is GPT2Attention and type(block.mlp) is GPT2MLP
            and type(block.ln_1) is nn.LayerNorm and type(block.ln_2) is nn.LayerNorm
            and type(block.mlp.act) is NewGELUActivation and not block.attn.is_cross_attention
            and without_hooks(block, block.attn, block.mlp, block.ln_1, block.ln_2, block.mlp.act))

