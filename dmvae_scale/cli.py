"""`dmvae-scale`: the single entry point. Each subcommand parses its arguments and delegates; no logic lives here.

Errors a user can fix (bad config, missing file, wrong input) print one line `error: ...` and exit 2, no traceback.
Add a subcommand by writing one `_add_<name>(sub)` function below and listing it in `COMMANDS`.
"""
from __future__ import annotations

import argparse
import sys

from .errors import UserError


def _add_config(sub):
    p = sub.add_parser("config", help="inspect configs")
    csub = p.add_subparsers(dest="config_cmd", required=True)
    show = csub.add_parser("show", help="print the resolved config (file + dotted overrides)")
    show.add_argument("file", nargs="?", default=None, help="YAML config (omit for the defaults)")
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. score.depth=12")

    def run(args):
        from .config import dump_yaml, load_config
        print(dump_yaml(load_config(args.file, args.overrides)), end="")
    show.set_defaults(func=run)


def _add_models(sub):
    p = sub.add_parser("models", help="table of the model zoo with parameter counts")
    p.add_argument("--input-size", type=int, default=16, help="latent grid side (default 16)")
    p.add_argument("--in-channels", type=int, default=32, help="latent channels (default 32)")

    def run(args):
        from .models.zoo import print_model_table
        print_model_table(input_size=args.input_size, in_channels=args.in_channels)
    p.set_defaults(func=run)


COMMANDS = [_add_config, _add_models]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmvae-scale", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
