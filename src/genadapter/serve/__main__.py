"""`python -m genadapter.serve`: the service without the CLI (tests and benchmarks start it this way)."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import GenAdapterError
from . import ALLOWED_HOSTS_HELP, NO_AUTH_HELP, ServeConfig, serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m genadapter.serve", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--db", required=True, help="SQLite file of the contexts (created if missing)")
    parser.add_argument("--base", default=None, help="base model (default: the embedded SmolLM2)")
    parser.add_argument("--generator", default=None, help="generator directory")
    parser.add_argument("--config", default="{}", help="ServeConfig fields as JSON, e.g. '{\"max_batch\": 1}'")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--no-auth", action="store_true", help=NO_AUTH_HELP)
    parser.add_argument("--allowed-hosts", default=None, metavar="NAMES", help=ALLOWED_HOSTS_HELP)
    args = parser.parse_args(argv)
    try:
        config = ServeConfig.from_dict(json.loads(args.config))
        if args.threads > 0:
            import torch

            torch.set_num_threads(args.threads)
        serve(
            args.host,
            args.port,
            args.db,
            args.base,
            args.generator,
            config=config,
            log_level=args.log_level,
            no_auth=args.no_auth,
            allowed_hosts=args.allowed_hosts,
        )
    except (GenAdapterError, json.JSONDecodeError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
