"""Plain Flax Linen models: no quantization, no mutable state, only standard layers.

    from experiments.models import get_model, MODEL_NAMES
    model = get_model('cnn1d', num_classes=10)
    params = model.init(key, x)['params']
    logits = model.apply({'params': params}, x)

Weights live only in nn.Dense / nn.DenseGeneral / nn.Conv / nn.Embed / nn.LayerNorm /
nn.GroupNorm, under readable '/'-joined paths (e.g. `block_0/attn/query`), so rules can
match them and quantization can intercept them from outside.
"""

from experiments.models.classifiers import CNN1D, MLP
from experiments.models.registry import MODEL_NAMES, get_model, model_fields
from experiments.models.resnet import BasicBlock, ResNet, ResNetStage
from experiments.models.transformer import BERT, GPT, FeedForward, SelfAttention, TransformerBlock

__all__ = [
    "BERT",
    "BasicBlock",
    "CNN1D",
    "FeedForward",
    "GPT",
    "MLP",
    "MODEL_NAMES",
    "ResNet",
    "ResNetStage",
    "SelfAttention",
    "TransformerBlock",
    "get_model",
    "model_fields",
]
