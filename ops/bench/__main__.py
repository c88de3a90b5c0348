"""``python -m ops.bench SUBCOMMAND [options]``: run one benchmark (`ops.bench.SUBCOMMANDS`).

``python -m ops.bench SUBCOMMAND --help`` lists that benchmark's options.
"""

from __future__ import annotations

import importlib
import sys

from ops.bench import SUBCOMMANDS


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("subcommands: " + ", ".join(SUBCOMMANDS))
        return 0
    if not argv or argv[0] not in SUBCOMMANDS:
        given = repr(argv[0]) if argv else "nothing"
        print(f"usage: python -m ops.bench {{{','.join(SUBCOMMANDS)}}} [options]; got {given}", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(SUBCOMMANDS[name])
    parser = module.get_args_parser()
    parser.prog = f"python -m ops.bench {name}"
    result = module.main(parser.parse_args(rest))
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
