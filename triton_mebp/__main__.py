"""Command line: ``python -m triton_mebp COMMAND`` (also installed as ``mebp``)."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mebp", description="minimal-effort back propagation")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version", help="print the version")
    args = parser.parse_args(argv)
    if args.command == "version":
        from . import __version__
        print(__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
