"""python -m fastlora.inspect — compile every shipped kernel config for sm_80 and sm_90, no GPU needed.

For each CompileSpec exposed by a ``compile_specs()`` in fastlora.kernels' modules, build PTX and
cubin with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and read the cubin's
resource usage with the cuobjdump shipped in the triton wheel. Prints registers, spill bytes
(STACK + LOCAL), shared memory (static + dynamic) and whether the PTX uses wgmma (Hopper's async
MMA). Exits non-zero on any compile failure, any spill, or shared memory over the target's limit.

Must run without TRITON_INTERPRET (the interpreter replaces kernels and configs); tests call it in a
subprocess with that variable removed.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

from .core.backend import interpreting

# Opt-in shared memory per block: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def all_specs(only: str | None = None):
    pkg = importlib.import_module("fastlora.kernels")     # every kernel module: walked, not named
    specs = []
    for mod in pkgutil.iter_modules(pkg.__path__):
        m = importlib.import_module(f"fastlora.kernels.{mod.name}")
        if hasattr(m, "compile_specs"):
            specs += [s for s in m.compile_specs() if only is None or re.search(only, s.name)]
    return specs


def _cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(spec, cc: int) -> dict:
    """Compile one spec for compute capability cc; return its resource row (error text on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"name": spec.name, "cc": cc, "regs": None, "spill": None, "shared": None, "wgmma": None, "error": ""}
    try:
        src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                           options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                                 check=True).stdout
        use = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
        row.update(regs=int(use["REG"]), spill=int(use["STACK"]) + int(use["LOCAL"]),
                   shared=int(use["SHARED"]) + int(k.metadata.shared), wgmma="wgmma" in k.asm["ptx"])
        if row["spill"]:
            row["error"] = "spills"
        elif row["shared"] > SHARED_LIMIT[cc]:
            row["error"] = f"shared memory {row['shared']} B > {SHARED_LIMIT[cc]} B"
    except Exception as e:  # noqa: BLE001 — any compiler failure is a result to report
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    return row


def _job(args):
    idx, cc, only = args
    return compile_one(all_specs(only)[idx], cc)


def run(only: str | None = None, targets=(80, 90), jobs: int = 0, out=sys.stdout) -> list[dict]:
    if interpreting():
        raise RuntimeError("fastlora.inspect compiles real kernels: unset TRITON_INTERPRET")
    specs = all_specs(only)
    work = [(i, cc, only) for i, s in enumerate(specs) for cc in targets if cc in s.targets]
    jobs = jobs or os.cpu_count() or 1
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as ex:
            rows = list(ex.map(_job, work, chunksize=4))
    else:
        rows = [compile_one(specs[i], cc) for i, cc, _ in work]
    print(f"{'kernel config':<86} {'sm':>3} {'regs':>4} {'spill':>5} {'shared':>7} wgmma  status", file=out)
    for r in rows:
        status = r["error"] or "ok"
        print(f"{r['name']:<86} {r['cc']:>3} {r['regs'] if r['regs'] is not None else '-':>4} "
              f"{r['spill'] if r['spill'] is not None else '-':>5} {r['shared'] if r['shared'] is not None else '-':>7} "
              f"{'yes' if r['wgmma'] else 'no ':<5}  {status}", file=out)
    bad = [r for r in rows if r["error"]]
    print(f"{len(rows)} compiled, {len(bad)} failed (compile error, spill or shared memory over limit)", file=out)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastlora.inspect", description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="regex on config names (default: every shipped config)")
    ap.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    ap.add_argument("--jobs", type=int, default=0, help="parallel compiles (default: all cores)")
    a = ap.parse_args(argv)
    targets = tuple(int(t) for t in a.targets.split(","))
    for t in targets:
        if t not in SHARED_LIMIT:
            ap.error(f"--targets: only {sorted(SHARED_LIMIT)} are supported, got {t}")
    rows = run(a.only, targets, a.jobs)
    return 1 if any(r["error"] for r in rows) or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
