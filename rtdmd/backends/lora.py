"""LoRA adapters on one shared base model, seen by methods as small ``nn.Module`` handles.

The teacher, the generator and the fake score of a distillation run can all live on one copy
of the transformer: the generator and the fake score are two LoRA adapters on it, and the
teacher is the same weights with every adapter switched off. An ``AdapterNet`` is the handle
for one adapter (or for none: the teacher); calling it runs the shared base with exactly that
adapter active, and its ``parameters()`` are that adapter's weights only, so optimisers, DDP,
EMA copies and checkpoints see nothing else.

Switching is done by writing peft's per-layer state (``_active_adapter``, ``_disable_adapters``)
directly: peft's own ``set_adapter`` / ``enable_adapters`` also flip ``requires_grad``, which
would silently drop gradients of an adapter whose graph was built before the switch.
Gradient checkpointing recomputes blocks during backward, when another adapter may be active,
so ``enable_gradient_checkpointing`` restores the forward-time adapter state during recompute.
peft (an optional extra) is imported where adapters are used.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from rtdmd.errors import UserError
from rtdmd.seeding import derive_seed

VelocityCall = Callable[[nn.Module, torch.Tensor, torch.Tensor, dict], torch.Tensor]

#: Attention projections of SD3 / SD3.5 joint blocks (image stream and text stream).
SD3_ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
#: FLUX.2: the same in double-stream blocks, plus the fused QKV(+MLP) input and the output
#: projection of the single-stream blocks (which hold 80% of the layers).
FLUX2_ATTENTION_TARGETS = SD3_ATTENTION_TARGETS + ["to_qkv_mlp_proj", "to_out"]


@dataclass
class LoraSpec:
    """One adapter's shape: rank, alpha (scale alpha / rank), target module suffixes, dropout."""

    rank: int = 32
    alpha: float = 64.0
    targets: list[str] = field(default_factory=lambda: list(SD3_ATTENTION_TARGETS))
    dropout: float = 0.0
    seed: int = 0  # lora_A init is seeded from (seed, adapter name): identical on every process


_STATE_ATTR = "_rtdmd_lora"  # per-base bookkeeping: {"specs": {name: LoraSpec}, "layers": [...]}


def _book(model: nn.Module) -> dict:
    book = model.__dict__.get(_STATE_ATTR)
    if book is None:
        book = {"specs": {}, "layers": []}
        model.__dict__[_STATE_ATTR] = book
    return book


def target_module_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the nn.Linear modules whose name is, or ends with '.' + , one of ``targets``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    def linear(m):  # a Linear, or a Linear already wrapped by an earlier adapter
        return isinstance(m.get_base_layer() if isinstance(m, BaseTunerLayer) else m, nn.Linear)

    names = [n for n, m in model.named_modules()
             if linear(m) and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise UserError(f"no linear layer of {type(model).__name__} matches backend.lora_targets={targets}; "
                        "use module names such as to_q, to_k, to_v, to_out.0.")
    return names


def adapter_names(model: nn.Module) -> list[str]:
    return list(_book(model)["specs"])


def add_adapter(model: nn.Module, name: str, spec: LoraSpec, trainable: bool = True) -> None:
    """Inject LoRA adapter ``name`` (float32 weights, B = 0 so the model is unchanged) into ``model``."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    book = _book(model)
    if name in book["specs"]:
        raise ValueError(f"adapter '{name}' already exists on this model")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise ValueError(f"adapter name '{name}' must be an identifier")
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=target_module_names(model, spec.targets), init_lora_weights=True)
    state = current_state(model) if book["layers"] else (True, ())
    grads = {p: p.requires_grad for p in model.parameters()}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*peft_config.*")  # several adapters on one base is the design
        torch.manual_seed(derive_seed(spec.seed, "lora", name))
        inject_adapter_in_model(config, model, adapter_name=name)
    book["specs"][name] = copy.deepcopy(spec)
    book["layers"] = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    # peft marks other adapters frozen when it adds one; restore what each parameter had.
    for p, g in grads.items():
        p.requires_grad_(g)
    for p in adapter_parameters(model, name):
        p.data = p.data.float()  # fp32 adapter weights on a bf16 base (master precision)
        p.requires_grad_(trainable)
    set_state(model, state)


_ADAPTER_KEY = re.compile(r"\.(lora_[A-Za-z_]+)\.([A-Za-z0-9_]+)\.")


def named_adapter_parameters(model: nn.Module, name: str) -> Iterator[tuple[str, nn.Parameter]]:
    """(key, parameter) of adapter ``name``; keys drop the adapter name (peft / diffusers file format)."""
    for n, p in model.named_parameters():
        m = _ADAPTER_KEY.search(n)
        if m and m.group(2) == name:
            yield n[: m.start()] + "." + m.group(1) + n[m.end() - 1:], p


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    return [p for _, p in named_adapter_parameters(model, name)]


def is_lora_parameter_name(name: str) -> bool:
    return _ADAPTER_KEY.search(name) is not None


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name`` as {'blocks.0.attn.to_q.lora_A.weight': tensor, ...} (detached, on CPU)."""
    return {k: p.detach().cpu().clone() for k, p in named_adapter_parameters(model, name)}


def load_adapter_state_dict(model: nn.Module, name: str, state: Mapping[str, torch.Tensor]) -> None:
    own = dict(named_adapter_parameters(model, name))
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise RuntimeError(f"adapter state does not fit adapter '{name}': missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for k, p in own.items():
            if p.shape != state[k].shape:
                raise RuntimeError(f"adapter tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(p.shape)}")
            p.copy_(state[k].to(p.dtype))


def peft_metadata(spec: LoraSpec, model: nn.Module) -> dict:
    """LoraConfig fields diffusers needs to rebuild the adapter on load (alpha != rank)."""
    return {"r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
            "target_modules": target_module_names(model, spec.targets), "bias": "none",
            "init_lora_weights": True, "use_dora": False}


# ------------------------------------------------------------------------ active adapter state
State = tuple[bool, tuple[str, ...]]  # (adapters disabled, active adapter names)


def current_state(model: nn.Module) -> State:
    layers = _book(model)["layers"]
    if not layers:
        return (True, ())
    first = layers[0]
    return (bool(first._disable_adapters), tuple(first.active_adapters))


def set_state(model: nn.Module, state: State) -> None:
    disabled, active = state
    for layer in _book(model)["layers"]:
        layer._disable_adapters = disabled
        layer._active_adapter = list(active)


@contextlib.contextmanager
def using_state(model: nn.Module, state: State):
    before = current_state(model)
    set_state(model, state)
    try:
        yield
    finally:
        set_state(model, before)


def using_adapter(model: nn.Module, name: str | None):
    """Context: only adapter ``name`` active (None: all adapters off, i.e. the base model)."""
    return using_state(model, (True, ()) if name is None else (False, (name,)))


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """diffusers gradient checkpointing that re-activates the forward-time adapter during recompute."""

    def checkpoint(block, *args):
        state = current_state(model)
        return torch.utils.checkpoint.checkpoint(
            block.__call__, *args, use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), using_state(model, state)))

    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)


