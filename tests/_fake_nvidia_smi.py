"""A stand-in ``nvidia-smi`` on PATH for the tests of the GPU clock sampler."""
import os
import stat

# Answers a --query-gpu with the next of the samples in $FAKE_SMI_SAMPLES (';'-separated
# lines, in turn, one a call), logging its arguments; refuses a query naming the field in
# $FAKE_SMI_REJECT as nvidia-smi refuses a field it does not know.
SCRIPT = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_SMI_LOG"
query=""
for a in "$@"; do case "$a" in --query-gpu=*) query="$a";; esac; done
if [ -n "${FAKE_SMI_REJECT:-}" ] && [[ "$query" == *"$FAKE_SMI_REJECT"* ]]; then
  echo "Field \"$FAKE_SMI_REJECT\" is not a valid field to query."
  exit 2
fi
IFS=';' read -ra samples <<< "$FAKE_SMI_SAMPLES"
calls=$(wc -l < "$FAKE_SMI_LOG")
echo "${samples[$(( calls % ${#samples[@]} ))]}"
"""


def install(folder, monkeypatch, samples: str):
  """Puts the stand-in first on PATH, answering with ``samples``; returns its log's path."""
  path = folder / "nvidia-smi"
  path.write_text(SCRIPT)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_SMI_LOG", str(folder / "log"))
  monkeypatch.setenv("FAKE_SMI_SAMPLES", samples)
  monkeypatch.delenv("FAKE_SMI_REJECT", raising=False)
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  return folder / "log"
