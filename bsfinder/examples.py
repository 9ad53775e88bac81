"""Small models to try bsfinder on: ``bsfinder probe bsfinder.examples:SmallCNN --input 3x64x64``.

The ``transformers`` factories build models from a config (no download); they need the
``hf`` extra (``pip install 'bsfinder[hf]'``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["MLP", "SmallCNN", "bert", "gpt2", "resnet"]


class SmallCNN(nn.Module):
    """A VGG-style image classifier: three conv blocks, global pooling, a linear head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(
            block(in_channels, width), block(width, width * 2), block(width * 2, width * 4)
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width * 4, num_classes)
        )

    def forward(self, x: Any) -> Any:
        return self.head(self.features(x))


class MLP(nn.Module):
    """A plain multilayer perceptron; its memory is easy to compute by hand."""

    def __init__(
        self, in_features: int = 1024, hidden: int = 4096, depth: int = 2, out_features: int = 10
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Any) -> Any:
        return self.net(x)


def gpt2(
    n_layer: int = 2,
    n_embd: int = 128,
    n_head: int = 4,
    vocab_size: int = 1000,
    n_positions: int = 256,
) -> nn.Module:
    """A small GPT-2 language model from a ``transformers`` config (random weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
        n_positions=n_positions, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def bert(
    num_hidden_layers: int = 2,
    hidden_size: int = 128,
    num_attention_heads: int = 4,
    vocab_size: int = 1000,
) -> nn.Module:
    """A small BERT masked-LM from a ``transformers`` config (random weights)."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        num_hidden_layers=num_hidden_layers, hidden_size=hidden_size,
        num_attention_heads=num_attention_heads, intermediate_size=4 * hidden_size,
        vocab_size=vocab_size,
    )  # fmt: skip
    return BertForMaskedLM(config)


def resnet(
    embedding_size: int = 32,
    hidden_sizes: tuple[int, ...] = (32, 64, 128, 256),
    depths: tuple[int, ...] = (1, 1, 1, 1),
    layer_type: str = "basic",
    num_labels: int = 10,
) -> nn.Module:
    """A small ResNet image classifier from a ``transformers`` config (random weights).

    Inputs: ``pixel_values=3xHxW`` and ``labels=1:int64:NUM_LABELS`` (then it computes its
    own cross-entropy loss).
    """
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        embedding_size=embedding_size, hidden_sizes=list(hidden_sizes), depths=list(depths),
        layer_type=layer_type,
    )  # fmt: skip
    config.num_labels = num_labels
    return ResNetForImageClassification(config)
