"""``hf-align recipes``: the recipes shipped with hf-align, by the name ``--config`` takes, with their command and
first description line (``hf-align masked-dpo --config allo/improve_dpo``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RecipesArguments:
    """``hf-align recipes`` has no options of its own; it takes ``--config`` like every command."""


def main(argv: list[str] | None = None) -> int:
    from hf_align.cli.common import parse_command
    from hf_align.scripts.recipes import describe, shipped_recipes

    parse_command("hf-align recipes", (RecipesArguments,), argv, description=__doc__)
    rows = [(name, *describe(path)) for name, path in shipped_recipes().items()]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for name, command, description in rows:
        print(f"{name:<{widths[0]}}  {command:<{widths[1]}}  {description}".rstrip())
    return 0
