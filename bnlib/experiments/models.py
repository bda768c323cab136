"""Model builders shared by the experiments: a fully connected net with optional (noisy) BN."""
import contextlib
import math

import torch
from torch import nn

from bnlib.nn import BatchNorm1d


def _identity(x):
    return x


ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "linear": _identity}
NORMS = (None, "bn", "noisy_bn")


class NoisyBatchNorm1d(nn.Module):
    """BatchNorm1d followed, in training, by noise whose mean and variance change at every step.

    At each call (one training step) every unit draws a new noise distribution: a scale s from
    [1/scale, scale] (log-uniform), a mean c from [-shift, shift] and a spread d from
    [0, spread]. Each activation of the batch then becomes s * bn(x) + n, n ~ N(c, d^2).
    So the next layer sees inputs whose mean and variance drift from step to step, which is
    the "noisy BN" of Santurkar et al. (2018). In eval mode the layer is plain BN.
    """

    def __init__(self, num_features, shift=1.0, scale=2.0, spread=0.5, **bn_kwargs):
        super().__init__()
        if shift < 0 or scale < 1 or spread < 0:
            raise ValueError(f"need shift >= 0, scale >= 1, spread >= 0; got shift={shift!r}, "
                             f"scale={scale!r}, spread={spread!r}")
        self.bn = BatchNorm1d(num_features, **bn_kwargs)
        self.shift, self.scale, self.spread = float(shift), float(scale), float(spread)
        self.hold = False   # True: reuse the last noise draw (to compare two gradients fairly)
        self._noise = None

    def draw(self, y):
        """One step's noise: (multiplier, additive term), each shaped like y."""
        c = y.shape[1]
        u = torch.rand(3, c, device=y.device, dtype=y.dtype)
        s = torch.exp((2 * u[0] - 1) * math.log(self.scale))
        mean = (2 * u[1] - 1) * self.shift
        sd = u[2] * self.spread
        return s.expand_as(y), mean + sd * torch.randn_like(y)

    def forward(self, x):
        y = self.bn(x)
        if not self.training:
            return y
        if not (self.hold and self._noise is not None and self._noise[1].shape == y.shape):
            self._noise = self.draw(y)
        mul, add = self._noise
        return y * mul + add


@contextlib.contextmanager
def held_noise(model):
    """Within the block every NoisyBatchNorm1d of model reuses its current noise draw."""
    layers = [m for m in model.modules() if isinstance(m, NoisyBatchNorm1d)]
    for m in layers:
        m.hold = True
    try:
        yield
    finally:
        for m in layers:
            m.hold = False


class MLP(nn.Module):
    """Linear -> [BN | noisy BN] -> activation, per hidden layer; then a linear read-out.

    Weights: PyTorch's default init; or, with init_std, N(0, init_std^2) for every Linear once
    all are built (biases zero), the same numbers for every architecture of the same widths
    under the same global seed; or, with he_scale, each Linear right after it is built gets
    N(0, (he_scale * gain)^2 / fan_in), gain sqrt(2) for ReLU and 1 otherwise (the read-out
    gain 1; biases zero), drawn from the global generator.
    """

    def __init__(self, in_features, widths, out_features, activation="sigmoid", norm=None,
                 init_std=None, noise=None, he_scale=None, momentum=0.1):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if any(int(w) != w or w < 1 for w in widths):
            raise ValueError(f"widths must be positive integers, got {list(widths)!r}")
        if init_std is not None and not init_std > 0:
            raise ValueError(f"init_std must be positive or None, got {init_std!r}")
        if he_scale is not None and not he_scale > 0:
            raise ValueError(f"he_scale must be positive or None, got {he_scale!r}")
        if init_std is not None and he_scale is not None:
            raise ValueError("give init_std or he_scale, not both")
        # init_std weights come from their own generator, seeded by the first draw from the global
        # one: networks built from the same global seed get the same weights whatever their
        # architecture draws on the way (a Linear with a bias draws more than one without).
        init_gen = (torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
                    if init_std is not None else None)
        self.activation, self.norm = activation, norm
        self.act = ACTIVATIONS[activation]
        gain = math.sqrt(2.0) if activation == "relu" else 1.0
        blocks, prev = [], in_features
        for w in widths:
            # With BN the layer's bias is cancelled by the mean subtraction: leave it out.
            layers = [nn.Linear(prev, w, bias=norm is None)]
            if he_scale is not None:
                _normal_init(layers[0], he_scale * gain / math.sqrt(prev))
            if norm == "bn":
                layers.append(BatchNorm1d(w, momentum=momentum))
            elif norm == "noisy_bn":
                layers.append(NoisyBatchNorm1d(w, **{"momentum": momentum, **(noise or {})}))
            blocks.append(nn.Sequential(*layers))
            prev = w
        self.hidden = nn.ModuleList(blocks)
        self.out = nn.Linear(prev, out_features)
        if he_scale is not None:
            _normal_init(self.out, he_scale / math.sqrt(prev))
        if init_std is not None:
            for lin in self.linears():
                _normal_init(lin, init_std, init_gen)

    def linears(self):
        """The Linear layers, input to output."""
        return [b[0] for b in self.hidden] + [self.out]

    def layers(self):
        """The forward pass as a flat list: per hidden layer Linear, [norm], activation; the read-out."""
        return [f for b in self.hidden for f in (*b, self.act)] + [self.out]

    def forward(self, x, keep_preacts=False):
        """Logits; with keep_preacts, also the list of each hidden layer's activation input."""
        preacts = []
        for block in self.hidden:
            z = block(x)
            preacts.append(z)
            x = self.act(z)
        logits = self.out(x)
        return (logits, preacts) if keep_preacts else logits


def _normal_init(lin, std, generator=None):
    nn.init.normal_(lin.weight, 0.0, std, generator=generator)
    if lin.bias is not None:
        nn.init.zeros_(lin.bias)


def mlp(in_features, widths, out_features, activation="sigmoid", norm=None, init_std=None,
        noise=None, he_scale=None, momentum=0.1):
    """Build an MLP; norm is None, "bn" or "noisy_bn" (noise: NoisyBatchNorm1d settings)."""
    return MLP(in_features, widths, out_features, activation, norm, init_std, noise, he_scale,
               momentum)


def bn_layers(model):
    """The BatchNorm modules of a model, input to output."""
    return [m for m in model.modules() if isinstance(m, (BatchNorm1d, nn.BatchNorm1d))]


def hidden_linears(model):
    """The Linear layers before the read-out, input to output."""
    return model.linears()[:-1]
