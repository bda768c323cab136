"""Folding every layer -> BN pair of a model: which pairs a torch.fx graph allows, and the rewrite.

The model is traced with torch.fx (Linear, Conv and BN layers kept as calls); the rewrite replaces
modules by name in a deep copy, so the folded model keeps its class, its forward and its
other modules.
Book: book/derivations/deployment.ipynb
"""
import copy
from collections import Counter

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnlib.fold import OUTPUT_DIMS, STAT_NAMES, fold_into


def is_layer(module):
    """A layer a BN can be folded into: Linear, Conv1d, Conv2d, Conv3d (not transposed)."""
    return isinstance(module, tuple(OUTPUT_DIMS))


def is_bn(module):
    """torch's and bnlib's BN classes, and anything with their attributes (a frozen BN)."""
    if isinstance(module, _BatchNorm):
        return True
    return (isinstance(module, nn.Module) and not is_layer(module)
            and all(hasattr(module, n) for n in STAT_NAMES + ("eps",)))


class LeafTracer(fx.Tracer):
    """fx's tracer, with every layer and BN kept as one call (bnlib's live outside torch.nn)."""

    def is_leaf_module(self, m, module_qualified_name):
        return is_layer(m) or is_bn(m) or super().is_leaf_module(m, module_qualified_name)


def _trace(model):
    tracer = LeafTracer()
    try:
        return tracer, tracer.trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, ... on dynamic Python code
        raise TypeError(
            f"fold_model: torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: "
            f"{err}); fold a traceable part instead (e.g. model.features = "
            "fold_model(model.features)) or single pairs with bnlib.deploy.fold_into") from err


def _counts(model):
    """How many names each module, parameter and buffer object is registered under."""
    mods = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    tensors = Counter(id(t) for _, t in model.named_parameters(remove_duplicate=False))
    tensors.update(id(t) for _, t in model.named_buffers(remove_duplicate=False))
    return mods, tensors


def _owned_alone(model, name, tracer, mods, tensors):
    """Module `name` is registered once, owns its tensors alone, has no hooks, and no leaf
    module above it (whose own code could use it)."""
    m = model.get_submodule(name)
    parts = name.split(".")
    above = [".".join(parts[:i]) for i in range(1, len(parts))]
    return (mods[id(m)] == 1
            and all(tensors[id(t)] == 1 for t in list(m.parameters()) + list(m.buffers()))
            and not (m._forward_hooks or m._forward_pre_hooks)
            and not any(tracer.is_leaf_module(model.get_submodule(p), p) for p in above))


def foldable_pairs(model):
    """The (layer name, BN name) pairs fold_model folds, in graph order.

    A pair is folded when, in the torch.fx graph of model's forward:
      - a Linear/Conv1d/2d/3d call's output goes to one place only, a BN call's sole input (so a
        residual block's conv -> bn folds, but not a conv whose output also feeds a skip, nor a
        BN whose input comes from a ReLU, an addition or the model's input);
      - each of the two modules is called once (a conv shared by two branches is not folded),
        registered under one name, with no parameter or buffer shared with another module (tied
        weights), read by no other node of the graph (get_attr) and without forward hooks;
      - the BN keeps running statistics (without them it normalises each batch in eval too).
    The BN after the layer only: a BN before a layer is not folded into it (with zero padding
    the shift would be wrong at the borders), nor through a nonlinearity.
    Book: book/derivations/deployment.ipynb
    """
    tracer, graph = _trace(model)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    reads = [n.target for n in graph.nodes if n.op == "get_attr"]
    mods, tensors = _counts(model)

    def free(name):
        return (calls[name] == 1 and _owned_alone(model, name, tracer, mods, tensors)
                and not any(r == name or r.startswith(name + ".") for r in reads))

    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not is_bn(model.get_submodule(node.target)):
            continue
        inputs = list(node.args) + list(node.kwargs.values())
        if len(inputs) != 1 or not isinstance(inputs[0], fx.Node):
            continue
        src = inputs[0]
        if src.op != "call_module" or not is_layer(model.get_submodule(src.target)):
            continue
        bn = model.get_submodule(node.target)
        if bn.running_mean is None or bn.running_var is None:
            continue
        if len(src.users) == 1 and free(src.target) and free(node.target):
            pairs.append((src.target, node.target))
    return pairs


def _replace(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def fold_model(model):
    """A deep copy of model with every pair of foldable_pairs(model) folded: the layer replaced by
    fold_into(layer, bn), the BN by nn.Identity. model is left unchanged; the copy's eval
    outputs equal model's (up to rounding); model must be in eval mode (a BN in training mode is
    an error). What is folded: see foldable_pairs. A model torch.fx cannot trace is refused
    (fold its traceable parts). A model that is itself a layer or a BN is returned as a copy.
    Book: book/derivations/deployment.ipynb
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    folded = copy.deepcopy(model)
    if is_layer(folded) or is_bn(folded):
        return folded
    for layer_name, bn_name in foldable_pairs(folded):
        layer, bn = folded.get_submodule(layer_name), folded.get_submodule(bn_name)
        try:
            new = fold_into(layer, bn)
        except (TypeError, ValueError) as err:
            hint = (" (call model.eval() first)"
                    if isinstance(bn, _BatchNorm) and bn.training else "")
            raise type(err)(f"fold_model: {layer_name} -> {bn_name}: {err}{hint}") from err
        _replace(folded, layer_name, new)
        _replace(folded, bn_name, nn.Identity())
    return folded
