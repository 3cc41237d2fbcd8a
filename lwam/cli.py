"""The ``lwam`` command."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from lwam.config import get_preset
    from lwam.info import format_info, model_info

    info = model_info(get_preset(args.preset))
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lwam", description="Light-WAM: train, evaluate and deploy a World Action Model")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter and token counts of a preset (no weights allocated)")
    info.add_argument("--preset", default="paper")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"lwam {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
