"""NF4 quantize/dequantize throughput and error: lorakit vs bitsandbytes vs torchao, on CPU.

    python bench/bench_quant.py --sizes 1024x1024 576x1536 4096x4096 --repeats 5

Each implementation quantizes the same seeded randn matrix; throughput is weight elements
per second (best of --repeats timed runs after one warm-up run, which also absorbs
bitsandbytes' torch.compile warm-up; best-of because a shared machine only ever adds
time), error is mean |dequantize(quantize(w)) - w|.
Prints a markdown table and writes it, with the command line, to bench/results/quant.md.
Implementations that are not installed are listed as skipped.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a plain checkout

from lorakit.quant import quantize_nf4  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "quant.md"

# name -> (quantize(w) -> state, dequantize(state) -> tensor, bits per weight of state)
Impl = tuple[Callable[[torch.Tensor], object], Callable[[object], torch.Tensor], Callable[[object, int], float]]


def lorakit_impl(blocksize: int, double_quant: bool, dtype: torch.dtype) -> Impl:
    return (
        lambda w: quantize_nf4(w, blocksize=blocksize, double_quant=double_quant),
        lambda q: q.dequantize(dtype),
        lambda q, n: q.bits_per_param,
    )


def bitsandbytes_impl(blocksize: int, double_quant: bool, dtype: torch.dtype) -> Impl | str:
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbf
    except Exception as e:  # noqa: BLE001 (any import failure means "not available")
        return f"not importable ({type(e).__name__})"

    def quantize(w: torch.Tensor):
        return bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)

    def dequantize(state) -> torch.Tensor:
        packed, qs = state
        qs.dtype = dtype
        return bnbf.dequantize_4bit(packed, qs)

    def bits(state, n: int) -> float:
        packed, qs = state
        tensors = [packed, qs.absmax] + ([qs.state2.absmax, qs.offset] if qs.nested else [])
        return 8 * sum(t.numel() * t.element_size() for t in tensors) / n

    bitsandbytes_impl.version = bitsandbytes.__version__  # type: ignore[attr-defined]
    return quantize, dequantize, bits


def torchao_impl(blocksize: int, double_quant: bool, dtype: torch.dtype) -> Impl | str:
    try:
        try:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4  # torchao >= 0.16
        except ImportError:
            from torchao.dtypes.nf4tensor import to_nf4  # older releases
    except Exception as e:  # noqa: BLE001
        return f"not installed ({type(e).__name__}: {e})"

    def quantize(w: torch.Tensor):
        # torchao always double-quantizes its scalers, in blocks of `scaler_block_size`
        return to_nf4(w.to(torch.bfloat16) if w.dtype == torch.float32 else w, block_size=blocksize)

    def bits(t, n: int) -> float:
        names = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean")
        return 8 * sum(getattr(t, k).numel() * getattr(t, k).element_size() for k in names) / n

    return quantize, lambda t: t.get_original_weight().to(dtype), bits


def best_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def parse_size(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not ROWSxCOLS, e.g. 1024x1024") from None
    return rows, cols


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(1024, 1024), (576, 1536), (4096, 4096)])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--no-double-quant", action="store_true", help="plain fp32 absmax (4.5 bits)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="input and output dtype")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="a line about the machine, added to the results file")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    double_quant = not args.no_double_quant

    impls: dict[str, Impl | str] = {
        "lorakit": lorakit_impl(args.blocksize, double_quant, dtype),
        "bitsandbytes": bitsandbytes_impl(args.blocksize, double_quant, dtype),
        "torchao": torchao_impl(args.blocksize, double_quant, dtype),
    }
    rows = []
    for r, c in args.sizes:
        w = torch.randn(r, c, generator=torch.Generator().manual_seed(0)).to(dtype)
        n = w.numel()
        for name, impl in impls.items():
            if isinstance(impl, str):
                continue
            quantize, dequantize, bits = impl
            tq, state = best_seconds(lambda: quantize(w), args.repeats)
            td, out = best_seconds(lambda: dequantize(state), args.repeats)
            err = (out.float().reshape(w.shape) - w.float()).abs().mean().item()
            rows.append(
                f"| {r}x{c} | {name} | {n / tq / 1e6:,.0f} | {n / td / 1e6:,.0f} | {err:.5f} | {bits(state, n):.3f} |"
            )
            print(rows[-1], flush=True)

    cpu = platform.processor() or platform.machine()
    versions = f"torch {torch.__version__}"
    if hasattr(bitsandbytes_impl, "version"):
        versions += f", bitsandbytes {bitsandbytes_impl.version}"
    try:
        import torchao

        versions += f", torchao {torchao.__version__}"
    except Exception:  # noqa: BLE001
        pass
    lines = [
        "# NF4 quantization benchmark (CPU)",
        "",
        "```",
        "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        "```",
        "",
        f"{versions}; {torch.get_num_threads()} CPU threads ({cpu}); blocksize {args.blocksize}, "
        f"double quant {'on' if double_quant else 'off'}, {args.dtype} in and out; "
        f"best of {args.repeats} runs after a warm-up.",
        *([args.note] if args.note else []),
        "",
        "| size | impl | quantize M params/s | dequantize M params/s | mean abs error | bits/param |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    lines += [f"- {name}: skipped, {impl}" for name, impl in impls.items() if isinstance(impl, str)]
    text = "\n".join(lines).rstrip() + "\n"
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
