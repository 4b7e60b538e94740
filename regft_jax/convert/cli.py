"""Command line: convert HF <-> regft_jax checkpoints. Errors print one line and exit 2."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from regft_jax import checkpoint
from regft_jax.errors import UserInputError
from regft_jax.models import load_hf, save_hf


def hf_to_flax(hf_dir: str, out: str, *, param_dtype: Optional[str] = None) -> str:
    """HF directory (config.json + safetensors) -> orbax checkpoint at `out`."""
    cfg, params = load_hf(hf_dir, param_dtype=param_dtype)
    return checkpoint.save_model(out, cfg, params)


def flax_to_hf(ckpt: str, out: str, *, dtype: Optional[str] = None) -> list[str]:
    """orbax checkpoint -> HF directory loadable by transformers."""
    cfg, params = checkpoint.load_model(ckpt)
    return save_hf(cfg, params, out, dtype=dtype)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regft_jax.convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-flax", help="HF safetensors directory -> regft_jax checkpoint")
    a.add_argument("--hf_dir", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--param_dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="parameter dtype (default: the checkpoint's)")
    b = sub.add_parser("flax-to-hf", help="regft_jax checkpoint -> HF safetensors directory")
    b.add_argument("--ckpt", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    args = parser.parse_args(argv)
    start = time.time()
    try:
        if args.command == "hf-to-flax":
            out = hf_to_flax(args.hf_dir, args.out, param_dtype=args.param_dtype)
        else:
            out = ", ".join(flax_to_hf(args.ckpt, args.out, dtype=args.dtype))
    except (UserInputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.command}: wrote {out} ({time.time() - start:.1f}s)")
    return 0
