"""W&B for the example recipes: online when the user has set W&B up, offline otherwise, so no account is needed.

wandb.init with no API key and no terminal ends in "No API key configured" (a traceback mid-run). The recipes
ask for ``--report-to wandb`` by default, so before the trainer starts they look for what wandb itself would use
(WANDB_MODE, WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, a ~/.netrc entry for the W&B host, a ``mode`` or
``api_key`` in wandb's settings files) and, finding none, log offline to ./wandb with a one-line note.
"""

from __future__ import annotations

import configparser
import netrc
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["wandb_setup", "offline_unless_configured"]


def _netrc_has_host() -> str | None:
    path = Path(os.environ["NETRC"]).expanduser() if os.environ.get("NETRC") else None
    candidates = [path] if path else [Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()]
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    for candidate in candidates:
        if candidate.is_file():
            try:
                if netrc.netrc(str(candidate)).authenticators(host):
                    return f"{candidate} ({host})"
            except (netrc.NetrcParseError, OSError):
                return f"{candidate} (unreadable: wandb will say why)"
    return None


def _settings_files() -> list[Path]:
    config_dir = os.environ.get("WANDB_CONFIG_DIR")
    system = Path(config_dir).expanduser() / "settings" if config_dir else Path("~/.config/wandb/settings").expanduser()
    return [system, Path(os.environ.get("WANDB_DIR", ".")) / "wandb" / "settings"]


def wandb_setup() -> str | None:
    """Where this user's W&B set-up comes from (an environment variable, a netrc or settings file), or None."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(name):
            return name
    found = _netrc_has_host()
    if found:
        return found
    for path in _settings_files():
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except configparser.Error:
            return f"{path} (unreadable: wandb will say why)"
        if parser.has_section("default") and ({"mode", "api_key"} & set(parser["default"])):
            return str(path)
    return None


def offline_unless_configured(report_to: str | list | None) -> None:
    """Set WANDB_MODE=offline, with a note, when wandb will be used and nothing says how."""
    targets = report_to if isinstance(report_to, list) else str(report_to or "").replace(",", " ").split()
    if not ({"wandb", "all"} & set(targets)) or wandb_setup() is not None:
        return
    os.environ["WANDB_MODE"] = "offline"
    if os.environ.get("RANK", "0") == "0":
        print("note: no W&B login found (WANDB_API_KEY, ~/.netrc, WANDB_MODE); logging offline to ./wandb. "
              "Run `wandb login` to log online, or `wandb sync` to upload this run later.", file=sys.stderr)
