"""CUDA checks and bandwidth of the packed kernels (needs a CUDA device).

Run from the repository root on a machine with a GPU:

    .venv/bin/python benchmarks/kernels_gpu.py
    .venv/bin/python benchmarks/kernels_gpu.py --tiles 100000 --dim 1024 --json gpu.json

Part 1 runs every CUDA backend in bfloat16 on a random pack (bag lengths 1, 2, 7, 127, 1000 and
uneven bags up to 4096) and compares it with the float32 reference backend. The checks cover
softmax attention on varlen and flex, routed and block sparse attention on flex, Nyström and
agent attention on both, and the pooling primitives against the CPU. The script prints the max
abs error per check and exits non-zero when one is above its tolerance.

Part 2 times `segment_attention_pool` at N tiles and D features (bfloat16 and float32, forward
and forward + backward) and reports the achieved bandwidth: the bytes the pooling must move at
least (read values and scores, write pooled and weights; backward also reads the gradient and
values and writes the value gradient) divided by the median time. It is compared with the
device's peak bandwidth from its memory clock and bus width (when torch exposes them) and with a
measured device-to-device copy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mil.kernels import (  # noqa: E402
    Segments,
    agent_attention,
    attention,
    nystrom_attention,
    segment_attention_pool,
    segment_reduce,
    segment_topk_mask,
)

CHECK_LENGTHS = [1, 2, 7, 127, 1000, 0, 4096, 333, 2048]


def max_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got.float() - expected.float()).abs().max().item()


def run_checks(heads: int, head_dim: int) -> list[dict[str, Any]]:
    """Every CUDA backend against the float32 reference; returns one row per check."""
    segments = Segments.from_lengths(CHECK_LENGTHS, total=sum(CHECK_LENGTHS) + 64).to("cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(segments.total, heads, head_dim, device="cuda", generator=generator)
        for _ in range(3)
    )
    hq, hk, hv = (x.bfloat16() for x in (q, k, v))
    # The reference runs in float32 on the bfloat16-rounded inputs, so only the backend differs.
    q, k, v = (x.float() for x in (hq, hk, hv))
    rows: list[dict[str, Any]] = []

    def check(
        name: str, compute: Callable[[], torch.Tensor], expected: torch.Tensor, tolerance: float
    ) -> None:
        try:
            error = max_error(compute(), expected)
        except Exception as err:  # report every failing backend, then go on with the rest
            rows.append({"check": name, "max_abs_error": None, "ok": False, "error": repr(err)})
            return
        rows.append({"check": name, "max_abs_error": error, "ok": error <= tolerance})

    cuda_backends: tuple[Literal["varlen", "flex"], ...] = ("varlen", "flex")
    reference = attention(q, k, v, segments, backend="reference")
    for backend in cuda_backends:
        compute = partial(attention, hq, hk, hv, segments, backend=backend)
        check(f"softmax {backend} bf16", compute, reference, 2e-2)

    sparse_options: list[dict[str, Any]] = [
        {"mode": "routed", "region_size": 64, "topk": 4},
        {"mode": "block", "region_size": 64},
    ]
    for options in sparse_options:
        expected = attention(q, k, v, segments, kind="sparse", backend="reference", **options)
        compute = partial(attention, hq, hk, hv, segments, kind="sparse", backend="flex", **options)
        check(f"sparse {options['mode']} flex bf16", compute, expected, 3e-2)

    for function in (nystrom_attention, agent_attention):
        expected = function(q, k, v, segments, backend="reference")
        for backend in cuda_backends:
            compute = partial(function, hq, hk, hv, segments, backend=backend)
            check(f"{function.__name__} {backend} bf16", compute, expected, 5e-2)

    values = torch.randn(segments.total, 256, device="cuda", generator=generator)
    scores = torch.randn(segments.total, 3, device="cuda", generator=generator)
    cpu_segments = Segments.from_lengths(CHECK_LENGTHS, total=segments.total)
    cpu_pooled, _ = segment_attention_pool(values.cpu(), scores.cpu(), cpu_segments)

    def pooled_on_cuda() -> torch.Tensor:
        return segment_attention_pool(values, scores, segments)[0].cpu()

    def max_on_cuda() -> torch.Tensor:
        return segment_reduce(values, segments, "max").cpu()

    def masked_count() -> torch.Tensor:
        return segment_topk_mask(scores, segments, 16, 0.5).sum().float().reshape(1).cpu()

    check("segment_attention_pool cuda fp32", pooled_on_cuda, cpu_pooled, 1e-4)
    check(
        "segment_reduce max cuda fp32",
        max_on_cuda,
        segment_reduce(values.cpu(), cpu_segments, "max"),
        0.0,
    )
    expected_masked = float(sum(3 * int(0.5 * min(16, n)) for n in CHECK_LENGTHS))
    check("segment_topk_mask count", masked_count, torch.tensor([expected_masked]), 0.0)
    return rows


def median_ms(step: Callable[[], object], repeats: int) -> float:
    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_bandwidth_gbs() -> float | None:
    """Peak DRAM bandwidth from the memory clock (kHz) and bus width (bits), double data rate."""
    properties = torch.cuda.get_device_properties(0)
    clock_khz = getattr(properties, "memory_clock_rate", None)
    bus_bits = getattr(properties, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def copy_bandwidth_gbs(repeats: int) -> float:
    """Measured device-to-device copy of 1 GiB (bytes read + bytes written per second)."""
    source = torch.empty(2**28, dtype=torch.float32, device="cuda")
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source), repeats)
    return 2 * source.numel() * 4 / (ms / 1e3) / 1e9


def time_pool(
    segments: Segments, tiles: int, dim: int, dtype: torch.dtype, repeats: int
) -> list[dict[str, Any]]:
    """Time segment_attention_pool forward and forward + backward; one row per pass."""
    bags = segments.num_segments
    size = torch.finfo(dtype).bits // 8
    values = torch.randn(tiles, dim, device="cuda", dtype=dtype, requires_grad=True)
    scores = torch.randn(tiles, 1, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(bags, 1, dim, device="cuda", dtype=dtype)

    def forward() -> None:
        with torch.no_grad():
            segment_attention_pool(values, scores, segments)

    def forward_backward() -> None:
        values.grad = scores.grad = None
        pooled, _ = segment_attention_pool(values, scores, segments)
        pooled.backward(grad)

    # Minimum traffic: forward reads values and scores and writes weights and pooled;
    # backward reads values again with the pooled gradient and writes the value gradient.
    forward_bytes = (tiles * dim + 2 * tiles + bags * dim) * size
    backward_bytes = (2 * tiles * dim + 2 * tiles + bags * dim) * size
    rows = []
    passes: list[tuple[str, Callable[[], None], int]] = [
        ("forward", forward, forward_bytes),
        ("forward+backward", forward_backward, forward_bytes + backward_bytes),
    ]
    for name, step, moved in passes:
        ms = median_ms(step, repeats)
        rows.append(
            {
                "dtype": str(dtype).removeprefix("torch."),
                "pass": name,
                "ms": ms,
                "GB/s": moved / (ms / 1e3) / 1e9,
            }
        )
    return rows


def run_bandwidth(tiles: int, dim: int, bags: int, repeats: int) -> list[dict[str, Any]]:
    lengths = [tiles // bags] * bags
    lengths[-1] += tiles - sum(lengths)
    segments = Segments.from_lengths(lengths).to("cuda")
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        rows.extend(time_pool(segments, tiles, dim, dtype, repeats))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=100_000, help="N for the bandwidth part")
    parser.add_argument("--dim", type=int, default=1024, help="D for the bandwidth part")
    parser.add_argument("--bags", type=int, default=16)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels_gpu.py needs a CUDA device; none is visible here")

    header = {
        "command": "python " + " ".join(sys.argv),
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for key, value in header.items():
        print(f"- {key}: {value}")

    checks = run_checks(args.heads, args.head_dim)
    print("\n| check | max abs error vs fp32 reference | ok |\n|---|---:|:-:|")
    for row in checks:
        error = "failed: " + row["error"] if row.get("error") else f"{row['max_abs_error']:.3g}"
        print(f"| {row['check']} | {error} | {'yes' if row['ok'] else 'NO'} |")

    peak = peak_bandwidth_gbs()
    copy = copy_bandwidth_gbs(args.repeats)
    bandwidth = run_bandwidth(args.tiles, args.dim, args.bags, args.repeats)
    print(f"\nsegment_attention_pool, N={args.tiles}, D={args.dim}, {args.bags} bags")
    print(
        f"- peak DRAM bandwidth from device properties: "
        f"{'unknown' if peak is None else f'{peak:.0f} GB/s'}"
    )
    print(f"- measured device copy: {copy:.0f} GB/s")
    print("\n| dtype | pass | ms | GB/s | % of copy | % of peak |\n|---|---|---:|---:|---:|---:|")
    for row in bandwidth:
        of_peak = "n/a" if peak is None else f"{100 * row['GB/s'] / peak:.0f}%"
        print(
            f"| {row['dtype']} | {row['pass']} | {row['ms']:.3f} | {row['GB/s']:.0f} | "
            f"{100 * row['GB/s'] / copy:.0f}% | {of_peak} |"
        )

    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "header": header,
                    "checks": checks,
                    "peak_gbs": peak,
                    "copy_gbs": copy,
                    "bandwidth": bandwidth,
                },
                indent=2,
            )
        )
    if not all(row["ok"] for row in checks):
        raise SystemExit("some CUDA backends differ from the reference; see the table above")


if __name__ == "__main__":
    main()
