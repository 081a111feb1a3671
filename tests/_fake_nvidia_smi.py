"""A stand-in ``nvidia-smi`` on PATH for the tests of the GPU clock sampler."""
import os
import stat
import sys
import textwrap

# Answers --query-gpu once, or every --loop-ms until stopped, with the samples of
# $FAKE_SMI_SAMPLES in turn (';'-separated lines); rejects a query naming the field in
# $FAKE_SMI_REJECT as nvidia-smi rejects a field it does not know; logs its arguments.
SCRIPT = textwrap.dedent("""\
    #!{python}
    import os, sys, time
    args = sys.argv[1:]
    with open(os.environ["FAKE_SMI_LOG"], "a") as log:
        log.write(" ".join(args) + "\\n")
    query = [a for a in args if a.startswith("--query-gpu=")][0]
    reject = os.environ.get("FAKE_SMI_REJECT")
    if reject and reject in query:
        print(f'Field "{{reject}}" is not a valid field to query.')
        sys.exit(2)
    samples = os.environ["FAKE_SMI_SAMPLES"].split(";")
    loop = [a for a in args if a.startswith("--loop-ms=")]
    if not loop:
        print(samples[0]); sys.exit(0)
    i = 0
    while True:
        print(samples[i % len(samples)], flush=True)
        i += 1
        time.sleep(int(loop[0].split("=")[1]) / 1000)
""")


def install(folder, monkeypatch, samples: str):
  """Puts the stand-in first on PATH, answering with ``samples``; returns its log's path."""
  path = folder / "nvidia-smi"
  path.write_text(SCRIPT.format(python=sys.executable))
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_SMI_LOG", str(folder / "log"))
  monkeypatch.setenv("FAKE_SMI_SAMPLES", samples)
  monkeypatch.delenv("FAKE_SMI_REJECT", raising=False)
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  return folder / "log"
