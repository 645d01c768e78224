"""What the model step benchmarks share: where they run, on how many CPU threads, seed 0.

    p = argparse.ArgumentParser(); ...; add_device_options(p)
    a = p.parse_args(); device = start(a)
"""
from __future__ import annotations

import argparse

import torch


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--threads`` (torch.set_num_threads on CPU, 0: torch's default) and ``--device``."""
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads on CPU (0: default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def start(args: argparse.Namespace) -> torch.device:
    """The device of ``args``, its CPU thread count set, torch seeded with 0."""
    device = torch.device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return device
