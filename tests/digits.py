"""Small models trained on scikit-learn's digits (8×8 grayscale, 10 classes): real data with a
real accuracy, small enough to train on 2 CPU cores in seconds. A 4-block ViT, and a small ResNet
(a 3×3 stem, two torchvision BasicBlocks of 32 and 64 channels, the second at stride 2 with its
downsample branch, average pool, linear head) for the CNN methods.

Three of each, trained from seeds 0, 1 and 2 (initialization and batch order; the train / test
split is the same), ship in tests/data/ so that every machine tests the same weights: training
itself rounds differently on every CPU and thread count, and claims about methods are asserted on
the mean over the three. Reproduce them with

    python -m tests.digits            (writes tests/data/digits_{vit,cnn}_seed{0,1,2}.safetensors)

tests/conftest.py exposes them as the `digits_vit` (seed 0), `digits_vits` and `digits_cnns` (all
three) fixtures.
"""

import dataclasses
import functools
from pathlib import Path

import torch

SEEDS = (0, 1, 2)
DATA = Path(__file__).resolve().parent / "data"
SPLIT = 1400


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


def _data():
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(0))
    return _images(digits.data)[order], torch.tensor(digits.target)[order]


def _architecture():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4,
                             num_heads=4, mlp_ratio=2.0)


class DigitsResNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1, bias=False), torch.nn.BatchNorm2d(32),
                                        torch.nn.ReLU(inplace=True))
        downsample = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 1, stride=2, bias=False), torch.nn.BatchNorm2d(64))
        self.blocks = torch.nn.Sequential(BasicBlock(32, 32), BasicBlock(32, 64, stride=2, downsample=downsample))
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


_ARCHITECTURES = {"vit": _architecture, "cnn": DigitsResNet}


def train(seed: int, kind: str = "vit") -> torch.nn.Module:
    """The training recipe behind the shipped weights: 25 epochs of AdamW with a one-cycle schedule."""
    x, y = _data()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _ARCHITECTURES[kind]()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    epochs, batch = 25, 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=epochs * (SPLIT // batch + 1))
    model.train()
    for _ in range(epochs):
        permutation = torch.randperm(SPLIT, generator=generator)
        for start in range(0, SPLIT, batch):
            index = permutation[start:start + batch]
            loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def weights_path(seed: int, kind: str = "vit") -> Path:
    return DATA / f"digits_{kind}_seed{seed}.safetensors"


@functools.lru_cache(maxsize=None)
def digits_vit(seed: int = 0, kind: str = "vit") -> DigitsViT:
    """The shipped model of `kind` ("vit" or "cnn") and `seed` with the digits split it was
    trained on."""
    from safetensors.torch import load_file

    x, y = _data()
    model = _ARCHITECTURES[kind]()
    model.load_state_dict(load_file(str(weights_path(seed, kind))))
    return DigitsViT(model.eval(), x[:SPLIT], y[:SPLIT], x[SPLIT:], y[SPLIT:])


def main(kinds=("vit", "cnn")) -> None:
    from safetensors.torch import save_file

    DATA.mkdir(exist_ok=True)
    for kind in kinds:
        for seed in SEEDS:
            model = train(seed, kind)
            path = weights_path(seed, kind)
            save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(path))
            x, y = _data()
            with torch.no_grad():
                accuracy = float((model(x[SPLIT:]).argmax(dim=1) == y[SPLIT:]).float().mean())
            print(f"{kind} seed {seed}: test accuracy {accuracy:.4f} -> {path}")


if __name__ == "__main__":
    import sys

    torch.set_num_threads(2)
    main(tuple(sys.argv[1:]) or ("vit", "cnn"))
