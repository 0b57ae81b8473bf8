"""Rater identities. The app never takes a rater's identity from free text.

An *invite* is a secret link for one campaign (``create_invites``; only the token's sha256 is stored);
an *open* campaign lets anyone join under a self-chosen name, which the server binds to an HMAC-signed
key (``open_rater``; secret in ``<workspace>/secrets/rater-hmac.key``) so retyping the name does not
make a new rater; a cleared browser does, so open campaigns are for trusted rooms. On a Hugging Face
Space the app also takes the signed-in account (``hf_rater``). ``votes.rater`` holds the rater's id."""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import uuid

from evals.rating.common import RatingError, campaign_row, check_rater, check_rating_open, ctx
from sft_core.db import ratings as rating_rows
from sft_core.store import Store
from sft_core.workspace import Workspace


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_invites(campaign_id: str, names: list[str], ws: Workspace,
                   store: Store | None = None) -> list[dict]:
    """One secret invite per name: [{"rater", "name", "token"}]. The token is shown only here; the
    database keeps its sha256. Each invite is its own rater, even when two share a display name."""
    ws, store = ctx(ws, store)
    camp = campaign_row(store, campaign_id)
    check_rating_open(camp)
    names = [check_rater(n) for n in names]
    if not names:
        raise RatingError("name at least one rater to invite", "rater")
    out = []
    with store.tx() as con:
        for n in names:
            token, rid = secrets.token_urlsafe(24), f"inv-{secrets.token_hex(8)}"
            rating_rows.add_rater(con, rid, "invite", n, campaign_id=campaign_id, token_sha256=_sha256(token))
            out.append({"rater": rid, "name": n, "token": token})
    return out


def invite_rater(token: str, ws: Workspace, store: Store | None = None) -> dict | None:
    """The rater an invite token stands for (id, name, campaign_id), or None for an unknown/revoked one."""
    ws, store = ctx(ws, store)
    token = (token or "").strip()
    if not token or len(token) > 200:
        return None
    return rating_rows.invite_by_token_hash(store, _sha256(token))


def _secret(ws: Workspace) -> bytes:
    """The workspace's HMAC key for open-rating keys, made once (first writer wins, 0600)."""
    path = ws.root / "secrets" / "rater-hmac.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # atomic, and refuses to replace a key another process made first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = path.read_text().strip()
    if len(key) < 32:
        raise RatingError(f"{path} is not a valid key (delete it to make a new one; open-rating keys then reset)", "secret")
    return key.encode()


def _sign(ws: Workspace, rater_id: str) -> str:
    return hmac.new(_secret(ws), f"open-rater:{rater_id}".encode(), hashlib.sha256).hexdigest()


def open_rater(name: str, ws: Workspace, store: Store | None = None) -> tuple[str, str]:
    """A new rater for open campaigns under a self-chosen name: (rater id, signed key for the browser)."""
    ws, store = ctx(ws, store)
    name = check_rater(name)
    rid = f"open-{secrets.token_hex(8)}"
    rating_rows.add_rater(store, rid, "open", name)
    return rid, f"{rid}.{_sign(ws, rid)}"


def open_key_rater(key: str, ws: Workspace, store: Store | None = None) -> dict | None:
    """The rater a signed open-rating key stands for, or None if the signature does not check out."""
    ws, store = ctx(ws, store)
    if not isinstance(key, str) or key.count(".") != 1 or len(key) > 200:
        return None
    rid, sig = key.split(".")
    if not hmac.compare_digest(sig, _sign(ws, rid)):
        return None
    return rating_rows.live_open_rater(store, rid)


def hf_rater(username: str, display_name: str | None = None, *, ws: Workspace,
             store: Store | None = None) -> str:
    """The rater for a Hugging Face account the app's OAuth session vouches for."""
    ws, store = ctx(ws, store)
    username = check_rater(username)
    rid = f"hf:{username}"
    rating_rows.ensure_rater(store, rid, "hf", (display_name or username).strip()[:100] or username)
    return rid
