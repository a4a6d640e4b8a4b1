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
