"""Every ``KOA_*`` environment variable, gathered from its three registries, and the docs' table of them.

The registries are `model.settings` (the server side), `koa_client.settings` (the client) and
`loadtest.settings` (what our processes pass to Locust); `render_settings` gives docs/OPERATIONS.md's
table (``python -m ops.render_docs``).
"""

from __future__ import annotations

import koa_client.settings
import loadtest.settings
import model.settings

REGISTRIES = {
    "model.settings": model.settings.SETTINGS,
    "koa_client.settings": koa_client.settings.SETTINGS,
    "loadtest.settings": loadtest.settings.SETTINGS,
}
ALL = tuple(s for settings in REGISTRIES.values() for s in settings)


def render_settings() -> str:
    """The Markdown table of every variable: the ones to set first, then the internal ones."""
    rows = ["| variable | default | type | what | declared in |", "|---|---|---|---|---|"]
    for internal in (False, True):
        for module, settings in REGISTRIES.items():
            for s in settings:
                if s.internal == internal:
                    default = f"`{s.default}`" if s.default else "unset"
                    what = f"{s.help} (internal)" if s.internal else s.help
                    rows.append(f"| `{s.name}` | {default} | {s.type.__name__} | {what} | `{module}` |")
    return "\n".join(rows) + "\n"
