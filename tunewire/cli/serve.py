"""`tunewire serve trainer|serving`: start a service in this process.

    tunewire serve trainer [--config FILE] [--port 50051] [--data-root DIR] ...
    tunewire serve serving --model DIR [--config FILE] [--max-loras 4] ...

Every field of the service's settings dataclass (trainer_service.config.TrainerConfig,
serving_service.config.ServingConfig) is a flag: `max_loras` is `--max-loras`, a bool `x` is
`--x` / `--no-x`, a list is comma-separated. Flags override the TOML file. A flag of the other
service (`serve trainer --max-loras 4`) is an error that names its service, exit status 2, as is
a bad setting; a service that cannot start (a port in use, a model that does not load) exits 1.
"""

from __future__ import annotations

import argparse
import logging
import sys

from serving_service.config import ServingConfig
from trainer_service.config import TrainerConfig
from tunewire.config import Setting, load_config, settings

CONFIGS = {"trainer": TrainerConfig, "serving": ServingConfig}
log = logging.getLogger("tunewire.serve")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _comma_list(value: str) -> tuple[str, ...]:
    return tuple(v for v in value.split(",") if v)


def _add_setting(p: argparse.ArgumentParser, s: Setting) -> None:
    shown = ",".join(s.default) if s.kind is tuple else s.default
    text = (s.help + (f" (default: {shown})" if shown not in ("", None) else "")).replace("%", "%%")
    if s.kind is bool:
        p.add_argument(flag(s.name), dest=s.name, action=argparse.BooleanOptionalAction, help=text)
    elif s.kind is tuple:
        p.add_argument(flag(s.name), dest=s.name, type=_comma_list, metavar="A,B,...", help=text)
    else:
        p.add_argument(flag(s.name), dest=s.name, type=s.kind, metavar=s.kind.__name__.upper(), help=text)


class _OtherService(argparse.Action):
    """A flag of the other service: refused as soon as it is seen, naming where it belongs."""

    def __init__(self, option_strings, dest, owner: str, service: str, **kw):
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)
        self.owner, self.service = owner, service

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is a setting of the {self.owner} service, not of the "
                     f"{self.service} (tunewire serve {self.owner} {option_string} ...)")


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="start a service", description=__doc__.split("\n\n")[0])
    services = s.add_subparsers(dest="service", required=True, metavar="trainer|serving")
    for service, cls in CONFIGS.items():
        p = services.add_parser(service, help=f"start the {service} (settings: {cls.__name__})")
        p.add_argument("--config", help="TOML file of settings (keys = the flags' names with _; "
                                        f"see configs/{service}.example.toml)")
        own = settings(cls)
        for setting in own:
            _add_setting(p, setting)
        for owner, other in CONFIGS.items():
            for x in settings(other) if owner != service else ():
                if x.name not in {o.name for o in own}:  # host, port, ... belong to both
                    options = [flag(x.name)] + ([f"--no-{flag(x.name)[2:]}"] if x.kind is bool else [])
                    p.add_argument(*options, action=_OtherService, owner=owner, service=service,
                                   nargs=0 if x.kind is bool else "?")
        p.set_defaults(func=cmd_serve)


def overrides(args) -> dict:
    """The settings given as flags (None = not given: the TOML value or the default stays)."""
    return {s.name: getattr(args, s.name) for s in settings(CONFIGS[args.service])}


def cmd_serve(args) -> int:
    try:
        cfg = load_config(CONFIGS[args.service], args.config, overrides(args))
    except (OSError, ValueError) as e:  # no such --config file, bad TOML, a bad setting
        print(f"tunewire serve {args.service}: error: {e}", file=sys.stderr)
        return 2
    if args.service == "trainer":
        from trainer_service.server import main
    else:
        from serving_service.server import main
    try:
        return main(cfg)  # 1 when start-up failed (grpc_util.run_server)
    except Exception:  # noqa: BLE001 - a failure before or around the server: never exit 0
        log.exception("the %s could not run", args.service)
        return 1
