"""Helpers shared by model-level tests."""
import torch
import torch.nn.functional as F


def loss_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Next-token cross-entropy of ``model`` on token rows ``x`` and every parameter's
    gradient, flattened into one fp32 vector (the model's gradients are zeroed first)."""
    model.zero_grad()
    loss = F.cross_entropy(model(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    return loss.item(), torch.cat([p.grad.float().flatten() for p in model.parameters()])
