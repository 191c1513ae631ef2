"""Entry point: ``gunicorn _wsgi:app`` in production, ``python _wsgi.py --port 9090`` for development.

Arguments follow label-studio-ml 2.x's ``_wsgi.py`` (--port, --host, --log-level, --basic-auth-*)
so the backend starts like every other LS backend. Creating the app loads no model (embedded mode
starts loading them in the background unless PRELOAD_MODELS=false).
"""

from __future__ import annotations

import argparse
import logging
import os

from backend.logsetup import configure_logging
from backend.settings import Settings
from backend.web.app import app_from_settings

configure_logging(os.environ.get("LOG_LEVEL", "INFO"))


def build_app(settings: Settings | None = None):
    """The app from the environment (or ``settings``)."""
    return app_from_settings(settings or Settings.from_env())


def main(argv: list[str] | None = None) -> None:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(description="Grounded-SAM Label Studio ML backend (development server)")
    parser.add_argument("-p", "--port", type=int, default=settings.port)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--basic-auth-user", default=None)
    parser.add_argument("--basic-auth-pass", default=None)
    parser.add_argument("--debug", action="store_true", help="Flask debug mode (never in production)")
    args = parser.parse_args(argv)
    if args.log_level:
        logging.getLogger().setLevel(args.log_level.upper())
    if args.basic_auth_user or args.basic_auth_pass:
        settings = Settings.from_env({**os.environ, "BASIC_AUTH_USER": args.basic_auth_user or "",
                                      "BASIC_AUTH_PASS": args.basic_auth_pass or ""})
    build_app(settings).run(host=args.host, port=args.port, debug=args.debug, threaded=True, use_reloader=False)


if __name__ == "__main__":
    main()
else:
    app = build_app()
