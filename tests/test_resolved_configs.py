"""Every recipe in configs/ resolves to the values pinned in tests/configs_resolved.json.

The recipes set only what differs from their base (configs/default.py or another recipe), so a
change to a default silently changes every recipe that does not set that field. This table makes
such a change visible: after an intended one, regenerate it and review its diff with

    python tests/test_resolved_configs.py --write
"""

import glob
import importlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "tests", "configs_resolved.json")
REGENERATE = "python tests/test_resolved_configs.py --write"


def recipe_files():
    """Each config file of configs/ but the base (default.py) and __init__.py, sorted."""
    return sorted(
        os.path.basename(p)
        for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
        if os.path.basename(p) not in ("default.py", "__init__.py")
    )


def flatten(tree, prefix=""):
    """A nested dict as {dotted.key: value}, tuples as lists (as JSON holds them)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def resolved(file_name):
    """The config of configs/FILE_NAME as get_config() returns it, flattened to dotted keys
    (placeholders None, FieldReferences resolved)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    module = importlib.import_module(f"configs.{os.path.splitext(file_name)[0]}")
    return flatten(module.get_config().to_dict())


def resolved_table():
    return {name: resolved(name) for name in recipe_files()}


def as_json(value):
    """The value as JSON writes it: 200 and 200.0, or 1 and True, are different values here."""
    return json.dumps(value)


def table_text(table):
    """The table as JSON, one config field a line (so a diff shows each changed value)."""
    configs = []
    for name in sorted(table):
        fields = ",\n".join(f"    {as_json(key)}: {as_json(value)}" for key, value in sorted(table[name].items()))
        configs.append(f"  {as_json(name)}: {{\n{fields}\n  }}")
    return "{\n" + ",\n".join(configs) + "\n}\n"


def test_every_recipe_resolves_to_its_pinned_values():
    with open(TABLE) as f:
        table = json.load(f)
    problems = []
    for name in sorted(set(table) - set(recipe_files())):
        problems.append(f"{name}: in the table but not in configs/")
    for name in recipe_files():
        if name not in table:
            problems.append(f"configs/{name}: not in the table")
            continue
        want, got = table[name], resolved(name)
        for key in sorted(set(want) | set(got)):
            if key not in got:
                problems.append(f"configs/{name}: {key} is gone (pinned {as_json(want[key])})")
            elif key not in want:
                problems.append(f"configs/{name}: {key} = {as_json(got[key])} is new")
            elif as_json(want[key]) != as_json(got[key]):
                problems.append(f"configs/{name}: {key} = {as_json(got[key])}, pinned {as_json(want[key])}")
    assert not problems, (
        "the recipes no longer resolve to tests/configs_resolved.json:\n  "
        + "\n  ".join(problems)
        + f"\nIf the change is intended, regenerate the table with `{REGENERATE}` and commit its diff."
    )


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {REGENERATE}  (rewrites {os.path.relpath(TABLE, ROOT)} from configs/)")
    with open(TABLE, "w") as f:
        f.write(table_text(resolved_table()))
    print(f"wrote {os.path.relpath(TABLE, ROOT)}: {', '.join(recipe_files())}")
