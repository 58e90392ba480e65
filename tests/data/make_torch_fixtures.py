"""Writes the genuine torch checkpoints used by tests/test_inception.py.

Run with torch installed (any version with both formats; made with 2.13.0):
  python tests/data/make_torch_fixtures.py
The tests do not need torch: they rebuild the expected values with numpy
(`expected_fixture_tensors` in tests/test_inception.py mirrors this file).
"""

import collections
import os

import torch


def tensors():
  a = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 4
  return collections.OrderedDict([
      ("layer.conv.weight", a),
      ("layer.conv.weight_t", a.t()),  # non-contiguous view of a's storage
      ("layer.slice", a[1:, 1:3]),  # view with a storage offset
      ("half", torch.linspace(-1, 1, 5, dtype=torch.float16)),
      ("bf16", torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)),
      ("long", torch.tensor([[1, -2], [3, 2**40]], dtype=torch.int64)),
      ("uint8", torch.arange(4, dtype=torch.uint8)),
      ("flag", torch.tensor([True, False])),
      ("scalar", torch.tensor(7.5, dtype=torch.float64)),
      ("bn.num_batches_tracked", torch.tensor(3)),
  ])


def main():
  here = os.path.dirname(os.path.abspath(__file__))
  ckpt = {"model": tensors(), "step": 5, "name": "fixture"}
  torch.save(ckpt, os.path.join(here, "torch_zip.pth"))
  torch.save(ckpt, os.path.join(here, "torch_legacy.pth"),
             _use_new_zipfile_serialization=False)


if __name__ == "__main__":
  main()