def strip_adapters(model: nn.Module) -> nn.Module:
    """Replace every LoRA-wrapped layer by its base layer (in place); returns the model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    model.__dict__.pop(_STATE_ATTR, None)
    return model


def merged_copy(model: nn.Module, name: str) -> nn.Module:
    """A CPU float32 copy of ``model`` with adapter ``name`` merged into its weights, no LoRA layers left."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    dup = copy.deepcopy(model).to("cpu", torch.float32)
    dup.__dict__.pop(_STATE_ATTR, None)
    for module in dup.modules():
        if isinstance(module, BaseTunerLayer) and name in module.lora_A:
            module._disable_adapters = False
            module.merge(adapter_names=[name])
    return strip_adapters(dup)


# ------------------------------------------------------------------------ handles
class AdapterNet(nn.Module):
    """``v = net(x, sigma, cond)`` through a shared base with one adapter active (None: the base alone).

    The base is held outside the module tree, so ``parameters()`` yields this adapter's weights
    only (the very Parameter objects inside the base). ``copy.deepcopy`` makes a new adapter on
    the same base with the same values (how the trainer's EMA copies stay small).
    """

    def __init__(self, base: nn.Module, adapter: str | None, call: VelocityCall):
        super().__init__()
        self.__dict__["base"] = base
        self.__dict__["call"] = call
        self.adapter = adapter
        self.weights = nn.ParameterList(adapter_parameters(base, adapter) if adapter else [])

    def forward(self, x, sigma, cond):
        with using_adapter(self.base, self.adapter):
            return self.call(self.base, x, sigma, cond)

    @property
    def spec(self) -> LoraSpec:
        return _book(self.base)["specs"][self.adapter]

    def __deepcopy__(self, memo):
        if self.adapter is None:
            return AdapterNet(self.base, None, self.call)
        name = unique_adapter_name(self.base, f"{self.adapter}_copy")
        add_adapter(self.base, name, self.spec, trainable=any(p.requires_grad for p in self.weights))
        load_adapter_state_dict(self.base, name, adapter_state_dict(self.base, self.adapter))
        dup = AdapterNet(self.base, name, self.call)
        dup.train(self.training)
        return dup

    def extra_repr(self) -> str:
        return f"adapter={self.adapter!r}, base={type(self.base).__name__}"


class FullNet(nn.Module):
    """``v = net(x, sigma, cond)`` through its own full copy of the model (full fine-tuning)."""

    def __init__(self, model: nn.Module, call: VelocityCall):
        super().__init__()
        self.model = model
        self.__dict__["call"] = call

    def forward(self, x, sigma, cond):
        return self.call(self.model, x, sigma, cond)


def unique_adapter_name(model: nn.Module, stem: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_]", "_", stem)
    taken = set(adapter_names(model))
    if stem not in taken:
        return stem
    i = 2
    while f"{stem}_{i}" in taken:
        i += 1
    return f"{stem}_{i}"
