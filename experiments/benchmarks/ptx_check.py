"""Which kernels of a compiled GPU program keep values on the stack: ``ptxas -v`` over the PTX
that XLA dumps.

A kernel whose per-thread values do not fit in registers, or that indexes a small array
with a value known only at run time, keeps them in local memory: each access goes through
the caches instead of a register. Measured on an H200, SPAM's bfloat16 update in rows of
128 ran at 0.6 TB/s for this reason (304 bytes of stack a thread) where the same pass
without a stack ran at 2.5 TB/s and more; the profile shows the slow kernel, this shows
why, without a GPU.

Compile with XLA's dump on (``aot_gpu`` compiles for a GPU on a machine without one), then
read the dump; ``ptxas`` comes with CUDA or with the ``nvidia-cuda-nvcc-cu12`` package::

  XLA_FLAGS=--xla_dump_to=/tmp/dump python -m experiments.benchmarks.aot_gpu \\
      --what train --model llama_350m --target h200
  python -m experiments.benchmarks.ptx_check /tmp/dump --arch sm_90a

It prints every kernel with a stack frame or spilled registers (name, registers, stack
bytes, spills, the PTX file) and how many kernels it read; ``--all`` prints every kernel.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import shutil
import subprocess
import sys


@dataclasses.dataclass(frozen=True)
class Kernel:
  name: str
  registers: int
  stack_bytes: int
  spill_store_bytes: int
  spill_load_bytes: int
  file: str

  @property
  def uses_stack(self) -> bool:
    return bool(self.stack_bytes or self.spill_store_bytes or self.spill_load_bytes)


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def parse(text: str, file: str = "") -> list[Kernel]:
  """The kernels in ``ptxas -v`` output ``text``: one per entry function, with its
  registers and its stack frame and spills (0 where ptxas printed none)."""
  kernels, name, frame = [], None, (0, 0, 0)
  for line in text.splitlines():
    if m := _ENTRY.search(line):
      name, frame = m.group(1), (0, 0, 0)
    elif name and (m := _FRAME.search(line)):
      frame = tuple(int(g) for g in m.groups())
    elif name and (m := _REGISTERS.search(line)):
      kernels.append(Kernel(name, int(m.group(1)), *frame, file=file))
      name = None
  return kernels


def find_ptxas() -> str | None:
  """``ptxas`` on the PATH, else the one the ``nvidia-cuda-nvcc-cu12`` package installs."""
  found = shutil.which("ptxas")
  if found:
    return found
  try:
    import nvidia.cuda_nvcc  # the package jax[cuda12] installs
  except ImportError:
    return None
  for root in getattr(nvidia.cuda_nvcc, "__path__", []):
    candidate = pathlib.Path(root) / "bin" / "ptxas"
    if candidate.is_file():
      return str(candidate)
  return None


def check(dump: str | pathlib.Path, arch: str = "sm_90a",
          ptxas: str | None = None) -> list[Kernel]:
  """Every kernel of every ``*.ptx`` file under ``dump``, each file assembled by ``ptxas``
  for ``arch``; a kernel compiled into several files is listed once (its first file's).
  Empty files (XLA dumps one for a module without kernels) are passed over."""
  ptxas = ptxas or find_ptxas()
  if not ptxas:
    raise FileNotFoundError("ptxas not found: install CUDA or nvidia-cuda-nvcc-cu12, or pass "
                            "--ptxas")
  files = sorted(pathlib.Path(dump).rglob("*.ptx"))
  if not files:
    raise FileNotFoundError(f"no .ptx file under {dump}: compile with "
                            f"XLA_FLAGS=--xla_dump_to={dump}")
  seen: dict[str, Kernel] = {}
  for f in files:
    if not f.stat().st_size:
      continue
    done = subprocess.run([ptxas, f"-arch={arch}", "-v", str(f), "-o", "/dev/null"],
                          capture_output=True, text=True)
    if done.returncode:
      raise RuntimeError(f"ptxas failed on {f}: {done.stderr.strip().splitlines()[-1:]}")
    for k in parse(done.stderr + done.stdout, f.name):
      seen.setdefault(k.name, k)
  return list(seen.values())


def table(kernels: list[Kernel], every: bool = False) -> str:
  rows = [k for k in kernels if every or k.uses_stack]
  lines = [f"{len(kernels)} kernels; {sum(k.uses_stack for k in kernels)} with a stack frame "
           "or spills",
           "| kernel | registers | stack bytes | spill stores | spill loads | PTX file |",
           "|---|---:|---:|---:|---:|---|"]
  for k in sorted(rows, key=lambda k: (-k.stack_bytes, k.name)):
    lines.append(f"| {k.name} | {k.registers} | {k.stack_bytes} | {k.spill_store_bytes} | "
                 f"{k.spill_load_bytes} | {k.file} |")
  return "\n".join(lines)


def main(argv=None) -> list[Kernel]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("dump", help="the folder XLA dumped the program into (--xla_dump_to)")
  p.add_argument("--arch", default="sm_90a", help="ptxas's -arch (sm_90a: H100, H200)")
  p.add_argument("--ptxas", default=None, help="the ptxas to run (default: found)")
  p.add_argument("--all", action="store_true", help="print every kernel")
  args = p.parse_args(argv)
  try:
    kernels = check(args.dump, args.arch, args.ptxas)
  except (FileNotFoundError, RuntimeError) as e:
    sys.exit(f"ptx_check: {e}")
  print(table(kernels, args.all))
  return kernels


if __name__ == "__main__":
  main()
