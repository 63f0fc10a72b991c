"""Pagination for every List RPC (AIP-158): one page_size rule, one opaque, validated page_token.

    size, offset = paging.start(request.page_size, request.page_token, "jobs")
    ... fetch items [offset, offset + size] (one more than a page, to know if another follows) ...
    token = paging.next_token("jobs", offset, size, has_more)

    page, token = paging.page(items, request.page_size, request.page_token, "adapters")

`page_size` 0 means DEFAULT_PAGE_SIZE; anything outside [0, MAX_PAGE_SIZE] is INVALID_ARGUMENT.
A token is opaque to clients (URL-safe base64 of "<scope>:<offset>"); one that this API did not
return for the same List RPC (`scope`) is INVALID_ARGUMENT PAGE_TOKEN_INVALID, never a silent
restart from the first page. An empty next_page_token means the last page.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import TypeVar

from tunewire import reasons as R
from tunewire.errors import invalid

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

T = TypeVar("T")


def start(page_size: int, page_token: str, scope: str) -> tuple[int, int]:
    """(page size, offset of the first item) of the requested page."""
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        raise invalid("page_size", f"must be in [0, {MAX_PAGE_SIZE}] (0 = {DEFAULT_PAGE_SIZE})")
    return page_size or DEFAULT_PAGE_SIZE, _decode(page_token, scope) if page_token else 0


def next_token(scope: str, offset: int, size: int, has_more: bool) -> str:
    return _encode(scope, offset + size) if has_more else ""


def page(items: Sequence[T], page_size: int, page_token: str, scope: str) -> tuple[list[T], str]:
    """One page of an in-memory, stably ordered list, and the token of the next page."""
    size, offset = start(page_size, page_token, scope)
    return list(items[offset:offset + size]), next_token(scope, offset, size, offset + size < len(items))


def _encode(scope: str, offset: int) -> str:
    return base64.urlsafe_b64encode(f"{scope}:{offset}".encode()).decode()


def _decode(token: str, scope: str) -> int:
    try:
        got_scope, _, offset = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        # the exact token we would have made: base64 decoding alone forgives trailing junk
        if got_scope == scope and offset.isdecimal() and _encode(scope, int(offset)) == token:
            return int(offset)
    except (binascii.Error, UnicodeError, ValueError):
        pass
    raise invalid("page_token", "not a token this List RPC returned", R.PAGE_TOKEN_INVALID)
