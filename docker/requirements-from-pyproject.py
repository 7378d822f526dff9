"""Print the project's dependencies (and optional extras) from pyproject.toml, one per line.

Lets an image install dependencies in their own layer before the source is copied.
Usage: python requirements-from-pyproject.py pyproject.toml [extra ...]
"""

import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
deps = list(project["dependencies"])
for extra in sys.argv[2:]:
    deps += project["optional-dependencies"][extra]
print("\n".join(d for d in deps if not d.startswith(("torch", "flash-attn"))))
