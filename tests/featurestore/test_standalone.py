"""The store is a product of its own: it imports and works where refresher cannot be imported at all."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import featurestore

# Run in a fresh interpreter: a meta-path finder refuses every ``refresher`` import, so any import of it
# (direct or through a dependency of the store) fails loudly instead of silently succeeding.
_CHILD = """
import sys

class NoRefresher:
    def find_spec(self, name, path=None, target=None):
        if name == "refresher" or name.startswith("refresher."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, NoRefresher())
try:
    import refresher  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the blocker did not block")

import pyarrow as pa
from featurestore import FeatureStore, FeatureStoreError

store = FeatureStore(sys.argv[1])
store.put("standalone", pa.table({"x": [1, 2, 3]}), symbol="X")
assert store.get("standalone").column("x").to_pylist() == [1, 2, 3]
try:
    store.put("../escape", pa.table({"x": [1]}))
except FeatureStoreError as exc:
    assert exc.exit_code == 2 and "key=" in str(exc)
assert not [m for m in sys.modules if m == "refresher" or m.startswith("refresher.")]
print("ok")
"""


def test_featurestore_imports_and_works_without_refresher(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "store")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_no_module_of_the_store_imports_refresher() -> None:
    package = Path(featurestore.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "refresher"]
    assert offenders == []


def test_gc_uses_no_private_part_of_the_store() -> None:
    source = (Path(featurestore.__file__).parent / "gc" / "__init__.py").read_text()
    assert re.findall(r"\bstore\._\w+", source) == []
