"""Tiny specs for the search tests (written to tmp folders by the tests)."""

from __future__ import annotations

import os

SMALL = """// a smaller copy of examples/digits_tiny.vit for fast search tests
backbone vit_tiny_patch16_224 {
  weights = none
  image = 16
  patch = 4
  channels = 1
  classes = 10
  embed_dim = 32
  depth = 2
  heads = 2
}

blocks all {
  attention: one of {skip, conv1x1, conv3x3, msa}
  ffn: per neuron
}

budget { flops <= 50% }

search spvit {
  data = digits
  epochs = 2
  batch_size = 128
  lr = 1e-3
  gate_lr = 2e-2
}
"""


def write_spec(folder: str, text: str = SMALL, name: str = "small.vit") -> str:
    path = os.path.join(str(folder), name)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path
