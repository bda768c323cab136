"""Deployment: BN folded into the Linear/Conv before it, for inference.

fold_into(layer, bn) returns one layer computing bn(layer(x)) with bn in eval mode;
fold_model(model) folds every such pair of a model that torch.fx can trace (foldable_pairs says
which); folded_weights is the algebra on plain tensors. The algebra and its checks live in
bnlib/fold.py, the graph analysis in bnlib/fold_graph.py.
Book: book/derivations/deployment.ipynb
"""
from bnlib.fold import fold_into, folded_weights
from bnlib.fold_graph import fold_model, foldable_pairs

__all__ = ["fold_into", "fold_model", "foldable_pairs", "folded_weights"]
