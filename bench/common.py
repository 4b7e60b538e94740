"""Shared by the benchmarks: loading a config file, printing a result, appending it to RESULTS.md."""

from __future__ import annotations

import importlib.util
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def load_config(path: str):
    """`get_config()` of a configs/*.py file."""
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def machine() -> str:
    """The devices and cores a result was measured on."""
    import jax

    return f"{jax.device_count()} {jax.devices()[0].platform} device(s), {os.cpu_count()} cores"


def report(title: str, script: str, argv, header: str, table: str, write: bool) -> None:
    """Print `header` and `table`; with `write`, append them to bench/RESULTS.md under `title`
    with the command that produced them."""
    print(header)
    print(table)
    if write:
        command = f"python bench/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(os.path.join(REPO, "bench", "RESULTS.md"), "a") as f:
            f.write(f"\n## {title} ({time.strftime('%Y-%m-%d')})\n\n`{command.strip()}`\n\n{header}\n\n{table}\n")
