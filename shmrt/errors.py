"""shmrt's exceptions: one base, a subclass only where a caller acts differently."""


class ShmrtError(Exception):
    """Base of every error shmrt raises on purpose; the CLI prints it without a traceback."""


class SetupError(ShmrtError):
    """The environment cannot run shmrt as asked (extension not built, /dev/shm too small, bad path)."""


class ProtocolError(ShmrtError):
    """A peer sent or wrote something malformed; the session must be closed."""


class RingFull(ShmrtError):
    """The ring had no room for a message within the timeout (the consumer is not releasing)."""


class TensorTooLarge(ShmrtError):
    """A tensor can never fit the ring; a larger ring is needed."""


class PeerTimeout(ShmrtError):
    """The peer did not answer within the timeout."""


class PeerError(ShmrtError):
    """The peer answered with an error message of its own (it is still alive)."""


class ModelError(ShmrtError):
    """The model path, preset, prompt or token ids are not usable."""


class StaleView(ShmrtError):
    """A view on ring memory was used outside the scope that owns it (a bug in the code using it)."""


# ---- host text on its way to a message or a terminal

TEXT_LIMIT = 300  # characters of host text kept in one error message


def printable(text, limit: int = TEXT_LIMIT) -> str:
    """`text` (from a peer or any other untrusted source) made safe to put in a one-line message.

    At most `limit` characters come out (escapes included) and at most `limit` are looked at, so an
    8 MB error costs no more than a short one. Every control or format character (C0, DEL, C1,
    line/paragraph separators, bidi overrides, lone surrogates...) is written as a Python-style
    escape, so the result is one line that cannot move the cursor, recolour the terminal or hide text. Idempotent on its own output. A non-string
    is described by type only: its repr could recurse or be huge."""
    if not isinstance(text, str):
        return f"<{type(text).__name__}>"
    out, size, used = [], 0, 0
    for ch in text[:limit]:  # each character yields at least one: never more than `limit` are needed
        piece = ch if ch.isprintable() or ch == " " else _escape(ch)
        if size + len(piece) > limit:
            break
        out.append(piece)
        size += len(piece)
        used += 1
    rest = len(text) - used
    return "".join(out) + (f"... ({rest} more characters)" if rest else "")


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def describe(value, limit: int = 80) -> str:
    """A short, safe rendering of an untrusted value of any type for an error message: strings via
    `printable`, small ints and floats as themselves, huge ints by size, anything else by type."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else f"<an integer of {value.bit_length()} bits>"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return f"'{printable(value, limit)}'"
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (list, tuple, dict)):
        return f"<{type(value).__name__} of {len(value)}>"
    return f"<{type(value).__name__}>"
