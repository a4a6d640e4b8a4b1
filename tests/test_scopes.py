"""The client-side scopes on their own (no transport): what a released reply and a sealed request refuse."""
import pytest
import torch

from shmrt.errors import StaleView
from shmrt.wire.scopes import PendingRequest, Reply

RING = torch.zeros(64)  # stands for the transport's request memory


def request() -> PendingRequest:
    alloc = lambda shape, dtype: (RING[:shape[0]].view(shape), ("record", shape))  # noqa: E731
    owns = lambda t: RING.data_ptr() <= t.data_ptr() < RING.data_ptr() + RING.nbytes  # noqa: E731
    return PendingRequest(alloc, owns)


def test_reply_views_and_takes_raise_after_release():
    with Reply([torch.ones(3), torch.zeros(2)], None, release=lambda: None) as r:
        a, b = r.views()
        kept = r.take(0)
    assert torch.equal(kept, torch.ones(3)) and kept.data_ptr() != a.data_ptr()
    for read in (lambda: r.view(1), r.views, lambda: r.take(0)):
        with pytest.raises(StaleView, match="after its release"):
            read()


def test_request_stages_its_buffers_and_refuses_others_after_seal():
    with request() as req:
        x = req.alloc((8,))
        assert req.claim(x, "Matmul") == ("record", (8,))      # staged by this request
        assert req.claim(torch.ones(4), "Matmul") is None       # the caller's own memory: copied in
        req.seal()
    with pytest.raises(StaleView, match="after its call was sent"):
        req.alloc((4,))
    with pytest.raises(StaleView, match="no open request staged"):
        request().claim(x, "Matmul")                            # ring memory this request did not stage


def test_a_request_built_but_never_sent_is_refused_at_the_end_of_its_block():
    """Buffers staged and no call made is a bug in the model's code: leaving the block says so (unless it is left by
    an exception, which stays the error reported). A sent request, or one that staged nothing, leaves quietly."""
    with pytest.raises(AssertionError, match="never sent"):
        with request() as req:
            req.alloc((8,))
    with pytest.raises(KeyError):
        with request() as req:
            req.alloc((8,))
            raise KeyError("the model's own error")
    with request() as req:
        req.claim(req.alloc((8,)), "Matmul")
        req.seal()
    with request():
        pass
