"""FrozenBatchNorm2d: a BatchNorm2d whose statistics and affine are fixed, for fine-tuning.

Detection libraries (torchvision.ops, Detectron2) fine-tune backbones with batches too small for
useful batch statistics (one or two images per device), so they replace every BN layer by this
module: the per-channel affine of the paper's Algorithm 2, y = gamma (x - mu) / sqrt(var + eps)
+ beta, with gamma, beta, mu and var held as buffers, not parameters, so no optimizer updates
them and train() and eval() give the same output.

Convention (as torchvision.ops.FrozenBatchNorm2d): state_dict keys weight, bias, running_mean,
running_var, all persistent buffers of shape (C,), initialised to 1, 0, 0, 1; no
num_batches_tracked. A BatchNorm2d state_dict loads into it: its num_batches_tracked entry is
dropped, every other key must be there (a BatchNorm2d without affine has no weight and bias: use
from_batchnorm, which supplies 1 and 0). The attribute names (weight, bias, running_mean,
running_var, eps, num_features) are torch BN's, so code that reads a BN layer's statistics reads
this one too.
Book: book/derivations/transform.ipynb
"""
import torch
from torch import nn

from bnlib import functional
from bnlib.checks import check_eps_for, check_num_features


_LAZY = ("a LazyBatchNorm2d that has not seen an input has no statistics to freeze: run one "
         "forward (or load a state_dict) first")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine: y = weight (x - running_mean) /
    sqrt(running_var + eps) + bias per channel, over (N, C, H, W) input, in train and eval alike.
    Gradients flow to the input only. Build one from a trained layer with from_batchnorm(bn), or
    freeze a whole model with bnlib.nn.freeze(model).
    Book: book/derivations/transform.ipynb
    """

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        check_num_features(num_features)
        self.num_features = num_features
        self.eps = check_eps_for(eps, training=False)  # a float >= 0, as BN's eval takes
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def from_batchnorm(cls, bn):
        """A frozen copy of a BatchNorm2d (torch's, bnlib's or a SyncBatchNorm, taken to be over
        (N, C, H, W) input as in detection backbones) as it stands now: its eval-mode output, on
        its device and dtype; later changes to bn do not reach the copy. An affine=False (or bias=False) layer
        gives weight 1 (bias 0). A layer without running statistics is refused: its eval output
        uses each batch's statistics, which no fixed affine reproduces."""
        if isinstance(bn, nn.LazyBatchNorm2d):
            raise ValueError(_LAZY)
        if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            raise TypeError(f"bn must be a BatchNorm2d or SyncBatchNorm, got {type(bn).__name__}")
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"bn has no running statistics (track_running_stats=False): "
                             f"{type(bn).__name__} normalises with batch statistics even in "
                             "eval, so there is nothing to freeze")
        frozen = cls(bn.num_features, bn.eps)
        stats = bn.running_mean
        frozen.to(device=stats.device, dtype=stats.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight)
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias)
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A BatchNorm2d's state_dict carries a batch counter that a frozen layer has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, input):
        if not isinstance(input, torch.Tensor) or input.dim() != 4:
            got = (f"{input.dim()}D (shape {tuple(input.shape)})"
                   if isinstance(input, torch.Tensor) else type(input).__name__)
            raise ValueError(f"input must be 4D (N, C, H, W) for FrozenBatchNorm2d, got {got}")
        if input.shape[1] != self.num_features:
            raise ValueError(f"input has {input.shape[1]} channels on axis 1 (shape "
                             f"{tuple(input.shape)}) but FrozenBatchNorm2d has "
                             f"num_features={self.num_features}")
        # Algorithm 2's affine per channel: bnlib's eval-mode batch_norm with the fixed buffers.
        return functional.batch_norm(input, self.running_mean, self.running_var, self.weight,
                                     self.bias, False, 0.0, self.eps)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"


def freeze(model):
    """Replace every BatchNorm2d (and SyncBatchNorm) in model by FrozenBatchNorm2d.from_batchnorm
    of it, in place, and return the model; a model that is itself such a layer is returned
    frozen (a module cannot replace itself). Layers without running statistics are refused
    (see from_batchnorm), before anything is replaced.
    Book: book/derivations/transform.ipynb
    """
    if isinstance(model, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return FrozenBatchNorm2d.from_batchnorm(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    targets = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
               if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm))]
    for name, m in model.named_modules():  # check all first: a refusal leaves the model as is
        if isinstance(m, nn.LazyBatchNorm2d):
            raise ValueError(f"{name}: {_LAZY}")
    for name, m in targets:
        if m.running_mean is None:
            raise ValueError(f"{name} ({type(m).__name__}) has no running statistics "
                             "(track_running_stats=False): nothing to freeze")
    frozen = {}  # one frozen layer per BN object, so a shared BN stays shared
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if id(m) not in frozen:
            frozen[id(m)] = FrozenBatchNorm2d.from_batchnorm(m)
        setattr(parent, child, frozen[id(m)])
    return model
