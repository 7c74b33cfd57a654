"""Per-generation callback URLs handed to Deep-Image.

Deep-Image signs nothing, so the URL itself is the credential: it carries
HMAC-SHA256(GENRELAY_CALLBACK_SECRET, generation id), checked in constant time on arrival.
"""

from __future__ import annotations

import hashlib
import hmac


def callback_token(secret: str, generation_id: str) -> str:
    """The token that authenticates Deep-Image's callback for one generation."""
    return hmac.new(secret.encode(), generation_id.encode(), hashlib.sha256).hexdigest()


def callback_url(public_url: str, secret: str, generation_id: str) -> str:
    """`{public}/v1/callbacks/deepimage/{id}/{token}`."""
    token = callback_token(secret, generation_id)
    return f"{public_url.rstrip('/')}/v1/callbacks/deepimage/{generation_id}/{token}"


def token_is_valid(secret: str, generation_id: str, token: str) -> bool:
    """Constant-time comparison of a presented token with the expected one."""
    if not (generation_id.isascii() and token.isascii()):
        # Ours are ASCII (and compare_digest refuses to compare other strings).
        return False
    return hmac.compare_digest(callback_token(secret, generation_id), token)
