"""``python -m opd_ext info``: print how this installation was built."""

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd_ext")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, CUDA kernels and archs, CPU threads")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)

    import opd_ext

    if args.command == "info":
        data = opd_ext.build_info()
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            width = max(map(len, data))
            for key, value in data.items():
                if isinstance(value, list):
                    value = ", ".join(value) or "-"
                print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
