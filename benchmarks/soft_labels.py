"""Where a distilled set's soft labels put their probability, per class (head to tail).

    python benchmarks/soft_labels.py runs/reproduce/lad-cifar10lt-cpu/if10-lad-init-<hash> runs/reproduce/lad-cifar10lt-cpu/if10-lad-<hash>

For every distilled set (a folder or a distilled.safetensors): "own" = the mean probability a class's images give
their own class (label confidence), "mass" = the total probability all images give a class, divided by IPC (1.0 =
a balanced share). Comparing a method's initial set (``<method>-init`` cells of ``ltdd reproduce``, whose sets are
in ``<work>/<cell>-<key hash>``) with the distilled one shows whether distillation moved the labels toward the head or
the tail.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ltdd.errors import LtddError
from ltdd.synset import SyntheticSet


def label_profile(syn: SyntheticSet) -> tuple[list[float], list[float]]:
    """(own-class probability per class, probability mass per class / IPC)."""
    if syn.soft_labels is None:
        raise LtddError("this set has hard labels only")
    p = syn.soft_labels.float().softmax(1)
    classes = p.shape[1]
    own = p[torch.arange(len(p)), syn.labels]
    ipc = len(p) / classes
    return ([own[syn.labels == c].mean().item() for c in range(classes)],
            [p[:, c].sum().item() / ipc for c in range(classes)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sets", nargs="+")
    args = ap.parse_args(argv)
    for path in args.sets:
        try:
            own, mass = label_profile(SyntheticSet.load(path))
        except LtddError as e:
            print(f"{path}: {e}", file=sys.stderr)
            return 2
        print(path)
        print("  own  " + " ".join(f"{v:5.2f}" for v in own))
        print("  mass " + " ".join(f"{v:5.2f}" for v in mass))
    return 0


if __name__ == "__main__":
    sys.exit(main())
