"""`bytelm serve MODEL`: the HTTP API and web page (bytelm/serve/app.py) on uvicorn.

    bytelm serve byte_llm_model.pt                      # http://127.0.0.1:8000/  (the page), /v1/completions, ...
    bytelm serve MODEL --port 9000 --api-key secret     # or BYTELM_API_KEY=secret bytelm serve MODEL
    bytelm serve MODEL --max-active 16 --max-tokens 8192
    bytelm serve MODEL --allow-origin http://localhost:3000   # let that page's script use the API (CORS)

Needs the `serve` extra: pip install "bytelm[serve]" (FastAPI, uvicorn, prometheus-client). docs/serving.md has every route.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import Sequence

from bytelm.errors import BytelmError
from bytelm.cli.args import add_dataclass_arguments, given_values

API_KEY_ENV = "BYTELM_API_KEY"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None, prog: str = "bytelm serve") -> int:
    try:
        import uvicorn

        from bytelm.serve.app import ServeSettings, create_app
        from bytelm.serve.server import server_config
    except ImportError as e:
        raise BytelmError(f"bytelm serve needs FastAPI, uvicorn and prometheus-client ({e.name} is missing): "
                          "pip install \"bytelm[serve]\"") from None
    from bytelm.checkpoint import load_model
    from bytelm.device import pick_device

    parser = argparse.ArgumentParser(prog=prog, description="Serve a model over HTTP: an OpenAI-compatible "
                                     "API and a web page that shows what the model expected at every byte.")
    parser.add_argument("model", help="checkpoint file, e.g. byte_llm_model.pt")
    add_dataclass_arguments(parser, ServeSettings)
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="CPU threads for torch (default: 1; one-byte steps are too small to share out)")
    parser.add_argument("--exact", action="store_true",
                        help="run each step with the fp32 weights (default: the C step reads half-precision "
                             "copies, 2-3x faster, logits within ~1e-3; as bytelm generate)")
    parser.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    args = parser.parse_args(argv)
    settings = ServeSettings(**given_values(args, ServeSettings))
    if not settings.api_key:
        settings.api_key = os.environ.get(API_KEY_ENV, "")
    settings.validate()
    from bytelm.device import set_threads
    threads, _ = set_threads(args.threads)
    model, _ = load_model(args.model, pick_device(args.device))  # a bad checkpoint stops here, in one line
    app = create_app(model, settings, name=os.path.splitext(os.path.basename(args.model))[0],
                     decode_step="exact" if args.exact else "auto")
    if not _is_loopback(settings.host) and not settings.api_key:
        print(f"warning: listening on {settings.host} without an API key: anyone who can reach this port can "
              f"use the model (set --api-key or {API_KEY_ENV})", file=sys.stderr)
    print(f"bytelm serve: {args.model} ({model.num_params():,} parameters, "
          f"{threads} thread{'s' if threads > 1 else ''} (--threads)) at "
          f"http://{settings.host}:{settings.port}/ ; Ctrl-C stops", file=sys.stderr, flush=True)
    config = server_config(app, settings.host, settings.port, log_level="info", access_log=args.access_log,
                           timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        pass
    return 0
