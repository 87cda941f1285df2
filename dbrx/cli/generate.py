"""Verbs that generate: `generate` and `chat`, both on the serving engine through dbrx.generate.stream_text."""

from __future__ import annotations

import sys

from .common import add_model_args, load_model


def _sampling(args):
    from dbrx.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
        stop_strings=tuple(args.stop or ()), seed=args.seed,
    )


def cmd_generate(args) -> int:
    from dbrx.generate import stream_text
    from dbrx.tokenizer import get_tokenizer

    params = _sampling(args)  # validate before the (slow) model load
    if args.system is not None and not args.chat:
        raise ValueError("--system only applies with --chat")
    model, tok = load_model(args), get_tokenizer()
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    if args.chat and args.system is not None:
        prompt.insert(0, {"role": "system", "content": args.system})
    pieces = stream_text(model, tok, prompt, params, chat=args.chat)  # checks the prompt's length before any output
    if not args.chat:
        sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    from dbrx.generate import stream_text
    from dbrx.tokenizer import get_tokenizer

    params = _sampling(args)
    model, tok = load_model(args), get_tokenizer()
    messages = [] if args.system is None else [{"role": "system", "content": args.system}]
    print("dbrx chat: type a message; /reset clears the conversation, /exit (or Ctrl-D) quits; Ctrl-C stops a "
          "reply.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            print("\n(Ctrl-D or /exit quits)", file=sys.stderr)
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if messages and messages[0]["role"] == "system" else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            pieces = stream_text(model, tok, messages, params, chat=True)
            sys.stdout.write("dbrx> ")
            for piece in pieces:
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ValueError as e:  # e.g. the conversation no longer fits in max_seq_len: keep the session
            messages.pop()
            print(f"\ndbrx chat: error: {e} (/reset starts over)", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # stop this reply, keep the session and what was said so far
            print("\n(reply interrupted)", file=sys.stderr)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def _add_sampling_args(p):
    add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1] (default 1.0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1.0)")
    p.add_argument("--stop", action="append", help="stop string (repeatable); EOS ids always stop")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--system", default=None, help="system prompt for --chat (default: DBRX Instruct's)")


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the DBRX Instruct chat template")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat, max_new_tokens=512)


__all__ = ["register"]
