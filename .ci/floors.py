"""Prints the requirements of CI's floors job: the lowest versions pyproject.toml allows.

jax (with the jaxlib of the same version), optax and numpy for the library, flax and
orbax-checkpoint for models/, safetensors for models.hf, and chex for the tests are pinned
to their floors; pytest and pytest-xdist are taken as allowed. Where the core dependencies and an extra
both name a package, the core floor is the one pinned: the extra's is for code these
tests do not import (the train extra's newer jax and optax are for experiments/).
"""
import re
import tomllib

PINNED = ("jax", "optax", "numpy", "flax", "orbax-checkpoint", "safetensors", "chex")
AS_ALLOWED = ("pytest", "pytest-xdist")

with open("pyproject.toml", "rb") as f:
  project = tomllib.load(f)["project"]
requirements = project["dependencies"] + [
    r for extra in project["optional-dependencies"].values() for r in extra]
specs = {}
for requirement in requirements:
  name, spec = re.fullmatch(r"([\w.-]+)(?:\[[^]]*\])?\s*(.*)", requirement).groups()
  specs.setdefault(name.lower(), spec)

lines = []
for name in PINNED:
  floor = re.search(r">=\s*([\w.]+)", specs[name])
  if floor is None:
    raise SystemExit(f"error: pyproject.toml gives {name} no lower bound (>=)")
  lines.append(f"{name}=={floor.group(1)}")
  if name == "jax":
    lines.append(f"jaxlib=={floor.group(1)}")
lines += [name + specs[name] for name in AS_ALLOWED]
print("\n".join(lines))
