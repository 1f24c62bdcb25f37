"""Measure SyntheticScenes throughput: ``python -m mtlfast.data --size 128 --count 200``.

Renders ``count`` samples with all six tasks in this process (or through a DataLoader with
``--workers N``) and prints images/s.
"""

import argparse
import os
import time

import torch

from .collate import collate
from .synthetic import SyntheticScenes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: in-process)")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    ds = SyntheticScenes(num_samples=args.count, size=args.size)
    ds[0]
    start = time.perf_counter()
    if args.workers == 0:
        for i in range(len(ds)):
            ds[i]
    else:
        loader = torch.utils.data.DataLoader(
            ds, batch_size=args.batch, num_workers=args.workers, collate_fn=collate
        )
        for _ in loader:
            pass
    rate = args.count / (time.perf_counter() - start)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{args.size}x{args.size}: {rate:.1f} images/s "
        f"(workers={args.workers}, {os.cpu_count()} CPUs, load average {load:.2f})"
    )


if __name__ == "__main__":
    main()
