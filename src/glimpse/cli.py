"""`glimpse` command line: serve | generate | chat | make-tiny | bench | video | extract."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import unicodedata
from pathlib import Path

from glimpse.agents.cli import add_extract_args, add_video_args
from glimpse.bench.run import add_bench_args
from glimpse.bench.run import main as bench_main
from glimpse.engine.config import EngineConfig
from glimpse.errors import CheckpointError, GlimpseError
from glimpse.sampling_params import SamplingParams
from glimpse.scaleout import cli as scaleout
from glimpse.server.config import add_serve_flags, serve_configs, vllm_only_notes
from glimpse.server.startup import StartupError
from glimpse.settings import add_flags, setting_values

# Format characters that reorder text on screen (bidi embeddings, overrides and isolates): model text
# with them can show something other than what it says.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def for_terminal(text: str) -> str:
    """Model text made safe to show in a terminal: control characters (escape sequences that move the
    cursor, recolour or retitle the terminal, carriage returns that overwrite a line) and bidi controls
    are printed as Python escapes (`\\x1b`, `\\r`, `\\u202e`); newlines and tabs stay."""
    return "".join(
        c.encode("unicode_escape").decode("ascii")
        if c not in "\n\t" and (unicodedata.category(c) == "Cc" or c in _BIDI_CONTROLS)
        else c
        for c in text
    )


def print_model_text(text: str, prefix: str = "") -> None:
    """Print what a model wrote: escaped when stdout is a terminal (`for_terminal`), as is when it is a
    file or a pipe (scripts get the exact text; `--json` escapes it anyway)."""
    print(prefix + (for_terminal(text) if sys.stdout.isatty() else text))


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
        print_model_text(result.text)
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
        print_model_text(out.text, prefix="assistant> ")
        messages.append({"role": "assistant", "content": out.text})


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from glimpse.model.tiny import make_tiny

    path = make_tiny(
        args.dir, vl=args.vl, seed=args.seed, style=args.style, shards=args.shards, quantization=args.quantization
    )
    print(path)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from glimpse.server.app import run_server

    configs = serve_configs(args)
    for note in vllm_only_notes(args):
        logging.getLogger("glimpse.server").warning(note)
    if scaleout.wants_ray_serve(args):
        return scaleout.serve_command(args, *configs)
    run_server(*configs)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    return bench_main(args)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error told in one line (the usage of `serve` alone runs to dozens of
    lines, and the line that matters should not scroll away) and a pointer to --help."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the flags)\n")


def build_parser() -> argparse.ArgumentParser:
    """The commands; engine, server and media-limit flags are generated from their configurations."""
    parser = _Parser(prog="glimpse", description="Serve Nemotron Nano 2 VL and its family.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens (INFO level)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")

    g = sub.add_parser("generate", help="answer one prompt and print the answer")
    add_flags(g, EngineConfig)
    g.add_argument("--prompt", required=True, help="the prompt (the user message, unless --raw)")
    g.add_argument("--system", default=None, help="a system message (e.g. '/no_think')")
    g.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="attach an image (again for more)"
    )
    g.add_argument(
        "--video", action="append", default=[], metavar="PATH", help="attach a video (again for more)"
    )
    g.add_argument("--pdf", action="append", default=[], metavar="PATH", help="attach a PDF (again for more)")
    g.add_argument(
        "--max-tokens", type=int, default=64, help="most tokens to generate (default: %(default)s)"
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat in the terminal")
    add_flags(c, EngineConfig)
    c.add_argument("--system", default=None, help="a system message (e.g. '/no_think'), kept over /reset")
    c.add_argument(
        "--max-tokens", type=int, default=256, help="most tokens per answer (default: %(default)s)"
    )
    c.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    c.set_defaults(func=cmd_chat)

    m = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint in the real layout")
    m.add_argument("dir", help="the directory to write (made if absent)")
    m.add_argument("--vl", action="store_true", help="the VL model (RADIO + projector + NemotronH)")
    m.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    m.add_argument("--style", default="nvidia", choices=["nvidia", "legacy", "transformers"],
                   help="whose config.json spelling to write (default: %(default)s)")  # fmt: skip
    m.add_argument("--shards", type=int, default=1, help="safetensors files to split the weights into")
    m.add_argument("--quantization", default=None, choices=["fp8", "nvfp4"],
                   help="write a modelopt FP8 or NVFP4 checkpoint of the same weights (default: bf16)")  # fmt: skip
    m.set_defaults(func=cmd_make_tiny)

    s = sub.add_parser("serve", help="the OpenAI-compatible HTTP server")
    add_serve_flags(s)
    scaleout.add_ray_serve_flags(s)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="benchmarks (see docs/PERFORMANCE.md)")
    add_bench_args(b)
    b.set_defaults(func=cmd_bench)

    v = sub.add_parser("video", help="answers, a summary and chapters for a video, with a report")
    add_video_args(v)
    scaleout.add_ray_batch_flags(v)
    v.set_defaults(func=scaleout.video_command)
    x = sub.add_parser("extract", help="one JSON record per document, under a JSON Schema")
    add_extract_args(x)
    scaleout.add_ray_batch_flags(x)
    x.set_defaults(func=scaleout.extract_command)
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
    except (GlimpseError, CheckpointError, StartupError, ValueError) as e:
        print(f"glimpse: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
