"""The methods that add no modules and only choose what trains: full fine-tuning, BitFit, head-only."""

from __future__ import annotations

from torch import nn

from peftlab.errors import PeftlabError
from peftlab.peft.base import AdapterMethod, adapter_modules


def classifier_head(model: nn.Module) -> nn.Module | None:
    """The classification head: the root module's `score` (peftlab SequenceClassifier, HF *ForSequenceClassification)
    or `classifier` submodule; None for language models."""
    for attribute in ("score", "classifier"):
        module = getattr(model, attribute, None)
        if isinstance(module, nn.Module):
            return module
    return None


def bias_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [module.bias for module in model.modules() if isinstance(getattr(module, "bias", None), nn.Parameter)]


class FullMethod(AdapterMethod):
    """Every parameter of the plain model trains."""

    name = "full"

    def check_model(self, model: nn.Module) -> None:
        if any(True for _ in adapter_modules(model)):
            raise PeftlabError("method 'full' trains the plain model; this one has adapter modules. "
                               "Fix: load it without adapters")

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(model.parameters())


class BitFitMethod(AdapterMethod):
    """Only the bias terms train (Ben Zaken et al., 2022)."""

    name = "bitfit"

    def check_model(self, model: nn.Module) -> None:
        if not bias_parameters(model):
            raise PeftlabError("method 'bitfit' trains the bias terms, and this model has none (Llama-family models "
                               "such as SmolLM2 have bias-free linear layers). Fix: use --method lora, or --method "
                               "head for a classifier")

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return bias_parameters(model)


class HeadMethod(AdapterMethod):
    """Only the classifier head trains (a linear probe of the frozen model)."""

    name = "head"

    def check_model(self, model: nn.Module) -> None:
        if classifier_head(model) is None:
            raise PeftlabError("no classifier head to train: this is not a classification model (expected a `score` module)")

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(classifier_head(model).parameters())
