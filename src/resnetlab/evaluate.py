"""Evaluation: class scores of a dataset and top-k errors."""

from __future__ import annotations

import torch
from torch import nn

from resnetlab.data.augment import Normalize
from resnetlab.data.batches import evaluation_batches
from resnetlab.data.formats import ArrayDataset, FolderDataset
from resnetlab.precision import autocast


@torch.no_grad()
def class_probabilities(model: nn.Module, data: ArrayDataset | FolderDataset, normalize: Normalize, *,
                        device: torch.device, batch_size: int = 500, precision: str = "fp32",
                        memory_format: torch.memory_format = torch.contiguous_format, workers: int = 0,
                        limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax scores (N, classes) of the un-augmented images, in eval mode, and their labels."""
    was_training = model.training
    model.eval()
    scores, labels = [], []
    try:
        for images, batch_labels in evaluation_batches(data, batch_size, workers, limit):
            x = normalize(images.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
            with autocast(device, precision):
                logits = model(x)
            scores.append(logits.float().softmax(1).cpu())
            labels.append(batch_labels)
    finally:
        model.train(was_training)
    return torch.cat(scores), torch.cat(labels)


def top_k_error(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of images whose label is not among the k highest scores (k is capped at the number of classes)."""
    k = min(k, scores.shape[1])
    hits = (scores.topk(k, dim=1).indices == labels[:, None]).any(1)
    return 1.0 - hits.float().mean().item()
