"""`glimpse` command line: serve | generate | chat | make-tiny | bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from glimpse.bench.run import add_bench_args
from glimpse.bench.run import main as bench_main
from glimpse.engine.config import EngineConfig
from glimpse.errors import CheckpointError, GlimpseError
from glimpse.sampling_params import SamplingParams
from glimpse.server.config import add_serve_flags, serve_configs
from glimpse.settings import add_flags, setting_values


def _llm(args: argparse.Namespace):
    from glimpse import LLM

    return LLM(**setting_values(EngineConfig, args))


def _media_parts(images: list[str], videos: list[str], pdfs: list[str]) -> list[dict]:
    parts: list[dict] = []
    for path in images:
        parts.append({"type": "image_url", "image_url": {"url": str(Path(path).resolve())}})
    for path in videos:
        parts.append({"type": "video_url", "video_url": {"url": str(Path(path).resolve())}})
    for path in pdfs:
        parts.append({"type": "file", "file": {"file_url": str(Path(path).resolve())}})
    return parts


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _llm(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    media = _media_parts(args.image, args.video, args.pdf)
    if args.raw and not media:
        out = llm.generate(args.prompt, params)[0]
    else:
        content = [*media, {"type": "text", "text": args.prompt}] if media else args.prompt
        messages = [{"role": "user", "content": content}]
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        out = llm.chat(messages, params)[0]
    result = out.outputs[0]
    if args.json:
        print(json.dumps({
            "text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
            "prompt_tokens": len(out.prompt_token_ids), "video_tokens": out.video_tokens, "media": out.media,
        }))  # fmt: skip
    else:
        print(result.text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _llm(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    pending: list[dict] = []
    print("glimpse chat: type a message; /image PATH, /video PATH, /pdf PATH attach media; /reset; /quit")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            messages, pending = messages[:1] if args.system else [], []
            continue
        cmd, _, rest = line.partition(" ")
        if cmd in ("/image", "/video", "/pdf"):
            path = Path(rest.strip()).expanduser()
            if not path.is_file():
                print(f"no such file: {path}")
                continue
            kind = cmd[1:]
            pending += _media_parts(*[[str(path)] if kind == k else [] for k in ("image", "video", "pdf")])
            print(f"attached {kind}: {path}")
            continue
        content = [*pending, {"type": "text", "text": line}] if pending else line
        messages.append({"role": "user", "content": content})
        pending = []
        try:
            out = llm.chat(messages, params)[0].outputs[0]
        except Exception as e:  # a bad attachment should not end the session
            print(f"error: {e}")
            messages.pop()
            continue
        print(f"assistant> {out.text}")
        messages.append({"role": "assistant", "content": out.text})


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from glimpse.model.tiny import make_tiny

    path = make_tiny(args.dir, vl=args.vl, seed=args.seed, style=args.style, shards=args.shards)
    print(path)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from glimpse.server.app import run_server

    run_server(*serve_configs(args))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    """The commands; engine, server and media-limit flags are generated from their configurations."""
    parser = argparse.ArgumentParser(prog="glimpse", description="Serve Nemotron Nano 2 VL and its family.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer one prompt and print the answer")
    add_flags(g, EngineConfig)
    g.add_argument("--prompt", required=True)
    g.add_argument("--system", default=None, help="a system message (e.g. '/no_think')")
    g.add_argument("--image", action="append", default=[])
    g.add_argument("--video", action="append", default=[])
    g.add_argument("--pdf", action="append", default=[])
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat in the terminal")
    add_flags(c, EngineConfig)
    c.add_argument("--system", default=None)
    c.add_argument("--max-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0)
    c.set_defaults(func=cmd_chat)

    m = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint in the real layout")
    m.add_argument("dir")
    m.add_argument("--vl", action="store_true", help="the VL model (RADIO + projector + NemotronH)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--style", default="nvidia", choices=["nvidia", "legacy", "transformers"])
    m.add_argument("--shards", type=int, default=1)
    m.set_defaults(func=cmd_make_tiny)

    s = sub.add_parser("serve", help="the OpenAI-compatible HTTP server")
    add_serve_flags(s)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="benchmarks (see docs/PERFORMANCE.md)")
    add_bench_args(b)
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (GlimpseError, CheckpointError, ValueError) as e:
        print(f"glimpse: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
