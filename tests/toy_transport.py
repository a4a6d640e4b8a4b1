"""A third transport, for tests only: the msgpack codec behind a 4-byte tag. It exists to show that a
transport is one module plus one line in the registry (test_registry.py adds that line)."""
from shmrt.errors import ProtocolError
from shmrt.wire import msgpack_transport as base

NAME = "toy"
TAG = b"TOY!"


def sniff(payload: bytes) -> bool:
    return payload[:len(TAG)] == TAG


def _untag(payload: bytes) -> bytes:
    if not sniff(payload):
        raise ProtocolError(f"toy message does not start with {TAG!r}")
    return payload[len(TAG):]


def decode_hello(payload: bytes):
    return base.decode_hello(_untag(payload))


def encode_refusal(message: str) -> bytes:
    return TAG + base.encode_refusal(message)


class Client(base.MsgpackClient):
    name = NAME

    def _send(self, payload: bytes) -> None:
        super()._send(TAG + payload)

    def _recv(self) -> bytes:
        return _untag(super()._recv())

    def _close_message(self):
        message = super()._close_message()
        return TAG + message if message is not None else None


class Session(base.MsgpackServerSession):
    transport = NAME

    def decode(self, payload: bytes):
        return super().decode(_untag(payload))

    def encode_reply(self, request, builder, *, work_ns: int = 0, text: str = "") -> bytes:
        return TAG + super().encode_reply(request, builder, work_ns=work_ns, text=text)

    def encode_error(self, seq: int, message: str) -> bytes:
        return TAG + super().encode_error(seq, message)
