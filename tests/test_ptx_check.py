"""Tests of the stack-frame check over XLA's PTX (experiments.benchmarks.ptx_check)."""
import stat

import pytest

from experiments.benchmarks import ptx_check

# ptxas -v output for two kernels of a 350M LLaMA's bf16 step compiled for an H200: SPAM's
# update in rows of 128 (a stack array) and an element-wise pass (none).
SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'input_add_reduce_fusion' for 'sm_90a'
ptxas info    : Function properties for input_add_reduce_fusion
    312 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 64 registers, used 0 barriers, 312 bytes cumulative stack size
ptxas info    : Compile time = 165.905 ms
ptxas info    : Compiling entry function 'loop_add_fusion_3' for 'sm_90a'
ptxas info    : Function properties for loop_add_fusion_3
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers
ptxas info    : Compiling entry function 'loop_convert_fusion' for 'sm_90a'
ptxas info    : Used 18 registers, used 0 barriers
"""


def test_parse_reads_each_kernels_registers_and_stack():
  got = ptx_check.parse(SAMPLE, "m.ptx")
  assert got == [
      ptx_check.Kernel("input_add_reduce_fusion", 64, 312, 8, 8, "m.ptx"),
      ptx_check.Kernel("loop_add_fusion_3", 32, 0, 0, 0, "m.ptx"),
      ptx_check.Kernel("loop_convert_fusion", 18, 0, 0, 0, "m.ptx"),
  ]
  assert [k.uses_stack for k in got] == [True, False, False]
  assert ptx_check.Kernel("k", 255, 0, 4, 0, "").uses_stack  # spills alone count


def fake_ptxas(tmp_path, outputs: dict) -> str:
  """A ptxas that prints, for a PTX file named in ``outputs``, that text (on stderr, as
  ptxas -v does), and fails on any other file."""
  script = tmp_path / "ptxas"
  cases = "".join(f"  */{name}) cat >&2 <<'EOF'\n{text}EOF\n  ;;\n"
                  for name, text in outputs.items())
  # called as: ptxas -arch=ARCH -v FILE -o /dev/null
  script.write_text(f'#!/bin/sh\ncase "$3" in\n{cases}  *) echo "error: bad $3" >&2; exit 1;;\n'
                    "esac\n")
  script.chmod(script.stat().st_mode | stat.S_IEXEC)
  return str(script)


def test_check_reads_every_ptx_file_once_per_kernel(tmp_path, capsys):
  dump = tmp_path / "dump"
  (dump / "sub").mkdir(parents=True)
  for name in ("a.ptx", "sub/b.ptx"):
    (dump / name).write_text("// ptx")
  (dump / "a.txt").write_text("not ptx")
  (dump / "empty.ptx").write_text("")  # a module without kernels: passed over
  second = SAMPLE.replace("loop_convert_fusion", "input_reduce_fusion_7")
  ptxas = fake_ptxas(tmp_path, {"a.ptx": SAMPLE, "b.ptx": second})
  kernels = ptx_check.check(dump, ptxas=ptxas)
  names = [k.name for k in kernels]
  assert names == ["input_add_reduce_fusion", "loop_add_fusion_3", "loop_convert_fusion",
                   "input_reduce_fusion_7"]  # the first two compiled into both files
  assert kernels[0].file == "a.ptx" and kernels[-1].file == "b.ptx"
  printed = ptx_check.main([str(dump), "--ptxas", ptxas])
  assert printed == kernels
  out = capsys.readouterr().out
  assert out.splitlines()[0] == "4 kernels; 1 with a stack frame or spills"
  assert "| input_add_reduce_fusion | 64 | 312 | 8 | 8 | a.ptx |" in out
  assert "loop_add_fusion_3" not in out
  ptx_check.main([str(dump), "--ptxas", ptxas, "--all"])
  assert "| loop_add_fusion_3 | 32 | 0 | 0 | 0 | a.ptx |" in capsys.readouterr().out


def test_bad_input_gets_one_line(tmp_path, monkeypatch):
  empty = tmp_path / "empty"
  empty.mkdir()
  ptxas = fake_ptxas(tmp_path, {"a.ptx": SAMPLE})
  with pytest.raises(SystemExit, match="no .ptx file under .*xla_dump_to"):
    ptx_check.main([str(empty), "--ptxas", ptxas])
  (empty / "c.ptx").write_text("// ptx")
  with pytest.raises(SystemExit, match="ptxas failed on .*c.ptx.*bad"):
    ptx_check.main([str(empty), "--ptxas", ptxas])
  monkeypatch.setattr(ptx_check, "find_ptxas", lambda: None)
  with pytest.raises(SystemExit, match="ptxas not found"):
    ptx_check.main([str(empty)])
