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


# An operand: an instruction's name, or one element of a tuple an instruction returns, as
# newer XLA writes it in place of a get-tuple-element ("%fusion.3#1").
OPERAND = re.compile(r"%([\w.\-]+(?:#\d+)?)")


def instructions(comp: dict) -> list:
  """``(name, type, opcode, operand names, line)`` of each instruction line of ``comp``; an
  operand that is one element of a tuple is named ``name#index`` (``operand_type``)."""
  out = []
  for line in comp["lines"]:
    m = DEFINITION.match(line)
    if m:
      args = m.group(4).split(")", 1)[0]
      out.append((m.group(1), m.group(2), m.group(3), OPERAND.findall(args), line))
  return out


def tuple_elements(hlo_type: str) -> list:
  """The element types of a tuple type, ``(f32[2]{0}, (s32[], bf16[4]))`` → ``["f32[2]{0}",
  "(s32[], bf16[4])"]``; a type that is not a tuple is its only element."""
  t = hlo_type.strip()
  if not t.startswith("("):
    return [t]
  parts, depth, start = [], 0, 1
  for i, c in enumerate(t):
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    elif c == "," and depth == 1:
      parts.append(t[start:i].strip())
      start = i + 1
  last = t[start:t.rfind(")")].strip()
  return parts + ([last] if last else [])


def operand_type(types: dict, operand: str) -> str:
  """The type of ``operand`` (from ``instructions``) given each instruction's type:
  ``name#index`` is that element of ``name``'s tuple; "" where unknown."""
  name, _, index = operand.partition("#")
  typ = types.get(name, "")
  if not index or not typ:
    return typ
  elements = tuple_elements(typ)
  return elements[int(index)] if int(index) < len(elements) else ""


def opcode(line: str) -> str | None:
  """The opcode of an instruction line (``fusion``, ``copy``...), None for other lines."""
  m = DEFINITION.match(line)
  return m.group(3) if m else None
