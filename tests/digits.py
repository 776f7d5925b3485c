"""A small vision transformer trained on scikit-learn's digits (8×8 grayscale, 10 classes): real
data with a real accuracy, small enough to train on 2 CPU cores in seconds. Built once per test
session (tests/conftest.py exposes it as the `digits_vit` fixture)."""

import dataclasses
import functools

import torch


@dataclasses.dataclass
class DigitsViT:
    model: torch.nn.Module
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def calibration_batches(self, count: int = 8, size: int = 64):
        return [self.train_x[i * size:(i + 1) * size] for i in range(count)]

    @torch.no_grad()
    def accuracy(self, model) -> float:
        return float((model(self.test_x).argmax(dim=1) == self.test_y).float().mean())


def _images(data):
    return torch.tensor(data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0 - 0.5


@functools.lru_cache(maxsize=1)
def digits_vit() -> DigitsViT:
    from sklearn.datasets import load_digits
    from timm.models.vision_transformer import VisionTransformer

    digits = load_digits()
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(digits.target), generator=generator)
    x, y = _images(digits.data)[order], torch.tensor(digits.target)[order]
    split = 1400
    torch.manual_seed(0)
    model = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4,
                              num_heads=4, mlp_ratio=2.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    epochs, batch = 25, 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=epochs * (split // batch + 1))
    model.train()
    for _ in range(epochs):
        permutation = torch.randperm(split, generator=generator)
        for start in range(0, split, batch):
            index = permutation[start:start + batch]
            loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return DigitsViT(model, x[:split], y[:split], x[split:], y[split:])
