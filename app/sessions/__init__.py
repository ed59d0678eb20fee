"""Session store: hidden states kept between requests, in Redis or in process."""

from app.sessions.record import SessionRecord, decode_state, encode_state
from app.sessions.store import InMemoryStore, SessionStore

__all__ = ["InMemoryStore", "SessionRecord", "SessionStore", "decode_state", "encode_state"]
