"""MkDocs hooks for the tl-residual site.

* ``on_config``: drop nav entries whose page is not in the docs folder. Pages are written by several people;
  the nav in ``mkdocs.yml`` lists every planned page, and this hook keeps the ones that exist so
  ``mkdocs build --strict`` passes before and after each page lands. Dropped entries are logged at INFO level.
* ``on_page_content``: the docstrings use Sphinx roles (``:func:`explain```, ``:class:`~tl_residual.lens.Lens```),
  which mkdocstrings renders literally; show them as plain code (``explain``, ``Lens``).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

log = logging.getLogger("mkdocs.hooks.slots")


def _prune(items: list[Any], docs_dir: str) -> list[Any]:
    kept: list[Any] = []
    for item in items:
        if isinstance(item, str):
            path = item
            entry = item
        else:
            (title, value), = item.items()
            if isinstance(value, list):
                children = _prune(value, docs_dir)
                if children:
                    kept.append({title: children})
                continue
            path, entry = value, item
        if "://" in path or os.path.exists(os.path.join(docs_dir, path)):
            kept.append(entry)
        else:
            log.info("nav: %s is not written yet; left out", path)
    return kept


def on_config(config: Any) -> Any:
    """Remove nav entries (and emptied sections) whose Markdown file does not exist."""
    if config.get("nav"):
        config["nav"] = _prune(config["nav"], config["docs_dir"])
    return config


_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|obj|exc|const|py:\w+):(<code>)(~?)([^<]*)(</code>)")


def _strip_role(match: re.Match[str]) -> str:
    open_tag, tilde, target, close_tag = match.groups()
    return f"{open_tag}{target.rsplit('.', 1)[-1] if tilde else target}{close_tag}"


def on_page_content(html: str, **kwargs: Any) -> str:
    """Render Sphinx cross-reference roles in docstrings as plain inline code."""
    return _ROLE.sub(_strip_role, html)
