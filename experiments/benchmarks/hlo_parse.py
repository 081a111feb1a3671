"""Parsing the optimized HLO text that ``compiled.as_text()`` returns.

One place for the patterns ``hlo_stats`` (kernels, bytes moved) and ``profile_summary``
(what each profiled instruction computes) both need: the computations of a module with their
instruction lines, and the parts of an instruction line.
"""
from __future__ import annotations

import re

# "%name = type opcode(operands), attributes": name, type, opcode, the rest of the line.
DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
# A computation's first line: "[ENTRY] %name (parameters) -> type {".
HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
MODULE = re.compile(r"^HloModule\s+([\w.\-]+)")
FUSION_KIND = re.compile(r"\sfusion\(.*kind=(k[A-Za-z]+)")
TARGET = re.compile(r'custom_call_target="([^"]+)"')
CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")
TO_APPLY = re.compile(r"\bto_apply=%?([\w.\-]+)")
CALLEE = re.compile(
    r"\b(?:body|condition|true_computation|false_computation|to_apply|calls)=%?([\w.\-]+)")
BRANCH_LIST = re.compile(r"branch_computations=\{([^}]*)\}")


def computations(hlo_text: str) -> dict:
  """The module's computations: name → ``dict(entry=bool, lines=[instruction lines])``."""
  comps, name = {}, None
  for line in (hlo_text or "").splitlines():
    header = HEADER.match(line)
    if header:
      name = header.group(2)
      comps[name] = dict(entry=bool(header.group(1)), lines=[])
    elif line.startswith("}"):
      name = None
    elif name is not None and line.strip():
      comps[name]["lines"].append(line)
  return comps


def instructions(comp: dict) -> list:
  """``(name, type, opcode, operand names, line)`` of each instruction line of ``comp``."""
  out = []
  for line in comp["lines"]:
    m = DEFINITION.match(line)
    if m:
      args = m.group(4).split(")", 1)[0]
      out.append((m.group(1), m.group(2), m.group(3), re.findall(r"%([\w.\-]+)", args), line))
  return out


def opcode(line: str) -> str | None:
  """The opcode of an instruction line (``fusion``, ``copy``...), None for other lines."""
  m = DEFINITION.match(line)
  return m.group(3) if m else None
