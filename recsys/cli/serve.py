"""``recsys serve``: an HTTP scoring service over an export, micro-batching concurrent requests."""

from __future__ import annotations

import argparse

from recsys.cli.common import SubParsers, add_command, check_options


def register(sub: SubParsers) -> None:
    p = add_command(sub, "serve", cmd_serve, "an HTTP scoring service over an export (POST "
                    "/score, GET /health, GET /metadata), micro-batching concurrent requests")
    p.add_argument("export_dir", help="a directory written by recsys export")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8080,
                   help="port to listen on (default %(default)s; 0: any free port)")
    p.add_argument("--max-batch-rows", dest="max_batch_rows", type=int, default=1024,
                   help="rows (two-tower: candidates) one model call takes from the queued "
                        "requests (default %(default)s)")
    p.add_argument("--max-wait-ms", dest="max_wait_ms", type=float, default=2.0,
                   help="how long a request may wait for others to join its batch "
                        "(default %(default)s)")
    p.add_argument("--max-body-bytes", dest="max_body_bytes", type=int, default=8 * 2**20,
                   help="larger request bodies get 413 (default %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads per model call (default: every core "
                   "but one, left to the event loop)")


def cmd_serve(args: argparse.Namespace) -> int:
    from recsys.serve.app import run_server
    from recsys.serve.service import ServeConfig, default_threads

    cfg = check_options(lambda: ServeConfig(
        host=args.host, port=args.port, max_batch_rows=args.max_batch_rows,
        max_wait_ms=args.max_wait_ms, max_body_bytes=args.max_body_bytes,
        threads=default_threads() if args.threads is None else args.threads),
        "--port", "--max-batch-rows", "--max-wait-ms", "--max-body-bytes", "--threads")
    service = run_server(args.export_dir, cfg)
    print(f"stopped: {service.summary()}", flush=True)
    return 0
