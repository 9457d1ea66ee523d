"""Packed kernels vs a per-bag Python loop vs padding to the longest bag, forward + backward.

Run from the repository root:

    .venv/bin/python benchmarks/kernels.py                    # 100k tiles in 16 bags, D = 512
    .venv/bin/python benchmarks/kernels.py --bags 1024        # many small bags
    .venv/bin/python benchmarks/kernels.py --json out.json    # also write the numbers as JSON

Every case runs forward and backward (a weighted sum of the outputs, so every gradient is
non-trivial) and reports the median wall time over `--repeats` runs after one warm-up run.
Packed, loop and memory floor take turns within each repeat; the padded form runs afterwards.

The three forms compute the same result (checked before timing):

- packed: the `mil.kernels` call on the whole pack.
- loop: a Python loop over the bags of `torch.split` (one backward node for all bags, unlike
  slicing each bag, whose backward writes a full-size gradient per bag), each bag with plain
  torch calls (softmax, matmul, mean, amax).
- padded: bags padded to the longest one, [B, L_max, ...] with a mask. The time covers the
  model-side computation on the padded tensor, not building it.

Bag lengths are uneven: log-normal draws (sigma 1) scaled to sum to `--tiles`, seeded.

The pooling cases also report a memory floor: the time of the memory traffic that any form of
the computation needs, whatever its loop structure. Attention pooling and max read the [T, D]
values in the forward, read them again and write their gradient, a new tensor, in the
backward. The mean reads them once and writes the gradient. `loop / floor` is therefore the
largest speed-up over the loop that any packed kernel could reach on this machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mil.kernels import (  # noqa: E402
    Segments,
    attention,
    nystrom_attention,
    segment_attention_pool,
    segment_reduce,
)


@dataclass
class CaseResult:
    """Median forward + backward times of one case, in milliseconds (None = not run)."""

    case: str
    packed_ms: float
    loop_ms: float | None
    padded_ms: float | None
    floor_ms: float | None = None

    @property
    def loop_ratio(self) -> float | None:
        return None if self.loop_ms is None else self.loop_ms / self.packed_ms

    @property
    def floor_ratio(self) -> float | None:
        if self.loop_ms is None or self.floor_ms is None:
            return None
        return self.loop_ms / self.floor_ms

    @property
    def padded_ratio(self) -> float | None:
        return None if self.padded_ms is None else self.padded_ms / self.packed_ms


def bag_lengths(total: int, bags: int, seed: int) -> list[int]:
    """Uneven bag lengths (log-normal, sigma 1) that sum to `total`, each >= 1."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.exp(torch.randn(bags, generator=generator, dtype=torch.float64))
    lengths = [max(1, int(x)) for x in (draws / draws.sum() * total).floor().tolist()]
    lengths[int(torch.tensor(lengths).argmax())] += total - sum(lengths)
    return lengths


def measure(
    case: str,
    repeats: int,
    packed: Callable[[], None],
    loop: Callable[[], None] | None = None,
    padded: Callable[[], None] | None = None,
    floor: Callable[[], None] | None = None,
) -> CaseResult:
    """Median wall times in milliseconds, after one warm-up call of each form.

    Packed, loop and floor take turns within every repeat, so a change in machine load during
    the run touches them alike and their ratios stay comparable. The padded form runs in its own
    block afterwards: its tensors are many times larger, and freeing them between turns slowed
    the next form's allocations by up to 3x.
    """
    steps = {"packed": packed, "loop": loop, "floor": floor}
    active = {name: step for name, step in steps.items() if step is not None}
    times: dict[str, list[float]] = {name: [] for name in active}
    for step in active.values():
        step()
    for _ in range(repeats):
        for name, step in active.items():
            times[name].append(_elapsed_ms(step))
    if padded is not None:
        padded()
        times["padded"] = [_elapsed_ms(padded) for _ in range(repeats)]
    medians = {name: statistics.median(values) for name, values in times.items()}
    return CaseResult(case=case, packed_ms=medians["packed"], loop_ms=medians.get("loop"),
                      padded_ms=medians.get("padded"), floor_ms=medians.get("floor"))


