"""`baton`: generate, chat, and (as later issues land) the services' entry points."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

import torch
from pydantic import ValidationError

from engine.engine_args import EngineArgs
from engine.kv_format import KV_CACHE_DTYPES
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from operators.policy_spec import describe


def _thread_count(text: str) -> int:
    # torch takes any count, then fails (< 1) or crashes (tens of thousands) later.
    limit = 4 * (os.cpu_count() or 1)
    try:
        threads = int(text)
    except ValueError:
        threads = 0
    if not 1 <= threads <= limit:
        raise argparse.ArgumentTypeError(
            f"must be an integer in [1, {limit}] (4 x this machine's CPUs), got {text!r}"
        )
    return threads


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="GGUF file or Hugging Face folder (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="activation dtype",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="paged KV cache dtype: auto (--dtype) or fp8 (half the memory, per-head scales "
        "calibrated at load)",
    )
    p.add_argument("--linear", default="dense", help="weight format of the projections")
    p.add_argument("--max-model-len", type=int, default=None, help="context window to serve")
    p.add_argument(
        "--threads", type=_thread_count, default=None, help="torch CPU threads (default: torch's)"
    )


def _sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _build_engine(args: argparse.Namespace) -> LLMEngine:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return EngineArgs(
        model=args.model,
        dtype=args.dtype,
        linear=args.linear,
        max_model_len=args.max_model_len,
        kv_cache_dtype=args.kv_cache_dtype,
    ).create_engine()


def _params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def _stream(engine: LLMEngine, prompt: str | list[int], params: SamplingParams) -> str:
    text = []
    for out in engine.stream(prompt, params):
        sys.stdout.write(out.new_text)
        sys.stdout.flush()
        text.append(out.new_text)
    sys.stdout.write("\n")
    return "".join(text)


def cmd_generate(args: argparse.Namespace) -> int:
    params = _params(args)
    engine = _build_engine(args)
    prompt: str | list[int] = args.prompt
    if args.chat_template:
        prompt = engine.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    _stream(engine, prompt, params)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = _params(args)
    engine = _build_engine(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("baton chat: type a message, Ctrl-D or /exit to quit, /reset to start over.")
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = _stream(engine, engine.tokenizer.encode_chat(messages), params)
        except ValueError as e:  # e.g. the conversation outgrew the context window
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat: the turn is dropped
            # `stream` aborted the request; a step cut short may have cached blocks whose
            # KV it never wrote, so the prefix cache starts over (the request held them all).
            engine.pool.reset_prefix_cache()
            print("\n(interrupted)")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})


# Services parse their own flags: `baton <service> ...` hands them the rest of the line.
_SERVICES = {"kvstore": "services.kvstore.main", "operator": "operators.main"}


def cmd_serve(args: argparse.Namespace) -> int:
    from baton.serve import load_config, load_policies, run

    config = load_config(args)
    policies = load_policies(args.policy, config) if args.policy else {}
    return run(config, policies, args.policy_interval)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete a prompt, streaming tokens as they come")
    gen.add_argument("prompt")
    gen.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap the prompt as one user message in the model's chat template",
    )
    _engine_options(gen)
    _sampling_options(gen)
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="interactive chat with the model")
    chat.add_argument("--system", default=None, help="system message")
    _engine_options(chat)
    _sampling_options(chat)
    chat.set_defaults(func=cmd_chat)
    serve = sub.add_parser("serve", help="serve the OpenAI HTTP and gRPC APIs (Ray Serve)")
    from baton.serve import add_arguments

    add_arguments(serve)
    serve.set_defaults(func=cmd_serve)
    sub.add_parser("kvstore", help="run a KV store shard (see `baton kvstore --help`)")
    sub.add_parser("operator", help="run the CapacityPolicy operator (`baton operator --help`)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _SERVICES:
        service: Callable[[list[str]], int] = importlib.import_module(_SERVICES[argv[0]]).main
        return service(argv[1:])
    args = _parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ValidationError as e:  # a config file's or the command line's settings
        print(f"baton: error: {describe(e, root='')}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"baton: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C in `generate`: stop quietly, as a shell expects
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
