"""Custom layers from d2l's "Custom Layers", for jobs that name them through `target`."""

import torch
from torch import nn
from torch.nn import functional as F


class CenteredLayer(nn.Module):
    """Subtracts the mean: a layer without parameters."""

    def forward(self, X):
        return X - X.mean()


class MyLinear(nn.Module):
    """A fully connected layer with its own weight and bias, followed by ReLU."""

    def __init__(self, in_units, units):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_units, units))
        self.bias = nn.Parameter(torch.randn(units))

    def forward(self, X):
        # d2l reads self.weight.data here; that detaches the weights, which then never learn.
        return F.relu(torch.matmul(X, self.weight) + self.bias)


def centered_mlp(in_features=20, hidden=64, classes=10):
    """MyLinear -> CenteredLayer -> Linear: the custom layers in one small network."""
    return nn.Sequential(MyLinear(in_features, hidden), CenteredLayer(), nn.Linear(hidden, classes))