def _elapsed_ms(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e3


def forward_backward(
    compute: Callable[[], torch.Tensor], inputs: list[torch.Tensor], weight: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        for tensor in inputs:
            tensor.grad = None
        (compute() * weight).sum().backward()

    return step


def memory_floor(total: int, dim: int, reads: int) -> Callable[[], None]:
    """Return a step that reads a [total, dim] float32 tensor `reads` (>= 1) times and writes
    a new tensor of that size.

    The write goes to a newly allocated tensor, as a gradient does: on Linux the first touch of
    a large allocation costs page faults that a reused buffer would not pay.
    """
    values = torch.randn(total, dim)

    def step() -> None:
        for _ in range(reads - 1):
            values.sum(0)
        torch.mul(values, 2.0)  # the last read and the one write

    return step


def pad(tensor: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, ...] packed rows -> ([B, L_max, ...] zero-padded, bool [B, L_max] valid mask)."""
    parts = torch.split(tensor, lengths)
    padded = torch.nn.utils.rnn.pad_sequence(list(parts), batch_first=True)
    width = padded.shape[1]
    mask = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return padded.detach().clone().requires_grad_(tensor.requires_grad), mask


def check_close(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    if not torch.allclose(got, expected, atol=1e-3, rtol=1e-3):
        difference = (got - expected).abs().max().item()
        raise SystemExit(f"{name}: packed and per-bag results differ (max abs {difference:.3g})")


def bench_attention_pool(lengths: list[int], dim: int, branches: int, repeats: int) -> CaseResult:
    """ABMIL (K = 1) or multi-branch (K > 1) attention pooling of precomputed scores."""
    segments = Segments.from_lengths(lengths)
    total = sum(lengths)
    values = torch.randn(total, dim, requires_grad=True)
    scores = torch.randn(total, branches, requires_grad=True)
    weight = torch.randn(len(lengths), branches, dim)

    def packed() -> torch.Tensor:
        return segment_attention_pool(values, scores, segments)[0]

    def loop() -> torch.Tensor:
        pooled = []
        bags = zip(torch.split(values, lengths), torch.split(scores, lengths), strict=True)
        for bag_values, bag_scores in bags:
            attention_weights = torch.softmax(bag_scores, dim=0)  # [n, K]
            pooled.append(attention_weights.T @ bag_values)  # [K, D]
        return torch.stack(pooled)

    padded_values, mask = pad(values, lengths)
    padded_scores, _ = pad(scores, lengths)

    def padded() -> torch.Tensor:
        masked = padded_scores.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        attention_weights = torch.softmax(masked, dim=1)  # [B, L, K]
        return attention_weights.transpose(1, 2) @ padded_values  # [B, K, D]

    check_close("attention pool", packed(), loop())
    return measure(
        f"attention pool K={branches}", repeats,
        packed=forward_backward(packed, [values, scores], weight),
        loop=forward_backward(loop, [values, scores], weight),
        padded=forward_backward(padded, [padded_values, padded_scores], weight),
        floor=memory_floor(total, dim, 2),
    )


def bench_reduce(lengths: list[int], dim: int, reduce: str, repeats: int) -> CaseResult:
    segments = Segments.from_lengths(lengths)
    values = torch.randn(sum(lengths), dim, requires_grad=True)
    weight = torch.randn(len(lengths), dim)

    def packed() -> torch.Tensor:
        return segment_reduce(values, segments, reduce=reduce)  # type: ignore[arg-type]

    def loop() -> torch.Tensor:
        bags = torch.split(values, lengths)
        if reduce == "mean":
            return torch.stack([bag.mean(0) for bag in bags])
        return torch.stack([bag.amax(0) for bag in bags])

    padded_values, mask = pad(values, lengths)

    def padded() -> torch.Tensor:
        if reduce == "mean":
            counts = mask.sum(1, keepdim=True).to(padded_values.dtype)
            return padded_values.sum(1) / counts
        return padded_values.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)

    check_close(f"segment_reduce {reduce}", packed(), loop())
    return measure(
        f"segment_reduce {reduce}", repeats,
        packed=forward_backward(packed, [values], weight),
        loop=forward_backward(loop, [values], weight),
        padded=forward_backward(padded, [padded_values], weight),
        floor=memory_floor(sum(lengths), dim, 1 if reduce == "mean" else 2),
    )


def bench_softmax_attention(
    lengths: list[int], heads: int, head_dim: int, repeats: int
) -> CaseResult:
    """Self-attention within bags: the reference backend is itself a per-bag SDPA loop, so the
    'loop' column is left empty and the comparison is against padding with a key mask."""
    segments = Segments.from_lengths(lengths)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, requires_grad=True) for _ in range(3))
    weight = torch.randn(total, heads, head_dim)

    def packed() -> torch.Tensor:
        return attention(q, k, v, segments)

    padded_qkv = [pad(x, lengths)[0] for x in (q, k, v)]
    _, mask = pad(q, lengths)
    padded_weight, _ = pad(weight, lengths)

    def padded() -> torch.Tensor:
        pq, pk, pv = (x.transpose(1, 2) for x in padded_qkv)  # [B, H, L, Dh]
        out = F.scaled_dot_product_attention(pq, pk, pv, attn_mask=mask[:, None, None, :])
        return out.transpose(1, 2)  # [B, L, H, Dh]

    return measure(
        f"softmax attention H={heads} Dh={head_dim}", repeats,
        packed=forward_backward(packed, [q, k, v], weight),
        padded=forward_backward(padded, padded_qkv, padded_weight),
    )


def bench_nystrom(
    lengths: list[int], heads: int, head_dim: int, landmarks: int, repeats: int
) -> CaseResult:
    """Packed Nyström attention vs calling it on one bag at a time."""
    segments = Segments.from_lengths(lengths)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, requires_grad=True) for _ in range(3))
    weight = torch.randn(total, heads, head_dim)
    single_bags = [Segments.from_lengths([n]) for n in lengths]

    def packed() -> torch.Tensor:
        return nystrom_attention(q, k, v, segments, num_landmarks=landmarks)

    def loop() -> torch.Tensor:
        outputs = []
        for start, n, bag in zip(segments.starts, lengths, single_bags, strict=True):
            rows = slice(start, start + n)
            outputs.append(nystrom_attention(q[rows], k[rows], v[rows], bag, landmarks))
        return torch.cat(outputs)

    check_close("nystrom", packed(), loop())
    return measure(
        f"nystrom attention m={landmarks}", repeats,
        packed=forward_backward(packed, [q, k, v], weight),
        loop=forward_backward(loop, [q, k, v], weight),
    )


def format_table(results: list[CaseResult]) -> str:
    def cell(value: float | None, digits: int = 1, suffix: str = "") -> str:
        return "n/a" if value is None else f"{value:.{digits}f}{suffix}"

    lines = [
        "| case | packed ms | per-bag loop ms | padded ms | memory floor ms | loop / packed "
        "| padded / packed | loop / floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.case} | {cell(r.packed_ms)} | {cell(r.loop_ms)} | {cell(r.padded_ms)} | "
            f"{cell(r.floor_ms)} | {cell(r.loop_ratio, 2, 'x')} | "
            f"{cell(r.padded_ratio, 2, 'x')} | {cell(r.floor_ratio, 2, 'x')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=100_000, help="tiles in the pack")
    parser.add_argument("--bags", type=int, default=16, help="bags in the pack")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension D")
    parser.add_argument("--branches", type=int, default=3, help="K of the multi-branch case")
    parser.add_argument(
        "--attention-tiles",
        type=int,
        default=4096,
        help="tiles for the sequence-attention cases (full attention is quadratic per bag)",
    )
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--landmarks", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--skip-pooling", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    lengths = bag_lengths(args.tiles, args.bags, args.seed)
    padded_rows = len(lengths) * max(lengths)

    results = []
    if not args.skip_pooling:
        results += [
            bench_attention_pool(lengths, args.dim, 1, args.repeats),
            bench_attention_pool(lengths, args.dim, args.branches, args.repeats),
            bench_reduce(lengths, args.dim, "mean", args.repeats),
            bench_reduce(lengths, args.dim, "max", args.repeats),
        ]
    attention_lengths: list[int] = []
    if not args.skip_attention:
        attention_lengths = bag_lengths(args.attention_tiles, args.bags, args.seed)
        results.append(
            bench_softmax_attention(attention_lengths, args.heads, args.head_dim, args.repeats)
        )
        results.append(
            bench_nystrom(
                attention_lengths, args.heads, args.head_dim, args.landmarks, args.repeats
            )
        )

    header = {
        "command": "python " + " ".join(sys.argv),
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "pooling_pack": f"{args.tiles} tiles in {args.bags} bags, D={args.dim}, "
        f"longest bag {max(lengths)}, padded rows {padded_rows} "
        f"({padded_rows / args.tiles:.2f}x the tiles)",
        "attention_pack": (
            f"{args.attention_tiles} tiles in {args.bags} bags, longest {max(attention_lengths)}"
            if attention_lengths
            else "skipped"
        ),
    }
    for key, value in header.items():
        print(f"- {key}: {value}")
    print()
    print(format_table(results))
    if args.json is not None:
        rows = [
            asdict(r)
            | {"loop_ratio": r.loop_ratio, "padded_ratio": r.padded_ratio,
               "floor_ratio": r.floor_ratio}
            for r in results
        ]
        args.json.write_text(json.dumps({"header": header, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
